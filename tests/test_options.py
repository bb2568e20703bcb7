"""FalqonOptions: the one validation of FALQON's options, the presets, and the defaults."""

import inspect

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import falqon_jax
from falqon_jax import config as config_lib
from falqon_jax import linen as flinen
from falqon_jax import models
from falqon_jax.errors import UserInputError
from falqon_jax import nnx as fnnx
from falqon_jax.config import FinetuneConfig


def _kernel():
  return {"w": {"kernel": jax.random.normal(jax.random.key(0), (32, 32))}}


BAD = [
    (dict(init="pca"), r"^init must be one of \('svd', 'random'\), got 'pca'$"),
    (dict(scaling="block"), r"^scaling must be one of \('tensor', 'row'\), got 'block'$"),
    (dict(reset="some"), r"^reset must be one of \('all', 'merged', 'residual'\), got 'some'$"),
    (dict(rounding="up"), r"^rounding must be one of \('nearest', 'stochastic'\), got 'up'$"),
    (dict(implementation="cuda"), r"^implementation must be one of \('xla', 'pallas'\)"),
    (dict(implementation=()), r"^implementation must name at least one of"),
    (dict(top_k=0), r'^top_k must be None, "all" or a positive int, got 0$'),
    (dict(top_k="most"), r"^top_k must be None"),
    (dict(topk_warmup_steps=-1), r"^topk_warmup_steps must be a non-negative int, got -1$"),
    (dict(seed=2**32), r"^seed must be an int in \[0, 2\*\*32\)"),
    (dict(rank=0), r"^rank must be a positive int, got 0$"),
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_a_bad_value_is_one_line_from_the_one_validation(bad, msg):
  kw = {"rank": 16, **bad}
  entry_points = [
      lambda: falqon_jax.FalqonOptions(**bad),
      lambda: falqon_jax.RECOMMENDED.replace(**bad),
      lambda: falqon_jax.meld(_kernel(), **kw),
      lambda: falqon_jax.meld_kernel(_kernel()["w"]["kernel"], **kw),
      lambda: falqon_jax.proxy_update(optax.sgd(0.1), **bad),
      lambda: flinen.meld(_kernel(), **kw),
      lambda: fnnx.meld(nnx.Linear(32, 32, rngs=nnx.Rngs(0)), **kw),
  ]
  for call in entry_points:
    with pytest.raises(falqon_jax.UserInputError, match=msg) as e:
      call()
    assert "\n" not in str(e.value)


def test_a_wrong_type_or_unknown_option_is_a_type_error():
  with pytest.raises(TypeError, match="rank must be an int, got True"):
    falqon_jax.FalqonOptions(rank=True)
  with pytest.raises(TypeError, match="unknown FALQON option 'warmup_steps'; did you mean"
                     " 'topk_warmup_steps'"):
    falqon_jax.proxy_update(optax.sgd(0.1), warmup_steps=3)
  with pytest.raises(TypeError, match="options must be a falqon_jax.FalqonOptions"):
    falqon_jax.meld(_kernel(), options={"rank": 16})


def test_presets():
  rec, ref = falqon_jax.RECOMMENDED, falqon_jax.REFERENCE
  assert rec == falqon_jax.FalqonOptions()
  assert (rec.init, rec.scaling, rec.top_k, rec.reset, rec.rounding) == (
      "svd", "tensor", "all", "merged", "stochastic")
  assert (ref.init, ref.scaling, ref.top_k, ref.topk_warmup_steps, ref.reset, ref.rounding,
          ref.implementation) == ("svd", "tensor", None, 0, "all", "nearest", "xla")
  with pytest.raises(Exception):  # frozen
    rec.rank = 8
  # Normalized on construction: numpy ints become Python ints, sequences tuples (hashable).
  o = falqon_jax.FalqonOptions(rank=np.int64(8), top_k=np.int32(4),
                               implementation=["pallas", "xla"])
  assert type(o.rank) is int and type(o.top_k) is int and o.implementation == ("pallas", "xla")
  hash(o)


def test_every_entry_point_defaults_to_recommended():
  for fn in (falqon_jax.meld, falqon_jax.meld_kernel, falqon_jax.proxy_update, fnnx.meld,
             fnnx.Optimizer.__init__, flinen.meld, models.load):
    assert inspect.signature(fn).parameters["options"].default is falqon_jax.RECOMMENDED, fn


def test_cli_defaults_are_recommended_and_its_flags_give_reference():
  cfg = FinetuneConfig()
  opts = config_lib.falqon_options(cfg)
  assert opts == falqon_jax.RECOMMENDED.replace(rank=cfg.rank, seed=cfg.seed)
  ref = config_lib.resolve(FinetuneConfig, flags=[
      "--init", "svd", "--top_k", "none", "--reset", "all", "--rounding", "nearest",
      "--fused_groups", "false"])
  assert config_lib.falqon_options(ref) == falqon_jax.REFERENCE.replace(rank=cfg.rank)
  live = config_lib.resolve(FinetuneConfig, flags=["--live_delta", "true", "--merge_every", "10"])
  assert config_lib.falqon_options(live) == falqon_jax.RECOMMENDED.replace(
      rank=cfg.rank, live_delta=True, merge_every=10)
  with pytest.raises(UserInputError, match="merge_every=10 needs live_delta=True"):
    config_lib.falqon_options(config_lib.resolve(FinetuneConfig, flags=["--merge_every", "10"]))
  pallas = config_lib.resolve(FinetuneConfig, flags=["--implementation", "pallas"])
  assert config_lib.falqon_options(pallas).implementation == "pallas"
  with pytest.raises(config_lib.ConfigError, match="implementation must be one of"):
    config_lib.resolve(FinetuneConfig, flags=["--implementation", "cuda"])


def test_is_melded_is_one_function():
  from falqon_jax import _meld, _proxy_update, export, train
  mk = falqon_jax.meld_kernel(_kernel()["w"]["kernel"], 16)
  assert falqon_jax.is_melded(mk) and not falqon_jax.is_melded(mk.delta)
  for module in (_meld, _proxy_update, export, train, flinen):
    assert module.is_melded is falqon_jax.is_melded, module


def test_fused_groups_is_recommended_and_off_in_the_reference():
  assert falqon_jax.RECOMMENDED.fused_groups and not falqon_jax.REFERENCE.fused_groups
  with pytest.raises(TypeError, match="fused_groups must be a bool, got 1"):
    falqon_jax.FalqonOptions(fused_groups=1)


def test_a_live_delta_run_is_not_resumed_as_a_reference_one():
  from falqon_jax import data, finetune
  from falqon_jax._meld import MeldReport
  cfg = FinetuneConfig()
  live = config_lib.resolve(FinetuneConfig, flags=["--live_delta", "true"])
  ident = lambda c: finetune.run_identity(c, "m", data.ByteTokenizer(), MeldReport((), ()))
  assert "live_delta" not in ident(cfg)  # runs saved before the option keep matching
  assert ident(live) == {**ident(cfg), "live_delta": True}
