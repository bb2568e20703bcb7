"""The falqon-jax CLI: config resolution, a tiny built-in run, subcommands, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tiny_models
from falqon_jax import cli, config as config_lib
from falqon_jax.config import ConfigError, FinetuneConfig

TINY = ["--base_steps", "8", "--steps", "6", "--batch_size", "8", "--train_examples", "64",
        "--eval_examples", "8", "--log_every", "2", "--eval_every", "3", "--save_every", "3",
        "--rank", "8", "--no-progress"]


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
  (tmp_path / "run.yaml").write_text("rank: 32\nlr: 0.01\ntop_k: 4\n")
  (tmp_path / "run.toml").write_text('rank = 8\nreset = "all"\n')
  cfg = config_lib.resolve(FinetuneConfig, file_values=config_lib.load_file(str(tmp_path / "run.yaml")),
                           flags=["--lr", "0.5", "--top_k", "none", "--no-pack"])
  assert (cfg.rank, cfg.lr, cfg.top_k, cfg.pack, cfg.steps) == (32, 0.5, None, False, FinetuneConfig.steps)
  cfg = config_lib.resolve(FinetuneConfig, file_values=config_lib.load_file(str(tmp_path / "run.toml")))
  assert (cfg.rank, cfg.reset) == (8, "all")
  cfg = config_lib.resolve(FinetuneConfig, flags=["--top_k", "all", "--reset", "residual"])
  assert (cfg.top_k, cfg.reset) == ("all", "residual")


@pytest.mark.parametrize("file_values,flags,msg", [
    ({"rnak": 8}, [], "unknown config key 'rnak'; did you mean 'rank'"),
    ({}, ["--lerning_rate", "1"], "unknown option '--lerning_rate'"),
    ({}, ["--lrr", "1"], "did you mean 'lr'"),
    ({"rank": "eight"}, [], "config key 'rank' needs an int"),
    ({"reset": "some"}, [], r"reset must be one of \('all', 'merged', 'residual'\)"),
    ({}, ["--top_k", "most"], "config key 'top_k' needs an int"),
])
def test_config_errors_are_one_line(file_values, flags, msg):
  with pytest.raises(ConfigError, match=msg):
    config_lib.resolve(FinetuneConfig, file_values=file_values, flags=flags)


@pytest.mark.parametrize("args,msg", [
    (["--model", "/no/such/model"], "model folder '/no/such/model' does not exist"),
    (["--data", "/no/such/data.jsonl"], "data path '/no/such/data.jsonl' does not exist"),
    (["--batch_size", "6"], "batch size 6 is not divisible by the 4 devices"),
    (["--rnak", "3"], "did you mean 'rank'"),
])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, args, msg):
  out = tmp_path / "run"
  assert cli.main(["finetune", "--output_dir", str(out), *TINY, *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
  assert not out.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "run"
  assert cli.main(["finetune", "--output_dir", str(out), *TINY]) == 0
  return out


def test_run_folder_holds_metrics_config_summary_plot_checkpoints(run_dir):
  names = set(os.listdir(run_dir))
  assert {"config.yaml", "metrics.jsonl", "summary.json", "plot.png", "checkpoints", "base"} <= names
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 0 and "exact_match" in rows[0]
  assert [r["step"] for r in rows[1:]] == [2, 4, 6]
  assert all({"loss", "tokens_per_s", "step_time", "skipped", "lr"} <= set(r) for r in rows[1:])
  assert all(r["tokens_per_s"] > 0 and r["step_time"] > 0 for r in rows[1:])
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["melded_layers"] == 14 and summary["tokens"] > 0
  assert summary["trainable_params"] == 2 * 8 * (4 * 128 + 2 * 256 + 128)
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["3", "6"]
  cfg = config_lib.resolve(FinetuneConfig, file_values=config_lib.load_file(str(run_dir / "config.yaml")))
  assert cfg.rank == 8 and cfg.steps == 6


def _tensorboard_scalars(folder):
  """{tag: [(step, value)]} read back from tensorboardX's TFRecord event files."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  scalars = {}
  for name in sorted(os.listdir(folder)):
    data = (folder / name).read_bytes()
    pos = 0
    while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_scalars_match_metrics_jsonl(run_dir):
  pytest.importorskip("tensorboardX")
  scalars = _tensorboard_scalars(run_dir / "tb")
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [s for s, _ in scalars["loss"]] == [r["step"] for r in rows if "loss" in r]
  for r in rows:
    for key in ("loss", "eval_loss", "exact_match", "lr"):
      if key in r:
        got = dict(scalars[key])[r["step"]]
        assert got == pytest.approx(r[key], rel=1e-6), (key, r["step"])


def test_existing_run_needs_resume(run_dir, capsys):
  assert cli.main(["finetune", "--output_dir", str(run_dir), *TINY]) == 2
  assert "pass --resume" in capsys.readouterr().err
  assert cli.main(["finetune", "--output_dir", str(run_dir), *TINY, "--rank", "16", "--resume"]) == 2
  assert "rank: saved 8, now 16" in capsys.readouterr().err


def test_eval_generate_and_export_on_the_run(run_dir, tmp_path, capsys):
  (tmp_path / "text.txt").write_text("copy abc:abc\nreverse abc:cba\n" * 4)
  assert cli.main(["eval", str(run_dir), "--perplexity", str(tmp_path / "text.txt"),
                   "--builtin", "--limit", "8"]) == 0
  results = json.loads(capsys.readouterr().out)
  assert results["perplexity"]["tokens"] > 0 and 0 <= results["builtin"]["exact_match"] <= 1
  assert cli.main(["generate", str(run_dir), "copy abc:", "--max_new_tokens", "4"]) == 0
  assert capsys.readouterr().out.startswith("copy abc:")
  out = tmp_path / "fp8"
  assert cli.main(["export", str(run_dir), str(out), "--format", "fp8"]) == 0
  assert (out / "config.json").exists()
  assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
  assert cli.main(["export", str(run_dir), str(out)]) == 2  # refuses to overwrite
  assert cli.main(["eval", str(out), "--perplexity", str(tmp_path / "text.txt")]) == 0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A 1-layer Llama HF folder (byte vocab): subprocess runs skip the built-in base."""
  from falqon_jax import export

  folder = str(tmp_path_factory.mktemp("tiny") / "llama")
  export.save_bf16(folder, *tiny_models.functional("llama", vocab_size=272, num_hidden_layers=1))
  return folder


def _subprocess_run(model_dir, *args):
  return [sys.executable, "-m", "falqon_jax.cli", "finetune", "--model", model_dir,
          "--tokenizer", "byte", "--batch_size", "8", "--train_examples", "256",
          "--eval_examples", "0", "--rank", "8", "--log_every", "4", "--no-progress", *args]


def _checkpoint_leaves(folder, step):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(folder, "checkpoints")) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  def raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x).tobytes()
  return [raw(x) for x in jax.tree_util.tree_leaves(restored.state)]


def _wait_for_checkpoint(proc, folder, step, *, poll, timeout=300):
  """Polls until ``folder`` holds checkpoint ``step``; fails if ``proc`` exits first."""
  deadline = time.time() + timeout
  while not (os.path.isdir(folder) and str(step) in os.listdir(folder)):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(poll)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir):
  base = _subprocess_run(tiny_model_dir, "--save_every", "4", "--keep_checkpoints", "10",
                         "--steps", "24")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  reference = subprocess.Popen(base + ["--output_dir", straight], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proc = subprocess.Popen(base + ["--output_dir", killed], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(killed, "checkpoints")
  _wait_for_checkpoint(proc, ckpts, 8, poll=0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert max(done) < 24, "the run finished before the kill; nothing was resumed"
  subprocess.run(base + ["--output_dir", killed, "--resume"], check=True, env=env, capture_output=True)
  assert reference.wait(timeout=600) == 0
  assert _checkpoint_leaves(killed, 24) == _checkpoint_leaves(straight, 24)
  # One true record: each step's row once, with the straight run's losses (the same
  # program on the same data: log and save intervals line up); tokens of the whole run.
  rows = {name: [json.loads(l) for l in open(os.path.join(name, "metrics.jsonl"))]
          for name in (straight, killed)}
  assert [r["step"] for r in rows[killed]] == [r["step"] for r in rows[straight]]
  assert [r["loss"] for r in rows[killed]] == pytest.approx([r["loss"] for r in rows[straight]])
  summaries = {name: json.loads(open(os.path.join(name, "summary.json")).read())
               for name in (straight, killed)}
  assert summaries[killed]["tokens"] == summaries[straight]["tokens"]
  assert summaries[killed]["resumed_from"] == max(done)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir):
  out = str(tmp_path / "run")
  cmd = _subprocess_run(tiny_model_dir, "--output_dir", out, "--save_every", "4",
                        "--steps", "100000")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckpts = os.path.join(out, "checkpoints")
  _wait_for_checkpoint(proc, ckpts, 4, poll=0.05)
  proc.send_signal(signal.SIGINT)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output[-2000:]
  summary = json.loads(open(os.path.join(out, "summary.json")).read())
  assert summary["stopped_early"] and 4 <= summary["steps"] < 100000
  assert str(summary["steps"]) in os.listdir(ckpts)  # the stop step was saved
  assert "interrupted: saving a checkpoint" in output


def test_lr_default_depends_on_the_task():
  from falqon_jax import finetune

  builtin = finetune.resolve_defaults(FinetuneConfig())
  assert (builtin.lr, builtin.top_k, builtin.reset) == (finetune.BUILTIN_LR, "all", "merged")
  own = finetune.resolve_defaults(FinetuneConfig(model="m", data="d.json"))
  assert own.lr == finetune.DEFAULT_LR
  assert finetune.resolve_defaults(FinetuneConfig(lr=0.5)).lr == 0.5  # given: kept


def _help_entries(text):
  """``{flag: its help text}`` from argparse's options listing, wrapped lines joined."""
  entries, name = {}, None
  for line in text.split("options:", 1)[1].splitlines():
    if line.startswith("  -"):
      name = line.split()[0].rstrip(",")
      entries[name] = line
    elif name:
      entries[name] += " " + line.strip()
  return {k: " ".join(v.split()) for k, v in entries.items()}


def test_finetune_help_lists_every_flag_with_meaning_and_default(capsys, monkeypatch):
  import dataclasses

  monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each help text appears whole
  with pytest.raises(SystemExit) as info:
    cli.main(["finetune", "--help"])
  assert info.value.code == 0
  entries = _help_entries(capsys.readouterr().out)
  for f in dataclasses.fields(FinetuneConfig):
    entry = entries.get("--" + f.name, "")
    default = "none" if f.default is None else (
        str(f.default).lower() if isinstance(f.default, bool) else f.default)
    assert f"{f.metadata['help']} (default: {default})" in entry, (f.name, entry)
  assert "(default: 16)" in entries["--rank"] and "(default: none)" in entries["--lr"]


def test_finetune_flags_take_bool_values_and_override_the_config_file(tmp_path):
  (tmp_path / "run.yaml").write_text("rank: 32\npack: true\nremat: true\nsteps: 50\n")
  parser = cli.build_parser()
  args, rest = parser.parse_known_args(["finetune", "--config", str(tmp_path / "run.yaml")])
  cfg = cli.finetune_config(args, rest)
  assert (cfg.rank, cfg.pack, cfg.remat, cfg.steps, cfg.lr) == (32, True, True, 50, None)
  args, rest = parser.parse_known_args(["finetune", "--config", str(tmp_path / "run.yaml"),
                                        "--pack", "false", "--no-remat", "--fsdp",
                                        "--progress", "no", "--steps", "7"])
  cfg = cli.finetune_config(args, rest)
  assert (cfg.rank, cfg.pack, cfg.remat, cfg.fsdp, cfg.progress, cfg.steps) == (
      32, False, False, True, False, 7)
  args, rest = parser.parse_known_args(["finetune", "--pack", "true", "--resume", "TRUE"])
  cfg = cli.finetune_config(args, rest)
  assert cfg.pack and cfg.resume


@pytest.mark.parametrize("args,key", [
    (["--max_grad_norm", "-1"], "max_grad_norm"),
    (["--lr", "nan"], "lr"),
    (["--pack", "5"], "pack"),
])
def test_finetune_rejects_bad_values_in_one_line(tmp_path, capsys, args, key):
  # --model: should a bad value slip through, the run stops at the missing model.
  out = tmp_path / "run"
  assert cli.main(["finetune", "--output_dir", str(out), "--model", str(tmp_path / "none"),
                   *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"config key {key!r}" in err[0], err
  assert not out.exists()


def test_filesystem_errors_are_one_line(tmp_path, capsys, monkeypatch):
  def read_folder(args):
    open(args.folder).read()  # a real IsADirectoryError from the OS

  monkeypatch.setattr(cli, "_eval", read_folder)
  assert cli.main(["eval", str(tmp_path)]) == 2
  assert capsys.readouterr().err == f"falqon-jax eval: error: {tmp_path}: Is a directory\n"


@pytest.mark.parametrize("bug", [TypeError("bug"), ValueError("bug")])
def test_bugs_keep_their_traceback(monkeypatch, bug):
  def broken(args):
    raise bug

  monkeypatch.setattr(cli, "_generate", broken)
  with pytest.raises(type(bug), match="bug"):
    cli.main(["generate", "folder", "prompt"])


@pytest.mark.parametrize("where,msg", [("file", "is a file"), ("file/run", "cannot be created")])
def test_unusable_output_dir_fails_in_one_line_before_any_work(tmp_path, capsys, where, msg):
  (tmp_path / "file").write_text("mine")
  assert cli.main(["finetune", "--output_dir", str(tmp_path / where), *TINY]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
  assert "built-in base" not in captured.out  # refused before the base pretraining
  assert (tmp_path / "file").read_text() == "mine"


def test_a_second_finetune_on_a_busy_run_folder_is_refused(tmp_path, capsys):
  from falqon_jax._run_folder import RunFolder

  with RunFolder(str(tmp_path / "run")):
    assert cli.main(["finetune", "--output_dir", str(tmp_path / "run"), *TINY]) == 2
  assert f"in use by another run (pid {os.getpid()})" in capsys.readouterr().err


def test_resume_keeps_one_true_record(tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()  # a run killed before its first checkpoint left rows behind
  (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
  assert cli.main(["finetune", "--output_dir", str(out), *TINY, "--lr", "0.01", "--resume"]) == 0
  assert "no checkpoint in" in capsys.readouterr().out  # --resume without a checkpoint says so
  first = json.loads((out / "summary.json").read_text())
  with open(out / "metrics.jsonl", "a") as f:  # logged after the last checkpoint, then a crash
    f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
  assert cli.main(["finetune", "--output_dir", str(out), *TINY, "--steps", "8", "--lr", "0.05",
                   "--resume"]) == 0
  assert "resuming with changed settings: steps 6 -> 8, lr 0.01 -> 0.05" in capsys.readouterr().out
  # A plain --resume continues with the run's own settings, not the defaults.
  assert cli.main(["finetune", "--output_dir", str(out), "--steps", "10", "--resume",
                   "--no-progress"]) == 0
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10]
  assert 9.0 not in (rows[0]["eval_loss"], rows[1]["loss"])
  summary = json.loads((out / "summary.json").read_text())
  assert summary["before"] == first["before"] and summary["before"] is not None
  assert summary["tokens"] > first["tokens"] and summary["resumed_from"] == 8
  history = [json.loads(l) for l in (out / "config_history.jsonl").read_text().splitlines()]
  assert [(h["start_step"], h["config"]["lr"], h["config"]["rank"]) for h in history] == [
      (0, 0.01, 8), (6, 0.05, 8), (8, 0.05, 8)]


def test_logged_train_loss_is_the_token_weighted_mean_since_the_last_row():
  import jax.numpy as jnp
  from falqon_jax.finetune import _Interval

  interval = _Interval()
  interval.add({"loss": jnp.float32(1.0), "tokens": jnp.float32(10), "skipped": jnp.int32(0)}, 10)
  interval.add({"loss": jnp.float32(4.0), "tokens": jnp.float32(30), "skipped": jnp.int32(1)}, 30)
  row = interval.row()
  assert row["loss"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40) and row["skipped"] == 1
  assert row["steps"] == 2 and row["tokens_per_s"] > 0


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
  from falqon_jax import export

  folder = str(tmp_path / "small-vocab")  # 256 ids; the byte tokenizer has 272
  export.save_bf16(folder, *tiny_models.functional("llama", num_hidden_layers=1))
  assert cli.main(["generate", folder, "copy abc:"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "the tokenizer has 272 ids but" in err[0] and "256" in err[0], err
  assert cli.main(["finetune", "--model", folder, "--tokenizer", "byte", "--output_dir",
                   str(tmp_path / "run"), *TINY]) == 2
  assert "silently clamped" in capsys.readouterr().err


def test_export_copies_the_tokenizer_and_writes_both_dtype_keys(tmp_path, capsys):
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from falqon_jax import export

  src = str(tmp_path / "hf")
  export.save_bf16(src, *tiny_models.functional("llama", num_hidden_layers=1, rank=16))
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "copy", "abc", ":"])}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(src, "tokenizer.json"))
  (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
       "unk_token": "<unk>"}))
  out = tmp_path / "out"
  assert cli.main(["export", src, str(out), "--format", "bf16"]) == 0
  assert f"with the tokenizer of {src}" in capsys.readouterr().out
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
  config = json.loads((out / "config.json").read_text())
  assert config["dtype"] == config["torch_dtype"] == "bfloat16"
