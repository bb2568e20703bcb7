"""falqon_jax.linen: melded HF Flax models (Llama, Mistral, Gemma, GPT-2) via interception."""

import pytest

pytest.importorskip("transformers")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import falqon_jax
import falqon_jax.hf as fh
from falqon_jax import fp8
from falqon_jax import linen as fl

FAMILIES = ["llama", "mistral", "gemma", "gpt2"]
RANK = 16


def _batch(seed=0, b=4, t=16):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 256)


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


def _comparing_interceptor(errors):
  """Runs every melded layer both ways on the same input; records the relative error."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and module.scope is not None
        and module.has_variable("params", "kernel")
        and isinstance(module.get_variable("params", "kernel"), falqon_jax.MeldedKernel)):
      want = _reference(module, module.get_variable("params", "kernel"), args[0])
      got = fl._interceptor(next_fun, args, kwargs, context)
      errors.append(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      return got
    return next_fun(*args, **kwargs)

  return interceptor


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  model = fh.build_model(fh.tiny_config(request.param))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
  melded, report = fh.meld_params(model, params, rank=RANK)
  return request.param, model, params, melded, report


@pytest.fixture(scope="module")
def trained(family):
  """30 jitted FALQON steps; one compiled step also returns the gradients it used."""
  _, model, _, melded, _ = family
  loss_fn = _loss_fn(model)
  tx = falqon_jax.proxy_update(optax.adam(3e-2))
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


def _loss_fn(model):
  def loss(params, ids):
    with fl.melded():
      logits = model(ids[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  return loss


def test_default_targets_are_projections(family):
  name, _, _, _, report = family
  paths = [m.path for m in report.melded]
  assert len(paths) == {"gpt2": 8}.get(name, 14)
  assert not any("lm_head" in p or "embed" in p or "wte" in p for p in paths)


def test_zero_delta_matches_dequantized_backbone(family):
  name, model, _, melded, _ = family
  ids = _batch()

  @jax.jit
  def run(params, ids):
    errors = []
    with nn.intercept_methods(_comparing_interceptor(errors)):
      got = model(ids, params=params).logits
    # and the whole model is an FP8 approximation of the unmelded one
    ref = model(ids, params=falqon_jax.unmeld(params)).logits
    return got, jnp.stack(errors), ref

  got, errors, ref = run(melded, ids)
  # Layer by layer, on identical inputs, melded == dequantized backbone to f32 rounding.
  assert len(errors) == {"gpt2": 8}.get(name, 14)
  assert float(jnp.max(errors)) < 1e-5, errors
  scale = float(jnp.max(jnp.abs(ref)))
  assert float(jnp.max(jnp.abs(got - ref))) < 0.1 * scale


def _reference_interceptor(next_fun, args, kwargs, context):
  """Every melded layer computed by _reference instead of melded_dense."""
  module = context.module
  if (context.method_name == "__call__" and module.scope is not None
      and module.has_variable("params", "kernel")
      and isinstance(module.get_variable("params", "kernel"), falqon_jax.MeldedKernel)):
    return _reference(module, module.get_variable("params", "kernel"), args[0])
  return next_fun(*args, **kwargs)


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
      got = model(ids, params=params).logits
    with nn.intercept_methods(_reference_interceptor):
      want = model(ids, params=params).logits
    return got, want

  got, want = run(melded, ids)
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert err < 1e-4, (name, err)


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
  frozen = [x for x in jax.tree_util.tree_leaves(params) if x.dtype != jnp.float8_e4m3fn]
  assert len(frozen) > 0


@pytest.mark.slow
def test_remat_through_hf_model(family, trained):
  name, model, _, melded, _ = family
  if name != "llama":
    pytest.skip("one family is enough: the interception is the same")
  g0 = trained[2]
  g1 = jax.jit(jax.grad(jax.checkpoint(_loss_fn(model))))(melded, _batch(1))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)


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
  import re

  model = fh.build_model(fh.tiny_config("llama"))
  params = model.init_weights(jax.random.key(0), (1, 8))
  melded, report = fh.meld_params(model, params, rank=RANK)
  layers = model.config.num_hidden_layers
  assert len(report.melded) == 7 * layers

  def forward(p, ids):
    with fl.melded():
      return model(ids, params=p).logits

  text = jax.jit(forward).lower(melded, _batch()).compile().as_text()
  # One per-tensor amax (a reduce to an f32 scalar) per distinct input: the attention
  # input, o_proj's, the MLP input and down_proj's. Seven would mean no sharing.
  assert len(re.findall(r"= f32\[\] reduce\(", text)) == 4 * layers


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
  # Same math; XLA may fuse (and so sum) the recomputed program in another f32 order
  # (jax 0.11.2 does), hence f32-rounding tolerances rather than equal bits.
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


def test_gpt2_conv1d_melded_without_layout_is_refused():
  model = fh.build_model(fh.tiny_config("gpt2"))
  params = model.init_weights(jax.random.key(0), (1, 8))
  wrong, _ = falqon_jax.meld(params, rank=16)  # treats (out, in) as (in, out)
  with pytest.raises(TypeError, match="FlaxConv1D .* transposed=falqon_jax.linen.GPT2_CONV1D"):
    with fl.melded():
      model(jnp.zeros((1, 8), jnp.int32), params=wrong)


def test_gpt2_unmeld_restores_layout():
  model = fh.build_model(fh.tiny_config("gpt2"))
  params = model.init_weights(jax.random.key(0), (1, 8))
  melded, _ = fh.meld_params(model, params, rank=16)
  back = falqon_jax.unmeld(melded)
  assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, params)
  k = params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  kb = back["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert float(jnp.max(jnp.abs(k - kb))) < 0.1 * float(jnp.max(jnp.abs(k)))


def test_unsupported_module_with_melded_kernel_is_refused():
  model = nn.DenseGeneral(32)
  params = model.init(jax.random.key(0), jnp.ones((2, 64)))["params"]
  melded, _ = fl.meld(params, rank=16)
  with pytest.raises(TypeError, match="DenseGeneral .* only\\s+nn.Dense"):
    with fl.melded():
      model.apply({"params": melded}, jnp.ones((2, 64)))
