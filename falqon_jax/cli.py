"""``falqon-jax``: fine-tune, evaluate, generate and export from the command line.

  falqon-jax finetune                      # the built-in default, ~2 min on 2 CPU cores
  falqon-jax finetune --config run.yaml --lr 1e-3
  falqon-jax eval RUN_OR_HF_FOLDER --perplexity text.txt --mmlu mmlu/ --builtin
  falqon-jax generate RUN_OR_HF_FOLDER "last abc:"
  falqon-jax export RUN_FOLDER OUT_FOLDER --format fp8

A RUN folder is what ``finetune`` writes (its latest checkpoint is used); an HF folder is
a model folder with ``config.json`` and weights (e.g. an export). Errors in what the user
gave (:func:`user_errors`) are one line and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from falqon_jax import config as config_lib
from falqon_jax.config import ConfigError, FinetuneConfig
from falqon_jax.errors import UserInputError


def user_errors() -> tuple:
  """The errors ``main`` reports in one line: bad input, and the filesystem's refusals."""
  return (UserInputError, OSError)


def finetune_config(args: argparse.Namespace, rest: Sequence[str] = ()) -> FinetuneConfig:
  """Defaults, then (on ``--resume``) the run's saved ``config.yaml``, then the ``--config``
  file, then the flags given (``rest``: unknown ones)."""
  file_values = config_lib.load_file(args.config) if args.config else {}
  cfg = config_lib.resolve(FinetuneConfig, file_values=file_values, flags=rest,
                           flag_values=vars(args))
  saved = os.path.join(cfg.output_dir, "config.yaml")
  if cfg.resume and os.path.isfile(saved):
    # A resume continues with the run's own settings; what is given here overrides them.
    file_values = {**config_lib.load_file(saved), **file_values}
    cfg = config_lib.resolve(FinetuneConfig, file_values=file_values, flags=rest,
                             flag_values=vars(args))
  return cfg


def _finetune(args, rest: Sequence[str]) -> None:
  from falqon_jax import finetune

  finetune.run(finetune_config(args, rest))


def load_for_inference(folder: str):
  """``(model, params, tokenizer, config_or_None)`` from a run folder or an HF folder."""
  import jax

  from falqon_jax import checkpoint as ckpt_lib
  from falqon_jax import data as data_lib
  from falqon_jax import finetune, models, train

  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder!r} is not a folder: pass a run folder or an HF model folder")
  if os.path.exists(os.path.join(folder, "config.json")):
    loaded = models.load(folder)
    tokenizer = data_lib.load_tokenizer(folder if _has_tokenizer(folder) else None)
    data_lib.check_vocabulary(tokenizer, loaded.config.vocab_size, folder)
    return (*models.split(loaded.model), tokenizer, None)
  config_path = os.path.join(folder, "config.yaml")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{folder!r} holds neither config.json (an HF model) nor"
                            " config.yaml (a falqon-jax run)")
  saved = config_lib.load_file(config_path)
  cfg = config_lib.resolve(FinetuneConfig, file_values={**saved, "output_dir": folder})
  model, params, tokenizer, model_id, report = finetune.load_model(cfg, folder)
  tx, _ = finetune._optimizer(cfg)
  template = train.TrainState.create(params, tx)
  checkpoints = ckpt_lib.Checkpointer(
      os.path.join(folder, "checkpoints"),
      identity=finetune.run_identity(cfg, model_id, tokenizer, report))
  state, _ = checkpoints.restore(template)
  checkpoints.close()
  # Training may have replicated the state over a mesh; inference runs on one device.
  params = jax.device_put(state.params, jax.devices()[0])
  return model, params, tokenizer, cfg


def _has_tokenizer(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, f))
             for f in ("tokenizer.json", "tokenizer_config.json"))


def _eval(args) -> None:
  from falqon_jax import data as data_lib
  from falqon_jax import eval as eval_lib

  model, params, tokenizer, cfg = load_for_inference(args.folder)
  results = {}
  if args.perplexity:
    results["perplexity"] = eval_lib.perplexity(model, params, tokenizer, args.perplexity,
                                                seq_len=args.seq_len)
  if args.mmlu:
    results["mmlu"] = eval_lib.multiple_choice(model, params, tokenizer, args.mmlu,
                                               k_shot=args.k_shot, limit=args.limit)
    if not args.verbose:
      results["mmlu"].pop("per_subject", None)
  if args.builtin:
    from falqon_jax import finetune

    seed = (cfg.seed if cfg else 0) + 1  # the run's held-out examples
    examples = data_lib.synthetic_task(args.limit or 200, seed=seed,
                                       kinds=finetune.BUILTIN_TASK_KINDS)
    results["builtin"] = {"n": len(examples), **finetune.builtin_exact_match(
        model, params, tokenizer, examples)}
  if args.generate:
    results["samples"] = dict(zip(args.generate, eval_lib.generate(
        model, params, tokenizer, args.generate, max_new_tokens=args.max_new_tokens)))
  if not results:
    raise ConfigError("nothing to evaluate: pass --perplexity FILE, --mmlu DIR, --builtin"
                      " or --generate PROMPT")
  print(json.dumps(results, indent=2, default=float))


def _generate(args) -> None:
  from falqon_jax import eval as eval_lib

  model, params, tokenizer, _ = load_for_inference(args.folder)
  outputs = eval_lib.generate(model, params, tokenizer, args.prompts,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed)
  for prompt, text in zip(args.prompts, outputs):
    print(f"{prompt}{text}")


def _check_export_folder(folder: str, out: str) -> None:
  """Refuses an OUT folder that is, holds or sits inside the source folder.

  A config.json inside a run folder makes a later ``eval`` of it load the export instead
  of the run; one in a folder that holds runs mixes a model into it. Real paths are
  compared, so links and ``..`` do not get around the check.
  """
  src, dst = os.path.realpath(folder), os.path.realpath(out)
  common = os.path.commonpath([src, dst])
  if common not in (src, dst):
    return
  where = ("is the source folder" if src == dst else
           "is inside the source folder" if common == src else "holds the source folder")
  raise UserInputError(f"export folder {out!r} {where} {folder!r}; choose an OUT folder"
                       " outside it")


def _export(args) -> None:
  from falqon_jax import export

  _check_export_folder(args.folder, args.out)  # before the (slow) model load
  model, params, _, cfg = load_for_inference(args.folder)
  tokenizer = _tokenizer_folder(args.folder, cfg)
  save = export.save_fp8 if args.format == "fp8" else export.save_bf16
  path = save(args.out, model, params, tokenizer=tokenizer, overwrite=args.overwrite)
  with_tokenizer = (f"with the tokenizer of {tokenizer}" if tokenizer else
                    "without tokenizer files (the byte tokenizer has none)")
  print(f"wrote {args.format} model to {path}, {with_tokenizer}")


def _tokenizer_folder(folder: str, cfg) -> Optional[str]:
  """The folder whose tokenizer files an export of ``folder`` copies, or None (bytes).

  An HF folder's own; a run's ``tokenizer`` folder, else its model folder's.
  """
  candidates = [folder] if cfg is None else [cfg.tokenizer, cfg.model]
  for c in candidates:
    if c and os.path.isdir(c) and _has_tokenizer(c):
      return c
  return None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="falqon-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  ft = sub.add_parser("finetune", help="fine-tune with FALQON (flags: every config key)",
                      description="Every FinetuneConfig field is a --flag; flags override"
                      " the --config file (YAML or TOML). A bool flag alone means true;"
                      " it also takes true/false, and --no-FLAG means false.")
  ft.add_argument("--config", help="a YAML or TOML file of config keys")
  config_lib.add_flags(ft, FinetuneConfig)

  ev = sub.add_parser("eval", help="evaluate a run folder or an HF model folder")
  ev.add_argument("folder")
  ev.add_argument("--perplexity", metavar="FILE", help="a .txt or .jsonl (text field) file")
  ev.add_argument("--seq_len", type=int, default=256)
  ev.add_argument("--mmlu", metavar="DIR", help="a folder of MMLU-format CSVs (dev/, test/)")
  ev.add_argument("--k_shot", type=int, default=5)
  ev.add_argument("--limit", type=int, default=None)
  ev.add_argument("--builtin", action="store_true", help="exact match on the built-in task")
  ev.add_argument("--generate", nargs="*", metavar="PROMPT")
  ev.add_argument("--max_new_tokens", type=int, default=32)
  ev.add_argument("--verbose", action="store_true")

  gen = sub.add_parser("generate", help="generate continuations of prompts")
  gen.add_argument("folder")
  gen.add_argument("prompts", nargs="+")
  gen.add_argument("--max_new_tokens", type=int, default=32)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--seed", type=int, default=0)

  ex = sub.add_parser("export", help="write an HF folder: vLLM fp8 or dequantized bf16")
  ex.add_argument("folder")
  ex.add_argument("out", help="the folder to write, outside the source folder")
  ex.add_argument("--format", choices=("fp8", "bf16"), default="fp8")
  ex.add_argument("--overwrite", action="store_true")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest and args.command != "finetune":
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  handlers = {"finetune": lambda: _finetune(args, rest), "eval": lambda: _eval(args),
              "generate": lambda: _generate(args), "export": lambda: _export(args)}
  try:
    handlers[args.command]()
  except user_errors() as e:
    print(f"falqon-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


def _one_line(e: Exception) -> str:
  """``path: reason`` for a filesystem error from the OS, else the error's own message."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}"
  else:
    text = str(e)
  return " ".join(text.splitlines())


if __name__ == "__main__":
  sys.exit(main())
