"""Config validation: every FinetuneConfig field is checked wherever the config comes from."""

import dataclasses
import re

import pytest

from falqon_jax import config as config_lib
from falqon_jax.config import ConfigError, FinetuneConfig

AT_LEAST_1 = ("steps", "batch_size", "grad_accum", "rank", "log_every", "save_every",
              "eval_every", "keep_checkpoints", "base_steps", "source_max_len",
              "target_max_len", "train_examples", "num_processes", "top_k")
AT_LEAST_0 = ("warmup_steps", "topk_warmup_steps", "eval_examples", "seed", "process_id")


def _resolve(file_values=None, flags=()):
  return config_lib.resolve(FinetuneConfig, file_values=file_values, flags=flags)


BAD = [
    *[({"lr": v}, "lr") for v in (float("nan"), float("inf"), 0.0, -1e-3)],
    ({}, ["--lr", "nan"], "lr"),
    ({}, ["--lr=-inf"], "lr"),
    ({}, ["--max_grad_norm", "-1"], "max_grad_norm"),
    ({"max_grad_norm": 0}, (), "max_grad_norm"),
    ({"max_grad_norm": float("nan")}, (), "max_grad_norm"),
    ({}, ["--weight_decay", "-0.1"], "weight_decay"),
    ({"weight_decay": float("inf")}, (), "weight_decay"),
    ({"steps": 2.7}, (), "steps"),
    ({"steps": "2.7"}, (), "steps"),
    ({}, ["--steps", "2.7"], "steps"),
    ({"steps": True}, (), "steps"),
    ({"steps": [3]}, (), "steps"),
    ({"rank": float("inf")}, (), "rank"),
    ({"pack": 5}, (), "pack"),
    ({"pack": "maybe"}, (), "pack"),
    ({}, ["--pack", "maybe"], "pack"),
    ({"resume": 0.5}, (), "resume"),
    *[({name: 0}, (), name) for name in AT_LEAST_1],
    *[({}, [f"--{name}", "0"], name) for name in AT_LEAST_1],
    *[({name: -1}, (), name) for name in AT_LEAST_0],
    ({"seed": 2**32}, (), "seed"),  # jax.random.key(2**32) == jax.random.key(0)
    ({"top_k": 2.5}, (), "top_k"),
    ({"top_k": "most"}, (), "top_k"),
    ({"steps": 10, "warmup_steps": 10}, (), "warmup_steps"),
    ({"steps": 10}, ["--warmup_steps", "50"], "warmup_steps"),
    ({"targets": "(q|v"}, (), "targets"),
    ({"output_dir": ""}, (), "output_dir"),
    ({"rank": None}, (), "rank"),
    ({"dtype": "float16"}, (), "dtype"),
    ({"model": ["a"]}, (), "model"),
]
BAD = [(case[0], (), case[1]) if len(case) == 2 else case for case in BAD]


@pytest.mark.parametrize("file_values,flags,key", BAD)
def test_bad_values_are_one_line_errors_naming_key_and_value(file_values, flags, key):
  with pytest.raises(ConfigError) as info:
    _resolve(file_values, flags)
  message = str(info.value)
  assert "\n" not in message and re.search(rf"\b{key}\b", message) and "got " in message, message


@pytest.mark.parametrize("file_values,flags,expected", [
    ({"steps": 3.0}, (), {"steps": 3}),  # YAML `steps: 3.0`
    ({}, ["--steps", "1e3"], {"steps": 1000}),
    ({"pack": "yes", "remat": 1, "fsdp": "False"}, (),
     {"pack": True, "remat": True, "fsdp": False}),
    ({}, ["--pack", "true", "--remat", "--no-progress"],
     {"pack": True, "remat": True, "progress": False}),
    ({"pack": True}, ["--pack", "false"], {"pack": False}),
    ({"top_k": 4096, "lr": "1e-3", "weight_decay": 0}, (),
     {"top_k": 4096, "lr": 1e-3, "weight_decay": 0.0}),
    ({"top_k": "ALL", "lr": None}, (), {"top_k": "all", "lr": None}),
    ({"steps": 10, "warmup_steps": 9, "seed": 2**32 - 1, "process_id": 0}, (),
     {"warmup_steps": 9, "seed": 2**32 - 1, "process_id": 0}),
])
def test_good_values_are_read_as_the_field_type(file_values, flags, expected):
  cfg = _resolve(file_values, flags)
  got = {k: getattr(cfg, k) for k in expected}
  assert got == expected and all(type(got[k]) is type(v) for k, v in expected.items())


def test_configs_built_in_python_are_validated_too():
  with pytest.raises(ConfigError, match="'lr'"):
    FinetuneConfig(lr=float("nan"))
  with pytest.raises(ConfigError, match="'steps'"):
    FinetuneConfig(steps=2.5)
  with pytest.raises(ConfigError, match="'pack'"):
    FinetuneConfig(pack="no")  # a non-empty string is truthy: never guess
  with pytest.raises(ConfigError, match="'max_grad_norm'"):
    dataclasses.replace(FinetuneConfig(), max_grad_norm=-1.0)
  assert FinetuneConfig(lr=1).lr == 1


def test_every_field_has_help_text():
  missing = [f.name for f in dataclasses.fields(FinetuneConfig) if not f.metadata.get("help")]
  assert not missing
