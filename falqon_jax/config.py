"""Run configuration: one frozen dataclass, filled from defaults, a YAML/TOML file, then flags.

Example:
  >>> from falqon_jax.config import FinetuneConfig, resolve
  >>> cfg = resolve(FinetuneConfig, file_values={"rank": 32}, flags=["--lr", "1e-3"])
  >>> cfg.rank, cfg.lr
  (32, 0.001)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import os
import re
import tomllib
import typing
from typing import Any, Optional, Sequence, Union

import yaml

from falqon_jax._options import (
    IMPLEMENTATIONS, INITS, RECOMMENDED, RESETS, ROUNDINGS, SCALINGS, FalqonOptions,
)
from falqon_jax.errors import UserInputError
from falqon_jax.models._decoder import ATTENTION


class ConfigError(UserInputError):
  """A configuration key or value the run cannot use."""


def _field(default, help: str, **bounds):
  """A field with its ``--help`` text and the bounds :func:`validate` checks (ge/gt/lt)."""
  return dataclasses.field(default=default, metadata={"help": help, **bounds})


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything ``falqon-jax finetune`` takes. Each field is also a ``--flag``.

  Every value is checked on construction (:func:`validate`), so a bad one raises
  :class:`ConfigError` here, not minutes into the run.
  """

  # What to train.
  model: Optional[str] = _field(None, "a local HF model folder; none: the built-in tiny Llama")
  data: Optional[str] = _field(
      None, "a JSON/JSONL file or folder, or a hub dataset name; none: the built-in task")
  data_format: str = _field("auto", "the layout of the data records")
  tokenizer: Optional[str] = _field(
      None, "a local tokenizer folder, or byte; none: the model's, else bytes")
  output_dir: str = _field("runs/falqon", "the run folder: config, metrics, checkpoints")
  # FALQON.
  rank: int = _field(16, "LoRA rank of each melded kernel", ge=1)
  targets: Optional[str] = _field(
      None, "regex over param paths to meld; none: the attention and MLP projections")
  # The FALQON defaults below are falqon_jax.RECOMMENDED's (justified in
  # benchmarks/RESULTS.md); `--top_k none --reset all --rounding nearest` gives REFERENCE.
  init: str = _field(RECOMMENDED.init, "how LoRA's A starts: svd of the quantization error"
                     " (the reference's), or random")
  scaling: str = _field(RECOMMENDED.scaling, "FP8 scale per tensor or per row")
  top_k: Optional[Union[int, str]] = _field(
      RECOMMENDED.top_k, "rows merged per kernel per step: a count, all (every row) or none"
      " (k = rank, the reference)", ge=1)
  topk_warmup_steps: int = _field(RECOMMENDED.topk_warmup_steps,
                                  "steps that merge rank rows before top_k applies", ge=0)
  reset: str = _field(RECOMMENDED.reset, "delta rows zeroed after a merge: all (the"
                      " reference), the merged ones, or residual (merged, keeping the"
                      " rounding error)")
  rounding: str = _field(RECOMMENDED.rounding, "rounding of merged rows onto the FP8 grid")
  implementation: str = _field(RECOMMENDED.implementation, "the row merge: xla, or pallas"
                               " (the in-place kernel)")
  fused_groups: bool = _field(RECOMMENDED.fused_groups, "q/k/v and gate/up share one FP8"
                              " scale, so vLLM serves the trained bytes")
  live_delta: bool = _field(RECOMMENDED.live_delta, "the forward and dx include the pending"
                            " delta (W + BA), so updates count before they are merged")
  merge_every: int = _field(RECOMMENDED.merge_every, "merge once every this many optimizer"
                            " steps (needs --live_delta true above 1)", ge=1)
  # Optimization.
  steps: int = _field(300, "training steps", ge=1)
  batch_size: int = _field(32, "examples per step, over all devices", ge=1)
  grad_accum: int = _field(1, "micro-batches averaged into each optimizer update", ge=1)
  lr: Optional[float] = _field(
      None, "peak learning rate; none: 3e-3 for the built-in model and task, else 2e-3", gt=0)
  lr_schedule: str = _field("constant", "learning-rate schedule after the warmup")
  warmup_steps: int = _field(0, "linear warmup steps from 0 to lr; fewer than steps", ge=0)
  weight_decay: float = _field(0.0, "AdamW weight decay", ge=0)
  max_grad_norm: float = _field(3.0, "clip gradients to this global norm", gt=0)
  # Data shaping (the reference's limits).
  source_max_len: int = _field(16, "max tokens of a prompt; longer ones are cut", ge=1)
  target_max_len: int = _field(512, "max tokens of a response; longer ones are cut", ge=1)
  pack: bool = _field(False, "pack several examples into each row")
  # Model execution.
  dtype: str = _field("bfloat16", "dtype of the model's unmelded weights and its compute")
  attention: str = _field("xla", "xla: runs anywhere; cudnn: flash attention (NVIDIA GPUs)")
  remat: bool = _field(False, "recompute activations in the backward pass (less memory)")
  parallel: str = _field("jit", "jit: sharded jax.jit over a device mesh; pmap: replicated")
  fsdp: bool = _field(False, "also shard melded kernels over the devices (jit only)")
  distributed: bool = _field(False, "call jax.distributed.initialize(): multi-host")
  coordinator: Optional[str] = _field(
      None, "host:port of process 0; none: auto-detected on clusters and pods")
  num_processes: Optional[int] = _field(None, "number of processes; none: auto-detected", ge=1)
  process_id: Optional[int] = _field(None, "this process's index; none: auto-detected", ge=0)
  # Built-in default (used when model / data are None).
  base_steps: int = _field(600, "pretraining steps of the built-in base model", ge=1)
  train_examples: int = _field(20000, "training examples of the built-in task", ge=1)
  eval_examples: int = _field(200, "held-out examples (at most a tenth of a dataset); 0:"
                              " no evaluation", ge=0)
  # Bookkeeping.
  # jax.random.key(seed) keeps 32 bits: 2**32 would silently repeat seed 0.
  seed: int = _field(0, "seed of the init, data order and stochastic rounding", ge=0, lt=2**32)
  log_every: int = _field(25, "steps between metrics rows", ge=1)
  eval_every: int = _field(100, "steps between held-out evaluations (on logged steps)", ge=1)
  save_every: int = _field(100, "steps between checkpoints", ge=1)
  keep_checkpoints: int = _field(2, "checkpoints kept on disk", ge=1)
  resume: bool = _field(False, "continue the run in output_dir from its latest checkpoint")
  progress: bool = _field(True, "show a progress bar")

  def __post_init__(self):
    validate(self)


CHOICES = {
    "data_format": ("auto", "alpaca", "oasst", "chat"),
    "init": INITS,
    "scaling": SCALINGS,
    "reset": RESETS,
    "rounding": ROUNDINGS,
    "implementation": IMPLEMENTATIONS,
    "lr_schedule": ("constant", "cosine", "linear"),
    "dtype": ("bfloat16", "float32"),
    "attention": ATTENTION,
    "parallel": ("jit", "pmap"),
}


def _base_type(tp):
  """``Optional[int]`` -> ``int``; ``Union[int, str]`` -> ``int`` (the str is a word)."""
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  # typing caches unions by value, so their argument order is not the annotation's.
  return next((a for a in (bool, int, float, str) if a in args), args[0]) if args else tp


def _field_types(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nearest(key: str, options: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
  return f"; did you mean {close[0]!r}?" if close else ""


WORDS = {"top_k": ("all",)}
"""Non-numeric values that numeric keys also take."""

BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
"""The strings a bool key takes (case-insensitive)."""


def _allowed(f: dataclasses.Field, tp) -> str:
  """What field ``f`` takes, in words: ``needs an int >= 1, 'all' or none``."""
  base = _base_type(tp)
  kind = {bool: "a bool (true/false)", float: "a finite float", int: "an int"}.get(
      base, f"a {base.__name__}")
  bounds = [f"{op} {f.metadata[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("lt", "<"))
            if k in f.metadata]
  options = [" ".join([kind, " and ".join(bounds)]).strip(), *map(repr, WORDS.get(f.name, ()))]
  options += ["none"] if type(None) in typing.get_args(tp) else []
  return "needs " + (", ".join(options[:-1]) + " or " if len(options) > 1 else "") + options[-1]


def _error(f: dataclasses.Field, tp, value) -> ConfigError:
  if f.name in CHOICES:
    return ConfigError(f"{f.name} must be one of {CHOICES[f.name]}, got {value!r}")
  return ConfigError(f"config key {f.name!r} {_allowed(f, tp)}, got {value!r}")


def _valid(f: dataclasses.Field, tp, value) -> bool:
  if value is None:
    return type(None) in typing.get_args(tp)
  if isinstance(value, str) and value in WORDS.get(f.name, ()):
    return True
  base = _base_type(tp)
  if base in (bool, str):
    return isinstance(value, base) and value in CHOICES.get(f.name, (value,))
  number = numbers.Integral if base is int else numbers.Real
  if isinstance(value, bool) or not isinstance(value, number):
    return False
  if not isinstance(value, numbers.Integral) and not math.isfinite(value):
    return False
  m = f.metadata
  return not (("ge" in m and value < m["ge"]) or ("gt" in m and value <= m["gt"])
              or ("lt" in m and value >= m["lt"]))


def validate(config) -> None:
  """Raises a one-line :class:`ConfigError` for the first value the run cannot use.

  Checks every field's type (no bool for an int, no 2.7 for an int, no NaN or inf), its
  bounds (``ge``/``gt``/``lt`` in the field's metadata) and :data:`CHOICES`, then the
  checks that involve several fields. Runs on every ``FinetuneConfig(...)``.
  """
  types = _field_types(type(config))
  for f in dataclasses.fields(config):
    if not _valid(f, types[f.name], getattr(config, f.name)):
      raise _error(f, types[f.name], getattr(config, f.name))
  if not config.output_dir:
    raise ConfigError("config key 'output_dir' needs a folder path, got ''")
  if config.warmup_steps >= config.steps:
    raise ConfigError(f"config key 'warmup_steps' needs an int < steps ({config.steps}),"
                      f" got {config.warmup_steps}")
  if config.targets is not None:
    try:
      re.compile(config.targets)
    except re.error as e:
      raise ConfigError(f"config key 'targets' needs a valid regex ({e}),"
                        f" got {config.targets!r}") from None


def _number(value):
  """``value`` (a str, int or float) as an int or float; None if it is not a number."""
  if isinstance(value, str):
    for parse in (int, float):
      try:
        return parse(value)
      except ValueError:
        pass
    return None
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _coerce(f: dataclasses.Field, tp, value):
  """A file or flag value as field ``f``'s type where that is exact; validate() judges it."""
  if isinstance(value, str) and value.lower() in WORDS.get(f.name, ()):
    return value.lower()
  if isinstance(value, str) and value.lower() in ("none", "null") and (
      type(None) in typing.get_args(tp)):
    return None
  base = _base_type(tp)
  if base is bool:
    if isinstance(value, str):
      return BOOLS.get(value.lower(), value)
    return bool(value) if type(value) is int and value in (0, 1) else value
  if base is str:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
  number = _number(value)
  if base is int and isinstance(number, float) and number.is_integer():
    return int(number)  # YAML's 3.0, or 1e3 from a flag
  if base is float and isinstance(number, int):
    try:
      return float(number)
    except OverflowError:
      return math.inf
  return value if number is None else number


def load_file(path: str) -> dict:
  """Reads a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  with open(path, "rb") as f:
    if path.endswith(".toml"):
      values = tomllib.load(f)
    elif path.endswith((".yaml", ".yml")):
      values = yaml.safe_load(f) or {}
    else:
      raise ConfigError(f"config file {path!r} must end in .yaml, .yml or .toml")
  if not isinstance(values, dict):
    raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
  return values


def _show(default) -> str:
  """A default as the flag would take it: none, true, 16."""
  if default is None:
    return "none"
  return str(default).lower() if isinstance(default, bool) else str(default)


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
  """One ``--flag`` per field, with its help and default.

  Parsed values stay None unless given, so that only the flags given override a config
  file. A bool field takes ``--flag``, ``--flag true|false`` and ``--no-flag``.
  """
  types = _field_types(cls)
  for f in dataclasses.fields(cls):
    flag, base = "--" + f.name, _base_type(types[f.name])
    help = f"{f.metadata.get('help', '')} (default: {_show(f.default)})".replace("%", "%%")
    if base is bool:
      parser.add_argument(flag, nargs="?", const=True, default=None, metavar="BOOL", help=help)
      parser.add_argument("--no-" + f.name, dest=f.name, action="store_const", const=False,
                          help=argparse.SUPPRESS)
    elif f.name in CHOICES:
      parser.add_argument(flag, default=None, metavar="{" + ",".join(CHOICES[f.name]) + "}",
                          help=help)
    else:
      metavar = "|".join([base.__name__.upper(), *WORDS.get(f.name, ())])
      parser.add_argument(flag, default=None, metavar=metavar, help=help)


def resolve(cls, *, file_values: Optional[dict] = None, flags: Sequence[str] = (),
            flag_values: Optional[dict] = None):
  """Defaults, then ``file_values``, then flags (``flags`` to parse or ``flag_values``).

  Raises :class:`ConfigError` for an unknown key or a value :func:`validate` rejects.
  """
  fields, types = {f.name: f for f in dataclasses.fields(cls)}, _field_types(cls)
  values = {}
  for key, value in (file_values or {}).items():
    if key not in types:
      raise ConfigError(f"unknown config key {key!r}{_nearest(key, list(types))}")
    values[key] = _coerce(fields[key], types[key], value)
  if flags:
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser, cls)
    parsed, unknown = parser.parse_known_args(list(flags))
    if unknown:
      bad = unknown[0].lstrip("-").split("=")[0]
      raise ConfigError(f"unknown option {unknown[0]!r}{_nearest(bad, list(types))}")
    given = {k: v for k, v in vars(parsed).items() if v is not None}
    flag_values = {**(flag_values or {}), **given}
  for key, value in (flag_values or {}).items():
    if value is not None and key in types:
      values[key] = _coerce(fields[key], types[key], value)
  return cls(**values)


def falqon_options(config: FinetuneConfig) -> FalqonOptions:
  """The run's :class:`~falqon_jax.FalqonOptions` (its seed is the run's)."""
  return FalqonOptions(
      rank=config.rank, init=config.init, scaling=config.scaling, top_k=config.top_k,
      topk_warmup_steps=config.topk_warmup_steps, reset=config.reset,
      rounding=config.rounding, implementation=config.implementation,
      fused_groups=config.fused_groups, live_delta=config.live_delta,
      merge_every=config.merge_every, seed=config.seed)


def to_dict(config) -> dict:
  return dataclasses.asdict(config)

