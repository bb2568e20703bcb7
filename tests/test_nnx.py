"""falqon_jax.nnx: MeldedLinear, in-place meld, split/merge, nnx.jit training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import falqon_jax
from falqon_jax import fp8
from falqon_jax import nnx as fnnx


class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(256, 64, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 64, rngs=rngs)])
    self.lm_head = nnx.Linear(64, 256, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    h = h + self.layers[1](nnx.gelu(self.layers[0](h)))
    return self.lm_head(h)


def _ids(seed=0):
  return jax.random.randint(jax.random.key(seed), (4, 16), 0, 256)


def _loss(model, ids):
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_meld_in_place_swaps_targets_only():
  model = Tiny(nnx.Rngs(0))
  report = fnnx.meld(model, rank=16)
  assert [m.path for m in report.melded] == ["layers/0/kernel", "layers/1/kernel"]
  assert isinstance(model.layers[0], fnnx.MeldedLinear)
  assert isinstance(model.lm_head, nnx.Linear)
  assert model.layers[0].kernel.get_value().qweight.dtype == jnp.float8_e4m3fn
  assert model.layers[0](jnp.ones((2, 64))).shape == (2, 128)


def test_zero_delta_equals_dequantized_backbone():
  lin = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
  model = nnx.Sequential(lin)
  fnnx.meld(model, rank=16)
  layer = model.layers[0]
  x = jax.random.normal(jax.random.key(2), (8, 64))
  sx = fp8.compute_scale(x, fp8.E4M3)
  xdq = fp8.dequantize(fp8.quantize(x, sx, fp8.E4M3), sx)
  want = xdq @ layer.kernel.get_value().backbone() + layer.bias[...]
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_split_merge_and_only_delta_is_differentiable():
  model = Tiny(nnx.Rngs(0))
  fnnx.meld(model, rank=16)
  ids = _ids()
  graphdef, melded, rest = nnx.split(model, fnnx.Melded, ...)
  kernels = jax.tree.leaves(nnx.to_pure_dict(melded), is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel))
  # The model's state holds each melded layer as one MeldedKernel leaf.
  assert all(isinstance(k, falqon_jax.MeldedKernel) for k in kernels)
  assert [k.delta.shape for k in kernels] == [(128, 16), (64, 16)]
  assert {k.qweight.dtype for k in kernels} == {jnp.dtype(jnp.float8_e4m3fn)}
  again = nnx.merge(graphdef, melded, rest)
  np.testing.assert_array_equal(again(ids), model(ids))
  grads = nnx.grad(_loss, argnums=nnx.DiffState(0, fnnx.Melded))(model, ids)
  leaves = [v for _, v in nnx.to_flat_state(grads)]
  assert len(leaves) == 2 and all(isinstance(v, fnnx.Melded) for v in leaves)
  assert all(np.any(np.asarray(v.get_value().delta) != 0) for v in leaves)
  # No weight gradient: the FP8 rows and scales get zero cotangents.
  assert not any(np.any(np.asarray(v.get_value().qweight, np.float32)) for v in leaves)


@pytest.mark.slow
def test_loss_falls_with_nnx_jit_and_optimizer():
  model = Tiny(nnx.Rngs(0))
  fnnx.meld(model, rank=16)
  opt = fnnx.Optimizer(model, optax.adam(1e-1), falqon_jax.REFERENCE)
  ids = _ids(1)
  q0 = np.asarray(model.layers[0].kernel.get_value().qweight, np.float32)
  head0 = np.asarray(model.lm_head.kernel[...])

  @nnx.jit
  def step(model, opt, ids):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, fnnx.Melded))(model, ids)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, ids)) for _ in range(30)]
  assert losses[-1] < losses[0] - 0.03, losses
  assert int(opt.step[...]) == 30
  assert not np.array_equal(np.asarray(model.layers[0].kernel.get_value().qweight, np.float32), q0)
  np.testing.assert_array_equal(model.lm_head.kernel[...], head0)  # frozen
  assert not np.any(np.asarray(model.layers[0].kernel.get_value().delta))  # reset after each merge


def test_bad_input():
  with pytest.raises(ValueError, match="matched no nnx.Linear"):
    fnnx.meld(Tiny(nnx.Rngs(0)), rank=16, targets=r"nothing_here")
  with pytest.raises(ValueError, match="no MeldedLinear"):
    fnnx.Optimizer(Tiny(nnx.Rngs(0)), optax.adam(1e-3), falqon_jax.REFERENCE)
  with pytest.raises(TypeError, match="needs a MeldedKernel"):
    fnnx.MeldedLinear(jnp.ones((64, 64)))


def test_same_shape_layers_get_their_own_random_a():
  class TwoSame(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 64, rngs=rngs)])

  model = TwoSame(nnx.Rngs(0))
  fnnx.meld(model, rank=16, init="random", key=jax.random.key(3))
  a0, a1 = (np.asarray(l.kernel.get_value().lora_a(jnp.float32)) for l in model.layers)
  assert not np.array_equal(a0, a1)  # one key per layer, as falqon_jax.meld gives
  # The same A as melding the equivalent params tree (the same per-leaf keys).
  tree, _ = falqon_jax.meld({"layers": {str(i): {"kernel": jnp.asarray(
      TwoSame(nnx.Rngs(0)).layers[i].kernel[...])} for i in range(2)}}, rank=16,
      init="random", key=jax.random.key(3))
  np.testing.assert_array_equal(a1, tree["layers"]["1"]["kernel"].lora_a(jnp.float32))
