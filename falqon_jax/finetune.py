"""The fine-tuning job behind ``falqon-jax finetune``: model, data, meld, train, save.

With no model and no data it runs the built-in default: a tiny Llama (byte tokens) is
first pretrained in code on two instructions of the synthetic task (copy, reverse), cached
in the run folder, then melded into FP8 and fine-tuned with FALQON on those and a new one
(last: the last letter of a word), reporting held-out loss and exact match (overall and by
kind) before and after.

The run folder holds ``config.yaml`` (the resolved config), ``config_history.jsonl`` (the
config of each start, when resumed), ``metrics.jsonl`` (train loss as the mean over each
logging interval), ``checkpoints/`` (orbax, async, last K), ``summary.json``, ``plot.png``
and, when tensorboard is installed, event files under ``tb/``. The folder is checked and
locked before any work (see ``falqon_jax._run_folder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import falqon_jax
from falqon_jax import checkpoint as ckpt_lib
from falqon_jax import config as config_lib
from falqon_jax import data as data_lib
from falqon_jax import models, train
from falqon_jax._run_folder import CONFIG, CONFIG_HISTORY, SUMMARY, RunFolder, json_safe
from falqon_jax.config import ConfigError, FinetuneConfig

BUILTIN = "builtin:tiny-llama"
BUILTIN_BASE_KINDS = ("copy", "reverse")  # the base model's pretraining
BUILTIN_TASK_KINDS = ("copy", "reverse", "last")  # fine-tuning adds an instruction
# Large batches carry the base through its plateau well within base_steps on any seed and
# CPU; at 32 it left the plateau late and at a time that rounding decided.
BASE_BATCH = 128
BASE_LR = 1e-3


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- model


def builtin_config(vocab_size: int) -> models.ModelConfig:
  return models.ModelConfig.from_hf({
      "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 128,
      "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": False,
  }, "the built-in model")


def builtin_base(tokenizer, config: FinetuneConfig, folder: str) -> str:
  """The built-in base model's HF folder: full-parameter float32 training on part of the
  synthetic task.

  Written once per seed and step count under ``folder`` (so reruns and resumes reuse it)
  as an ordinary HF checkpoint, which then loads and melds like any other model.
  """
  from falqon_jax import export

  path = os.path.join(folder, f"seed{config.seed}-steps{config.base_steps}")
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  lm = models.CausalLM(builtin_config(tokenizer.vocab_size), rngs=nnx.Rngs(config.seed))
  model, params = models.split(lm)
  examples = data_lib.synthetic_task(config.train_examples, seed=config.seed + 1000,
                                     kinds=BUILTIN_BASE_KINDS)
  batches = data_lib.Batches(examples, batch_size=min(BASE_BATCH, len(examples)),
                             tokenizer=tokenizer, seed=config.seed)
  warmup = min(50, config.base_steps // 10)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, BASE_LR, warmup, config.base_steps),
                   0.01)
  loss_sum = train.make_loss_fn(model)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    def mean_loss(p):
      total, n = loss_sum(p, batch)
      return total / jnp.maximum(n, 1.0)

    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  start = time.perf_counter()
  for _ in range(config.base_steps):
    params, opt_state, loss = step(params, opt_state, _device_batch(next(batches)))
  try:
    export.save_bf16(path, model, params, dtype=None)  # float32, written atomically
  except FileExistsError:
    # Another process of a multi-host run on a shared disk wrote the same base first.
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise
  _log(f"built-in base: {config.base_steps} full-parameter steps on {BUILTIN_BASE_KINDS},"
       f" loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s); cached at {path}")
  return path


def _device_batch(batch: dict, packed: bool = False) -> dict:
  # Segment ids only for packed rows: elsewhere they add nothing but a mask array.
  return {k: jnp.asarray(v) for k, v in batch.items() if packed or k != "segment_ids"}


class Loaded(NamedTuple):
  """What :func:`load_model` returns."""

  model: models.Functional
  params: dict  # melded layers are MeldedKernel leaves
  tokenizer: object
  model_id: str  # the model folder's absolute path, or BUILTIN
  report: object  # the MeldReport


def load_model(config: FinetuneConfig, run_dir: str) -> Loaded:
  """The configured model, melded as the run melds it (one path for training, resuming,
  evaluating and exporting a run: never drift), with its tokenizer."""
  tokenizer = data_lib.load_tokenizer(
      config.tokenizer if config.model is None else (config.tokenizer or config.model))
  if config.model is None:
    folder, model_id = builtin_base(tokenizer, config, os.path.join(run_dir, "base")), BUILTIN
  else:
    if not os.path.isdir(config.model):
      raise FileNotFoundError(f"model folder {config.model!r} does not exist")
    folder, model_id = config.model, os.path.abspath(config.model)
  data_lib.check_vocabulary(tokenizer, models.read_config(folder).vocab_size, folder)
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  # Melded while loading: the full-precision model never sits in memory whole.
  options = config_lib.falqon_options(config)
  lm, _, report = models.load(folder, dtype, rank=options.rank, options=options,
                              targets=config.targets, attention=config.attention)
  model, params = models.split(lm)
  return Loaded(model, params, tokenizer, model_id, report)


# ----------------------------------------------------------------------------- data


def load_data(config: FinetuneConfig, tokenizer):
  """``(train_examples, eval_examples)``."""
  if config.data is None:
    train_ex = data_lib.synthetic_task(config.train_examples, seed=config.seed,
                                       kinds=BUILTIN_TASK_KINDS)
    eval_ex = data_lib.synthetic_task(config.eval_examples, seed=config.seed + 1,
                                      kinds=BUILTIN_TASK_KINDS)
    return train_ex, eval_ex  # eval_examples=0 turns evaluation off
  examples = data_lib.load_examples(config.data, format=config.data_format, tokenizer=tokenizer)
  n_eval = min(config.eval_examples, len(examples) // 10)
  if len(examples) - n_eval < config.batch_size:
    raise data_lib.DataError(
        f"{config.data}: {len(examples)} examples leave fewer than one batch of"
        f" {config.batch_size} for training; lower batch_size or add data"
    )
  return examples[n_eval:], examples[:n_eval]


# ------------------------------------------------------------------------ evaluation


class Evaluator:
  """Held-out loss (and exact match on the built-in task), compiled once."""

  def __init__(self, model, tokenizer, examples, config: FinetuneConfig, builtin: bool):
    self.model, self.tokenizer, self.examples, self.builtin = model, tokenizer, examples, builtin
    # Prompts encoded exactly as training saw them (truncated to source_max_len).
    self.encode = lambda prompt: data_lib.encode_prompt(
        prompt, tokenizer, source_max_len=config.source_max_len)
    batch = min(config.batch_size, len(examples))
    it = data_lib.Batches(examples, batch_size=batch, tokenizer=tokenizer, seed=12345,
                          source_max_len=config.source_max_len,
                          target_max_len=config.target_max_len, group_by_length=False)
    self.batches = [_device_batch(next(it)) for _ in range(max(1, len(examples) // batch))]
    self._loss = jax.jit(train.make_loss_fn(model))

  def __call__(self, params) -> dict:
    total = n = 0.0
    for batch in self.batches:
      t, c = self._loss(params, batch)
      total, n = total + float(t), n + float(c)
    out = {"eval_loss": total / max(n, 1.0)}
    if self.builtin:
      out.update(builtin_exact_match(self.model, params, self.tokenizer, self.examples,
                                     encode=self.encode))
    return out


def builtin_exact_match(model, params, tokenizer, examples, encode=None) -> dict:
  """Greedy exact match on built-in task examples, overall and by kind."""
  from falqon_jax import eval as eval_lib

  em = eval_lib.exact_match(model, params, tokenizer, examples, max_new_tokens=8,
                            match=data_lib.exact_match, encode=encode)
  kinds: dict = {}
  for example, sample in zip(examples, em["samples"]):
    kinds.setdefault(data_lib.synthetic_kind(example), []).append(sample["correct"])
  return {"exact_match": em["exact_match"],
          "exact_match_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())}}


# ---------------------------------------------------------------------------- train


def _optimizer(config: FinetuneConfig):
  if config.lr_schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1)),
                               optax.constant_schedule(config.lr)], [config.warmup_steps])
  elif config.lr_schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.steps)
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1)),
                               optax.linear_schedule(config.lr, 0.0, config.steps - config.warmup_steps)],
                              [config.warmup_steps])
  inner = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                      optax.adamw(lr, weight_decay=config.weight_decay))
  return falqon_jax.proxy_update(
      inner, config_lib.falqon_options(config), accumulation_steps=config.grad_accum,
  ), lr


def _check_config(config: FinetuneConfig) -> None:
  """What needs the environment; the values themselves are checked by FinetuneConfig."""
  if config.model is not None and not os.path.isdir(config.model):
    raise FileNotFoundError(f"model folder {config.model!r} does not exist")
  if config.data is not None and not os.path.exists(config.data) and "/" in config.data and (
      config.data.startswith((".", "/")) or os.path.splitext(config.data)[1]):
    raise FileNotFoundError(f"data path {config.data!r} does not exist")


def run_identity(config: FinetuneConfig, model_id: str, tokenizer, report) -> dict:
  """What a checkpoint must match to be resumed or evaluated with this config."""
  identity = {"model": model_id, "rank": config.rank, "targets": config.targets,
              "scaling": config.scaling, "init": config.init, "seed": config.seed,
              "vocab_size": int(tokenizer.vocab_size),
              "melded": [m.path for m in report.melded]}
  # A live ΔBuffer holds updates the FP8 rows do not: resuming it as a reference kernel
  # would drop them. Only set when true, so runs saved before the option still match.
  if config.live_delta:
    identity["live_delta"] = True
  return identity


class _Interrupt:
  """Turns the first Ctrl-C into a flag, so the loop can save and stop cleanly."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._old = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, *_):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    _log("interrupted: saving a checkpoint, then stopping (Ctrl-C again to abort)")

  def __exit__(self, *exc):
    signal.signal(signal.SIGINT, self._old)


BUILTIN_LR = 3e-3  # built-in task: learns "last" quickly, with the least loss of copy/reverse
DEFAULT_LR = 2e-3  # the reference's


def resolve_defaults(config: FinetuneConfig) -> FinetuneConfig:
  """Fills the task-dependent defaults (``lr=None``); the run folder records the result."""
  if config.lr is None:
    config = dataclasses.replace(
        config, lr=BUILTIN_LR if config.model is None and config.data is None else DEFAULT_LR)
  return config


def run(config: FinetuneConfig) -> dict:
  """Runs the fine-tuning job; returns the summary (also written to summary.json)."""
  config = resolve_defaults(config)
  _check_config(config)
  if config.distributed:
    jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id)
  dp = train.DataParallel(fsdp=config.fsdp)
  dp.check_batch_size(config.batch_size)
  if config.parallel == "pmap" and config.batch_size % jax.local_device_count():
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by the"
                      f" {jax.local_device_count()} local devices")
  if config.parallel == "pmap" and config.fsdp:
    raise ConfigError("fsdp needs parallel='jit' (pmap replicates the whole state)")
  # Checked and locked before any work: a bad or busy --output_dir fails at once.
  with RunFolder(config.output_dir, writer=jax.process_index() == 0) as folder:
    return _run(config, dp, folder)


def _run(config: FinetuneConfig, dp, folder: RunFolder) -> dict:
  run_dir = folder.path
  checkpoint_dir = os.path.join(run_dir, "checkpoints")
  if not config.resume and (folder.holds_run() or _has_checkpoints(checkpoint_dir)):
    raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it"
                      " or choose another --output_dir")
  model, params, tokenizer, model_id, report = load_model(config, run_dir)
  train_ex, eval_ex = load_data(config, tokenizer)
  tx, schedule = _optimizer(config)
  state = train.TrainState.create(params, tx)
  identity = run_identity(config, model_id, tokenizer, report)
  checkpoints = ckpt_lib.Checkpointer(checkpoint_dir, identity=identity,
                                      keep=config.keep_checkpoints)
  batches = data_lib.Batches(
      train_ex, batch_size=config.batch_size, tokenizer=tokenizer, seed=config.seed,
      source_max_len=config.source_max_len, target_max_len=config.target_max_len,
      pack=config.pack, process_index=jax.process_index(), process_count=jax.process_count())

  # Progress of the earlier parts of a resumed run, so the summary covers the whole run.
  start_step, done = 0, {"tokens": 0, "train_time_s": 0.0}
  if config.resume and checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(state)
    batches.restore(data_state)
    start_step = int(state.step)
    done.update({k: data_state[k] for k in done if k in data_state})
    _log(f"resumed from {checkpoints.directory} at step {start_step}")
  elif config.resume:
    _log(f"--resume: no checkpoint in {checkpoint_dir} yet; starting at step 0")
  saved_config = (config_lib.load_file(folder.file(CONFIG))
                  if config.resume and os.path.exists(folder.file(CONFIG)) else None)
  changed = folder.record_config(config_lib.to_dict(config), start_step, saved_config)
  if changed:
    _log("resuming with changed settings: " + ", ".join(
        f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
         + f" (each part's settings: {CONFIG_HISTORY})")
  # Drops the rows logged after the checkpoint (all of them when none was saved).
  rows = folder.truncate_metrics(start_step if start_step else -1)
  _log(str(report).splitlines()[0])

  if config.parallel == "pmap":
    step_fn = jax.pmap(train.pmap_train_step(model, tx, remat=config.remat), axis_name="data",
                       donate_argnums=0)
    state = train.replicate(state)
    place = lambda b: train.split_batch(_device_batch(b, config.pack), jax.local_device_count())
    host_state = train.unreplicate
  else:
    state = dp.put_state(state)
    step_fn = dp.compile(train.make_train_step(model, tx, remat=config.remat), state)
    place = lambda b: dp.put_batch(_device_batch(b, config.pack))
    host_state = lambda s: s

  evaluator = (Evaluator(model, tokenizer, eval_ex, config, builtin=config.data is None)
               if eval_ex else (lambda params: {}))
  history = [r for r in rows if "loss" in r]
  first_eval = next((r for r in rows if r.get("step") == 0 and "loss" not in r), None)
  if first_eval is not None:
    first_eval = {k: v for k, v in first_eval.items() if k != "step"}
  tensorboard = _Tensorboard(os.path.join(run_dir, "tb"), purge_step=start_step or None)
  if start_step == 0:
    first_eval = evaluator(host_state(state).params) or None
    if first_eval:
      _log(f"before fine-tuning: {_fmt(first_eval)}")
      folder.append_metrics({"step": 0, **first_eval})
      tensorboard.add({"step": 0, **first_eval})

  def save(step):
    progress_so_far = {"tokens": tokens_seen, "train_time_s": train_time}
    checkpoints.save(step, host_state(state), data_state={**batches.state(), **progress_so_far})

  progress = _progress(config, start_step)
  tokens_seen, train_time = done["tokens"], done["train_time_s"]
  stopped_early, started = False, time.perf_counter()
  interval = _Interval()
  step = start_step
  with _Interrupt() as interrupt, contextlib.closing(tensorboard):
    while step < config.steps and not interrupt.requested:
      batch = next(batches)
      batch_tokens = int(batch["loss_mask"][:, 1:].sum()) * jax.process_count()  # host-side
      tokens_seen += batch_tokens
      state, metrics = step_fn(state, place(batch))
      interval.add(metrics, batch_tokens)
      step += 1
      if step % config.log_every == 0 or step == config.steps:
        row = {"step": step, **interval.row(), "lr": float(schedule(step))}
        train_time += row["step_time"] * row.pop("steps")
        if step % config.eval_every == 0 or step == config.steps:
          row.update(evaluator(host_state(state).params))
          if config.progress:
            progress.write(f"step {step}: {_fmt(row)}")
          else:
            _log(f"step {step}: {_fmt(row)}")
        history.append(row)
        folder.append_metrics(row)
        tensorboard.add(row)
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             skipped=row["skipped"])
        interval = _Interval()  # training time only: eval and I/O above are not counted
      if step % config.save_every == 0:
        save(step)
    stopped_early = interrupt.requested
    if checkpoints.latest_step() != step:
      save(step)
    checkpoints.wait()
  progress.close()
  checkpoints.close()

  final = history[-1] if history else {}
  summary = {
      "model": model_id, "steps": step, "stopped_early": stopped_early,
      "resumed_from": start_step or None,
      "melded_layers": len(report.melded), "trainable_params": report.num_trainable,
      "fp8_weights": report.num_melded_weights, "tokens": int(tokens_seen),
      "train_time_s": round(train_time, 1),
      "wall_time_s": round(time.perf_counter() - started, 1),
      "before": first_eval, "final": final,
  }
  folder.write_json(SUMMARY, summary)
  if folder.writer:
    _plot(history, first_eval, os.path.join(run_dir, "plot.png"))
  _log(f"after {step} steps: {_fmt(final)}; run folder {run_dir}")
  return json_safe(summary)


def _has_checkpoints(directory: str) -> bool:
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


class _Interval:
  """Train loss and rates since the last metrics row: the token-weighted mean loss of every
  step in it (one batch's loss swings with what the batch holds), steps skipped so far."""

  def __init__(self):
    self.start, self.steps, self.tokens = time.perf_counter(), 0, 0
    self.loss_sum = self.loss_tokens = 0.0  # device values: no sync per step
    self.skipped = None

  def add(self, metrics: dict, tokens: int) -> None:
    self.steps += 1
    self.tokens += tokens
    self.loss_sum = self.loss_sum + metrics["loss"] * metrics["tokens"]
    self.loss_tokens = self.loss_tokens + metrics["tokens"]
    self.skipped = metrics["skipped"]

  def row(self) -> dict:
    elapsed = time.perf_counter() - self.start
    loss = float(np.mean(self.loss_sum)) / max(float(np.mean(self.loss_tokens)), 1.0)
    return {"loss": loss, "skipped": int(np.max(self.skipped)), "steps": self.steps,
            "step_time": elapsed / self.steps, "tokens_per_s": self.tokens / elapsed}


def _fmt(metrics: Optional[dict]) -> str:
  if not metrics:
    return "-"
  text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in metrics.items() if k in ("loss", "eval_loss", "exact_match"))
  if metrics.get("exact_match_by_kind"):
    text += " (" + ", ".join(f"{k} {v:.2f}" for k, v in metrics["exact_match_by_kind"].items()) + ")"
  return text


def _progress(config: FinetuneConfig, start: int):
  from tqdm.auto import tqdm

  return tqdm(total=config.steps, initial=start, desc="falqon", unit="step",
              disable=not config.progress or jax.process_index() != 0, dynamic_ncols=True)


def _plot(history: list, before: Optional[dict], path: str) -> None:
  """Loss (and held-out metrics) against steps, as a PNG."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  if not history:
    return
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["step"] for r in history], [r["loss"] for r in history],
          label="train loss (mean over each interval)")
  evals = [r for r in history if "eval_loss" in r]
  if before:
    evals = [{"step": 0, **before}] + evals
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / target token)")
  if any("exact_match" in r for r in evals):
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in evals if "exact_match" in r],
             [r["exact_match"] for r in evals if "exact_match" in r], "s--", color="tab:green",
             label="exact match")
    ax2.set_ylabel("exact match")
    ax2.set_ylim(0, 1)
  handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
  ax.legend(handles=handles, loc="center right")  # one legend: two would overlap
  ax.set_title("FALQON fine-tuning")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class _Tensorboard:
  """Live TensorBoard scalars under ``tb/``, written as each metrics row is, on process 0,
  when tensorboardX is installed (the ``[cli]`` extra brings it; without it, a no-op)."""

  def __init__(self, folder: str, purge_step: Optional[int] = None):
    self.writer = None
    if jax.process_index() != 0:
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      return
    # On resume, TensorBoard drops the events past the checkpoint written before a crash.
    self.writer = SummaryWriter(folder, purge_step=purge_step)

  def add(self, row: dict) -> None:
    if self.writer is None:
      return
    for key, value in row.items():
      if (key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value)):
        self.writer.add_scalar(key, value, row["step"])
    self.writer.flush()  # rows are log_every steps apart: a live view costs nothing

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None
