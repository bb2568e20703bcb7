"""falqon_jax.linen: users' own linen models, melded via interception.

Two small decoders defined here stand in for a user's model: a Llama-style one whose
projections are ``nn.Dense`` (q/k/v/o, gated MLP; optionally Qwen-2-style q/k/v biases)
and a GPT-2-style one whose projections are a ``FlaxConv1D`` storing its kernel
``(out, in)`` (the layout of transformers 4.x's Flax GPT-2).
"""

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import falqon_jax
from falqon_jax import fp8
from falqon_jax import linen as fl

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 256, 64, 2, 4, 2
FAMILIES = ["llama", "qwen2", "gpt2"]
PER_LAYER = {"llama": 7, "qwen2": 7, "gpt2": 4}  # projections per decoder layer
RANK = 16


def _attend(q, k, v, kv_heads):
  b, t, _ = q.shape
  q = q.reshape(b, t, HEADS, -1)
  k, v = (a.reshape(b, t, kv_heads, -1) for a in (k, v))
  return jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, -1)


class _Attention(nn.Module):
  bias: bool = False

  @nn.compact
  def __call__(self, x):
    kv = HIDDEN * KV_HEADS // HEADS
    # Nonzero biases, so that a melded layer that dropped its bias shows.
    dense = lambda n, name: nn.Dense(n, use_bias=self.bias, bias_init=nn.initializers.normal(0.3),
                                     name=name)
    q, k, v = dense(HIDDEN, "q_proj")(x), dense(kv, "k_proj")(x), dense(kv, "v_proj")(x)
    return nn.Dense(HIDDEN, use_bias=False, name="o_proj")(_attend(q, k, v, KV_HEADS))


class _GatedMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(2 * HIDDEN, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(2 * HIDDEN, use_bias=False, name="up_proj")(x)
    return nn.Dense(HIDDEN, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class _LlamaLayer(nn.Module):
  bias: bool = False

  @nn.compact
  def __call__(self, x):
    x = x + _Attention(self.bias, name="self_attn")(nn.RMSNorm(name="input_layernorm")(x))
    return x + _GatedMLP(name="mlp")(nn.RMSNorm(name="post_attention_layernorm")(x))


class TinyLlama(nn.Module):
  """Embedding, decoder layers of nn.Dense projections, an untied nn.Dense LM head."""

  bias: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, ids):
    layer = nn.remat(_LlamaLayer) if self.remat else _LlamaLayer
    x = nn.Embed(VOCAB, HIDDEN, name="embed_tokens")(ids)
    for i in range(LAYERS):
      x = layer(self.bias, name=f"layers_{i}")(x)
    x = nn.RMSNorm(name="norm")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


class FlaxConv1D(nn.Module):
  """transformers 4.x's Flax GPT-2 Conv1D: a dense layer whose kernel is ``(out, in)``."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    inputs = jnp.asarray(inputs, self.dtype)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-1, out_axis=-2)
    kernel = self.param("kernel", init, (self.features, inputs.shape[-1]))
    y = inputs @ jnp.asarray(kernel, self.dtype).T
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", nn.initializers.normal(0.3), (self.features,)),
                          self.dtype)
    return y


class _GPT2Attention(nn.Module):

  @nn.compact
  def __call__(self, x):
    q, k, v = jnp.split(FlaxConv1D(3 * HIDDEN, name="c_attn")(x), 3, axis=-1)
    return FlaxConv1D(HIDDEN, name="c_proj")(_attend(q, k, v, HEADS))


class _GPT2MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return FlaxConv1D(HIDDEN, name="c_proj")(nn.gelu(FlaxConv1D(4 * HIDDEN, name="c_fc")(x)))


class _GPT2Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x + _GPT2Attention(name="attn")(nn.LayerNorm(name="ln_1")(x))
    return x + _GPT2MLP(name="mlp")(nn.LayerNorm(name="ln_2")(x))


class TinyGPT2(nn.Module):
  """Token and position embeddings, Conv1D blocks, the LM head tied to ``wte``."""

  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(VOCAB, HIDDEN, name="wte")
    x = wte(ids) + nn.Embed(64, HIDDEN, name="wpe")(jnp.arange(ids.shape[1]))
    for i in range(LAYERS):
      x = _GPT2Block(name=f"h_{i}")(x)
    return wte.attend(nn.LayerNorm(name="ln_f")(x))


def _build(name):
  return TinyGPT2() if name == "gpt2" else TinyLlama(bias=name == "qwen2")


def _batch(seed=0, b=4, t=16):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


@functools.lru_cache(maxsize=None)
def _init(name):
  """``(model, params, melded, report)`` of a family; GPT-2's Conv1D kernels are (out, in)."""
  model = _build(name)
  params = jax.jit(model.init)(jax.random.key(0), _batch())["params"]
  transposed = fl.GPT2_CONV1D if name == "gpt2" else None
  return model, params, *fl.meld(params, rank=RANK, transposed=transposed)


def _reference(module, mk, x):
  """fp32 math on the dequantized backbone, with x quantized as melded_dense does."""
  x = jnp.asarray(x, module.dtype or jnp.float32)
  sx = fp8.compute_scale(x, fp8.E4M3)
  xdq = fp8.dequantize(fp8.quantize(x, sx, fp8.E4M3), sx)
  w = falqon_jax.MeldedKernel.backbone(mk)  # (in, out) for both layouts
  y = jnp.dot(xdq, w, precision=jax.lax.Precision.HIGHEST)
  if module.has_variable("params", "bias"):
    y = y + module.get_variable("params", "bias")
  return y.astype(x.dtype)


def _melded_kernel_of(context):
  module = context.module
  if (context.method_name == "__call__" and module.scope is not None
      and module.has_variable("params", "kernel")):
    kernel = module.get_variable("params", "kernel")
    if isinstance(kernel, falqon_jax.MeldedKernel):
      return kernel
  return None


def _comparing_interceptor(errors):
  """Runs every melded layer both ways on the same input; records the relative error."""

  def interceptor(next_fun, args, kwargs, context):
    mk = _melded_kernel_of(context)
    if mk is None:
      return next_fun(*args, **kwargs)
    want = _reference(context.module, mk, args[0])
    got = fl._interceptor(next_fun, args, kwargs, context)
    errors.append(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    return got

  return interceptor


def _reference_interceptor(next_fun, args, kwargs, context):
  """Every melded layer computed by _reference instead of melded_dense."""
  mk = _melded_kernel_of(context)
  if mk is None:
    return next_fun(*args, **kwargs)
  return _reference(context.module, mk, args[0])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  return request.param, *_init(request.param)


def _loss_fn(model):
  def loss(params, ids):
    with fl.melded():
      logits = model.apply({"params": params}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  return loss


@pytest.fixture(scope="module")
def trained(family):
  """30 jitted FALQON steps; one compiled step also returns the gradients it used."""
  _, model, _, melded, _ = family
  loss_fn = _loss_fn(model)
  tx = falqon_jax.proxy_update(optax.adam(3e-2), falqon_jax.REFERENCE)
  ids = _batch(1)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, state = tx.update(grads, state, params)
    return falqon_jax.apply_updates(params, updates), state, loss, grads

  params, state = melded, tx.init(melded)
  losses, first_grads = [], None
  for _ in range(30):
    params, state, loss, grads = step(params, state)
    first_grads = grads if first_grads is None else first_grads
    losses.append(float(loss))
  return params, losses, first_grads


def test_default_targets_are_projections(family):
  name, _, _, _, report = family
  paths = [m.path for m in report.melded]
  assert len(paths) == PER_LAYER[name] * LAYERS
  assert not any(re.search(r"lm_head|embed|wte|wpe", p) for p in paths), paths
  skipped = {s.path: s.reason for s in report.skipped}
  if name != "gpt2":  # GPT-2's head is tied to wte: no kernel of its own
    assert "LM head" in skipped["lm_head/kernel"]


def test_zero_delta_matches_dequantized_backbone(family):
  name, model, _, melded, _ = family
  ids = _batch()

  @jax.jit
  def run(params, ids):
    errors = []
    with nn.intercept_methods(_comparing_interceptor(errors)):
      got = model.apply({"params": params}, ids)
    # and the whole model is an FP8 approximation of the unmelded one
    ref = model.apply({"params": falqon_jax.unmeld(params)}, ids)
    return got, jnp.stack(errors), ref

  got, errors, ref = run(melded, ids)
  assert len(errors) == PER_LAYER[name] * LAYERS
  # Layer by layer, on identical inputs: the same FP8 input, the same backbone values, f32
  # sums of at most 256 products in another order (~1e-7 relative each).
  assert float(jnp.max(errors)) < 1e-5, errors
  # e4m3 keeps 3 mantissa bits: ~2^-4/sqrt(3) = 4% RMS rounding on each of the weight and
  # the input, ~5% per matmul, compounding over the layers and the gated product (~14%
  # seen). A wrong layout or a dropped bias would be off by ~100%.
  err = jnp.sqrt(jnp.mean((got - ref) ** 2)) / jnp.std(ref)
  assert float(err) < 0.25, err


def test_zero_delta_whole_model_matches_dequantized_backbone(family):
  """End to end: the melded model == the same model on the dequantized FP8 backbone.

  Both quantize each melded layer's input to e4m3 (the method's forward); the reference
  then multiplies by the dequantized backbone in f32 HIGHEST, with no FP8 GEMM. Nothing
  is shared between the two runs but the params.
  """
  name, model, _, melded, _ = family
  ids = _batch(2)

  @jax.jit
  def run(params, ids):
    with fl.melded():
      got = model.apply({"params": params}, ids)
    with nn.intercept_methods(_reference_interceptor):
      want = model.apply({"params": params}, ids)
    return got, want

  got, want = run(melded, ids)
  # Only the GEMMs' f32 summation order differs. Where that moves a later layer's
  # per-tensor amax, that layer's whole input is rounded on another e4m3 grid, which
  # re-rolls its FP8 rounding: a fraction of the ~14% FP8 error (1.5% seen). A misrouted
  # layer (dropped bias, wrong layout, a plain module changed) is off by 50% or more.
  err = jnp.sqrt(jnp.mean((got - want) ** 2)) / jnp.std(want)
  assert float(err) < 5e-2, (name, err)


@pytest.mark.slow
def test_gradients_reach_only_delta(trained):
  grads = trained[2]
  kernels = [g for g in jax.tree_util.tree_leaves(grads, is_leaf=fl.is_melded) if fl.is_melded(g)]
  assert len(kernels) > 0
  for g in kernels:
    assert not np.any(np.asarray(g.qweight, np.float32))
    assert not np.any(np.asarray(g.scale))
    assert np.all(np.isfinite(g.delta)) and np.any(g.delta != 0)
  # the optimizer sees only deltas
  deltas = jax.tree_util.tree_leaves(falqon_jax.delta_tree(grads))
  assert len(deltas) == len(kernels)


@pytest.mark.slow
def test_loss_falls_over_30_jitted_steps(trained):
  params, losses, _ = trained
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.05, losses
  melded = [k for k in jax.tree_util.tree_leaves(params, is_leaf=fl.is_melded)
            if fl.is_melded(k)]
  assert all(k.qweight.dtype == jnp.float8_e4m3fn for k in melded)
  frozen = [x for x in jax.tree_util.tree_leaves(params) if x.dtype != jnp.float8_e4m3fn]
  assert len(frozen) > 0


@pytest.mark.slow
def test_remat_through_a_whole_model():
  """``jax.checkpoint`` around the loss and ``nn.remat`` on each decoder layer recompute
  the melded layers in the backward pass and give the same delta gradients."""
  model, _, melded, _ = _init("llama")
  ids = _batch(1)
  g0 = jax.jit(jax.grad(_loss_fn(model)))(melded, ids)
  g1 = jax.jit(jax.grad(jax.checkpoint(_loss_fn(model))))(melded, ids)
  g2 = jax.jit(jax.grad(_loss_fn(TinyLlama(remat=True))))(melded, ids)
  d0, d1, d2 = (falqon_jax.delta_tree(g) for g in (g0, g1, g2))
  # Remat recomputes the same ops in another program: f32 reassociation (~1e-7 relative per
  # op, a few hundred in series) stays far below 2e-3 of the largest entry. So does a rare
  # e4m3 flip of one recomputed input element: 1/8 of one of >= 64 products in one of the
  # 4*15 summed tokens. A missing or wrong path would differ by O(1).
  for a, b, c in zip(*map(jax.tree_util.tree_leaves, (d0, d1, d2))):
    a = np.asarray(a, np.float32)
    assert np.abs(a).max() > 0
    tol = dict(rtol=0, atol=2e-3 * float(np.abs(a).max()))
    np.testing.assert_allclose(np.asarray(b, np.float32), a, **tol)
    np.testing.assert_allclose(np.asarray(c, np.float32), a, **tol)


class _Chain(nn.Module):
  """Three linear Dense layers, optionally each under nn.remat."""

  remat: bool = False

  @nn.compact
  def __call__(self, x):
    dense = nn.remat(nn.Dense) if self.remat else nn.Dense
    for i, width in enumerate((128, 96, 64)):
      x = dense(width, name=f"d{i}")(x)
    return x


def _residuals(fn, *args):
  from jax._src.ad_checkpoint import saved_residuals

  return [(tuple(a.shape), why) for a, why in saved_residuals(fn, *args)]


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="counts reductions in XLA CPU's HLO (GPUs split them in stages)")
def test_projections_sharing_an_input_quantize_it_once():
  """q/k/v (and gate/up) read the same x: XLA's CSE leaves one amax pass and one FP8
  cast for them, the "quantize once" of a fused kernel, with no code for it here."""
  model, _, melded, report = _init("llama")
  assert len(report.melded) == 7 * LAYERS

  def forward(p, ids):
    with fl.melded():
      return model.apply({"params": p}, ids)

  text = jax.jit(forward).lower(melded, _batch()).compile().as_text()
  # One per-tensor amax (a reduce to an f32 scalar) per distinct input: the attention
  # input, o_proj's, the MLP input and down_proj's. Seven would mean no sharing.
  assert len(re.findall(r"= f32\[\] reduce\(", text)) == 4 * LAYERS


@pytest.mark.slow
def test_remat_saves_only_ax_and_scales():
  x = jax.random.normal(jax.random.key(1), (32, 64))
  params = _Chain().init(jax.random.key(0), x)["params"]
  params, _ = fl.meld(params, rank=RANK)

  def loss(p, x, remat=False):
    with fl.melded():
      return jnp.sum(_Chain(remat=remat).apply({"params": p}, x) ** 2) / 2

  # Without remat each melded layer saves exactly Ax (N x rank): never x, never y.
  saved = [s for s, why in _residuals(lambda p: loss(p, x), params)
           if "argument" not in why and "literal" not in why]
  # The final y**2 needs y (32 x 64); everything else is Ax or a scalar.
  assert all(s in ((32, RANK), (), (32, 64)) for s in saved), saved
  assert saved.count((32, RANK)) == 3
  # Under nn.remat / jax.checkpoint the layers recompute; gradients are unchanged.
  g0 = jax.jit(jax.grad(loss))(params, x)
  g1 = jax.jit(jax.grad(lambda p, x: loss(p, x, remat=True)))(params, x)
  g2 = jax.jit(jax.grad(jax.checkpoint(loss)))(params, x)
  # Same math; XLA may fuse (and so sum) the recomputed program in another f32 order,
  # hence f32-rounding tolerances rather than equal bits.
  for a, b, c in zip(*map(jax.tree_util.tree_leaves, (g0, g1, g2))):
    a = np.asarray(a, np.float32)
    tol = dict(rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))
    np.testing.assert_allclose(np.asarray(b, np.float32), a, **tol)
    np.testing.assert_allclose(np.asarray(c, np.float32), a, **tol)
  remat_saved = [s for s, why in _residuals(jax.checkpoint(loss), params, x)
                 if "argument" not in why and "literal" not in why]
  assert remat_saved == [], remat_saved


def test_dense_bias_and_dtype():
  model = nn.Dense(48, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 32))
  params = model.init(jax.random.key(0), x)["params"]
  params = dict(params, bias=jnp.arange(48.0))
  melded, _ = fl.meld(params, rank=16)
  with fl.melded():
    y = model.apply({"params": melded}, x)
  assert y.dtype == jnp.bfloat16
  want = falqon_jax.melded_dense(x.astype(jnp.bfloat16), melded["kernel"], melded["bias"])
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_unmelded_modules_run_unchanged():
  model = nn.Dense(32)
  x = jnp.ones((2, 64))
  params = model.init(jax.random.key(0), x)
  with fl.melded():
    y = model.apply(params, x)
  np.testing.assert_array_equal(y, model.apply(params, x))


def test_unmelded_layers_of_a_partly_melded_model_run_unchanged():
  """Layers that ``targets`` left out keep their plain kernels and run as written."""
  model, params, _, _ = _init("qwen2")
  ids = _batch()
  # Only the last projection: no FP8 layer after it can amplify a rounding difference.
  melded, report = fl.meld(params, rank=RANK, targets=rf"layers_{LAYERS - 1}/mlp/down_proj")
  assert len(report.melded) == 1

  @jax.jit
  def run(melded, params, ids):
    with fl.melded():
      got = model.apply({"params": melded}, ids)
    with nn.intercept_methods(_reference_interceptor):
      want = model.apply({"params": melded}, ids)
    return got, want, model.apply({"params": params}, ids)

  got, want, plain = run(melded, params, ids)
  # One f32 sum of 128 products in another order (~1e-7 relative), then a norm and the
  # LM head; a plain Dense routed through FP8 would be off by ~5%.
  assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-5
  assert float(jnp.max(jnp.abs(got - plain)) / jnp.max(jnp.abs(plain))) > 1e-3  # FP8 ran


def test_gpt2_conv1d_melded_without_layout_is_refused():
  model, params, _, _ = _init("gpt2")
  ids = jnp.zeros((1, 8), jnp.int32)
  wrong, _ = falqon_jax.meld(params, rank=16)  # treats (out, in) as (in, out)
  with pytest.raises(TypeError, match="FlaxConv1D .* transposed=falqon_jax.linen.GPT2_CONV1D"):
    with fl.melded():
      model.apply({"params": wrong}, ids)


def test_gpt2_unmeld_restores_layout():
  _, params, melded, _ = _init("gpt2")
  c_attn = melded["h_0"]["attn"]["c_attn"]["kernel"]
  assert isinstance(c_attn, fl.TransposedMeldedKernel) and c_attn.shape == (3 * HIDDEN, HIDDEN)
  back = falqon_jax.unmeld(melded)
  assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, params)
  k = params["h_0"]["attn"]["c_attn"]["kernel"]
  kb = back["h_0"]["attn"]["c_attn"]["kernel"]
  # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself (plus subnormals far
  # below the max); a transposed copy would differ by O(max).
  assert float(jnp.max(jnp.abs(k - kb))) < 0.1 * float(jnp.max(jnp.abs(k)))


def test_transposed_kernel_in_a_dense_is_refused():
  model = nn.Dense(32)
  params = model.init(jax.random.key(0), jnp.ones((2, 64)))["params"]
  melded, _ = fl.meld(params, rank=16, transposed=r"kernel$")
  with pytest.raises(TypeError, match="nn.Dense .* TransposedMeldedKernel.*without `transposed`"):
    with fl.melded():
      model.apply({"params": melded}, jnp.ones((2, 64)))


def test_unsupported_module_with_melded_kernel_is_refused():
  model = nn.DenseGeneral(32)
  params = model.init(jax.random.key(0), jnp.ones((2, 64)))["params"]
  melded, _ = fl.meld(params, rank=16)
  with pytest.raises(TypeError, match="DenseGeneral .* only\\s+nn.Dense"):
    with fl.melded():
      model.apply({"params": melded}, jnp.ones((2, 64)))
