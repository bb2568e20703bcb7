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
from falqon_jax._melded_einsum import einsum_layout, melded_einsum


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


def test_melded_is_a_lora_param_so_lora_filters_select_whole_kernels():
  model = Tiny(nnx.Rngs(0))
  fnnx.meld(model, rank=16)
  lora = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
  assert len(lora) == 2 and all(isinstance(v.get_value(), falqon_jax.MeldedKernel) for v in lora)
  # An optimizer over nnx.LoRAParam (tunix's PeftTrainer) holds state for the deltas only.
  opt = nnx.Optimizer(model, falqon_jax.delta_only(optax.adam(1e-3)), wrt=nnx.LoRAParam)
  shapes = sorted(x.shape for x in jax.tree.leaves(nnx.as_pure(opt.opt_state)) if x.ndim == 2)
  assert shapes == sorted([(128, 16), (64, 16)] * 2)  # Adam's mu and nu per delta
  frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(fnnx.Melded)))
  assert not any(isinstance(v.get_value(), falqon_jax.MeldedKernel)
                 for _, v in nnx.to_flat_state(frozen))


class TunixStyleEinsum(nnx.Module):
  """The shape of tunix's per-model ``Einsum``: ``einsum_str``, ``shape`` and a weight ``w``."""

  def __init__(self, einsum_str, shape, rngs, sharding=None):
    self.einsum_str, self.shape = einsum_str, shape
    axes = {} if sharding is None else {"out_sharding": sharding, "eager_sharding": False}
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.05, **axes)

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


_EINSUMS = [  # (equation, kernel shape, input shape)
    ("BTD,DNH->BTNH", (64, 4, 16), (2, 8, 64)),        # tunix q_proj
    ("BTNH,NHD->BTD", (4, 16, 64), (2, 8, 4, 16)),     # tunix o_proj
    ("BTD,NDH->BTNH", (2, 64, 16), (2, 8, 64)),        # gemma q_einsum: D mid-kernel
    ("BTD,SNDH->SBTNH", (3, 2, 64, 16), (2, 8, 64)),   # gemma qkv_einsum: S leads the output
    ("...D,DF->...F", (64, 32), (2, 3, 8, 64)),        # an ellipsis over the batch
]


def _quantized_einsum(eq, x, w, scale):
  """The einsum on the e4m3 input and on ``w`` quantized with the melded kernel's scale,
  built without the 2-D layout, so it checks the layout too."""
  sx = fp8.compute_scale(x, fp8.E4M3)
  xdq = fp8.dequantize(fp8.quantize(x, sx, fp8.E4M3), sx)
  wdq = fp8.dequantize(fp8.quantize(w, scale, fp8.E4M3), scale)
  return jnp.einsum(eq, xdq, wdq, precision="highest")


@pytest.mark.parametrize("eq,kshape,xshape", _EINSUMS, ids=[e[0] for e in _EINSUMS])
def test_melded_einsum_with_zero_delta_is_the_fp8_quantized_einsum(eq, kshape, xshape):
  model = nnx.Sequential(TunixStyleEinsum(eq, kshape, nnx.Rngs(0)))
  w = model.layers[0].w[...]
  x = jax.random.normal(jax.random.key(1), xshape)
  report = fnnx.meld(model, rank=16)
  layer = model.layers[0]
  assert isinstance(layer, fnnx.MeldedEinsum) and layer.shape == kshape
  assert [m.path for m in report.melded] == ["layers/0/kernel"]
  mk = layer.kernel.get_value()
  # The same e4m3 products on both sides (per-tensor scales); only the f32 summation order
  # and where the scales multiply differ: ~in_features * 2^-24 relative to sum |x w|.
  want = _quantized_einsum(eq, x, w, mk.scale)
  got = layer(x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eq,kshape,xshape", _EINSUMS[2:4], ids=[e[0] for e in _EINSUMS[2:4]])
def test_melded_einsum_delta_gradient_is_the_dense_layers_on_the_2d_layout(eq, kshape, xshape):
  model = nnx.Sequential(TunixStyleEinsum(eq, kshape, nnx.Rngs(0)))
  fnnx.meld(model, rank=16)
  layer = model.layers[0]
  mk = layer.kernel.get_value()
  x = jax.random.normal(jax.random.key(1), xshape)
  c = jax.random.normal(jax.random.key(2), layer(x).shape)
  g_einsum = jax.grad(lambda k: jnp.sum(
      melded_einsum(x, k, einsum_layout(eq, kshape)) * c))(mk).delta
  # By hand: flatten x's batch axes, one dense GEMM, then the output axes the equation asks.
  lhs, rest = eq.split(",")
  rhs, out = rest.split("->")
  kept = [d for c_, d in zip(rhs, kshape) if c_ in out]
  def by_hand(k):
    y = falqon_jax.melded_dense(x.reshape(-1, x.shape[-1]), k)
    y = y.reshape(*x.shape[:-1], *kept)  # axes: lhs batch + kept, in kernel order
    got = lhs[:-1] + "".join(c_ for c_ in rhs if c_ in out)
    return jnp.sum(jnp.transpose(y, [got.index(c_) for c_ in out]) * c)
  g_dense = jax.grad(by_hand)(mk).delta
  assert np.any(np.asarray(g_einsum) != 0)
  # Two programs over the same FP8 operands; they differ at most in f32 summation order.
  np.testing.assert_allclose(g_einsum, g_dense, rtol=1e-5, atol=1e-6)


class EinsumAttention(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = TunixStyleEinsum("BTD,DNH->BTNH", (64, 4, 16), rngs, ("fsdp", "tp", None))
    self.k_proj = TunixStyleEinsum("BTD,DNH->BTNH", (64, 2, 16), rngs)
    self.v_proj = TunixStyleEinsum("BTD,DNH->BTNH", (64, 2, 16), rngs)
    self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (4, 16, 64), (64,), rngs=rngs)
    self.experts = nnx.Einsum("EBD,EDF->EBF", (2, 64, 32), rngs=rngs)  # a batched GEMM
    self.mlp = nnx.Linear(64, 64, rngs=rngs)


def test_meld_swaps_einsum_layers_shares_the_qkv_scale_and_names_what_it_skips():
  model = EinsumAttention(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 4, 16))
  bias = model.o_proj.bias[...]
  report = fnnx.meld(model, rank=16)
  assert sorted(m.path.split("/")[0] for m in report.melded) == [
      "k_proj", "mlp", "o_proj", "q_proj", "v_proj"]
  assert dict((m.path, m.shape) for m in report.melded)["q_proj/kernel"] == (64, 64)
  [skip] = report.skipped
  assert skip.path == "experts/kernel" and "batches over kernel axes E" in skip.reason
  assert isinstance(model.experts, nnx.Einsum)
  assert isinstance(model.o_proj, fnnx.MeldedEinsum)
  np.testing.assert_array_equal(model.o_proj.bias[...], bias)
  assert model.o_proj(x).shape == (2, 8, 64)
  # q/k/v are vLLM's fused qkv_proj: one shared per-tensor scale (RECOMMENDED).
  ks = fnnx.kernels(model)
  assert float(ks["q_proj"].scale) == float(ks["k_proj"].scale) == float(ks["v_proj"].scale)
  # The einsum's axis names map onto the 2-D layout: D -> in, (N, H) -> out along N's.
  spec = fnnx.get_partition_spec(nnx.state(model))["q_proj"]["kernel"].get_value()
  assert spec.qweight == jax.sharding.PartitionSpec("tp", "fsdp")
  with pytest.raises(ValueError, match="targeted einsum layer 'experts' cannot be melded"):
    fnnx.meld(EinsumAttention(nnx.Rngs(0)), rank=16, targets=r"experts")


@pytest.mark.parametrize("eq,kshape,why", [
    ("EBD,EDF->EBF", (2, 64, 32), "batches over kernel axes E"),
    ("BD,DF->B", (64, 32), "on one side only"),
    ("BD,D...->B...", (64, 32), "ellipsis in the kernel"),
    ("BD,DF", (64, 32), "explicit two-operand"),
    ("BD,DNH->BNH", (64, 32), "3 kernel labels for a 2-D kernel"),
])
def test_einsum_layout_refuses_what_is_not_one_gemm(eq, kshape, why):
  with pytest.raises(ValueError, match=why):
    einsum_layout(eq, kshape)


def test_meld_counts_einsum_layers_in_optimizer_and_kernels():
  model = nnx.Sequential(TunixStyleEinsum("BTD,DNH->BTNH", (64, 4, 16), nnx.Rngs(0)),
                         lambda h: h.reshape(*h.shape[:-2], -1),
                         nnx.Linear(64, 64, rngs=nnx.Rngs(1)))
  fnnx.meld(model, rank=16)
  assert sorted(fnnx.kernels(model)) == ["layers/0", "layers/2"]
  opt = fnnx.Optimizer(model, optax.adam(1e-1), falqon_jax.REFERENCE)
  x = jax.random.normal(jax.random.key(1), (2, 8, 64))
  q0 = np.asarray(model.layers[0].kernel.get_value().qweight, np.float32)
  grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, fnnx.Melded))(model)
  opt.update(model, grads)
  assert not np.array_equal(np.asarray(model.layers[0].kernel.get_value().qweight, np.float32), q0)
