"""``delta_only`` + ``optax.apply_updates`` + ``merge``: FALQON in ordinary optax trainers.

Bit-exact comparisons with ``proxy_update`` run eagerly: both paths then execute the same
op-by-op programs on the same inputs (one merge path, ``merge_kernels``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import falqon_jax
from falqon_jax import models
from falqon_jax import nnx as fnnx

IN, OUT, RANK, N, STEPS = 64, 96, 16, 32, 4
PRESETS = {
    "recommended": falqon_jax.RECOMMENDED,
    "reference": falqon_jax.REFERENCE,
    # A real top-k after a warmup exercises the merge count.
    "warmup": falqon_jax.RECOMMENDED.replace(top_k=5, topk_warmup_steps=2),
    "every3": falqon_jax.RECOMMENDED.replace(live_delta=True, merge_every=3),
}


def _params(rng, neg_zeros=False):
  k = rng.standard_normal((IN, OUT)) * 0.05
  if neg_zeros:
    k[:4, :8] = -1e-30  # far below e4m3's smallest step: quantizes to -0.0 (byte 0x80)
  p = {"layer": {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.zeros(OUT)},
       "head": {"kernel": jnp.asarray(rng.standard_normal((OUT, 8)), jnp.float32)}}
  melded, _ = falqon_jax.meld(p, rank=RANK, targets=r"layer/kernel$")
  return melded


def _loss(params, x):
  h = falqon_jax.dense(x, params["layer"]["kernel"], params["layer"]["bias"])
  return jnp.mean((h @ params["head"]["kernel"]) ** 2)


def _bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("preset", PRESETS.values(), ids=PRESETS.keys())
def test_optax_apply_updates_then_merge_equals_proxy_update(rng, preset):
  params = _params(rng)
  xs = [jnp.asarray(rng.standard_normal((N, IN)), jnp.float32) for _ in range(STEPS)]
  proxy = falqon_jax.proxy_update(optax.adam(0.05), preset)
  p1, s1 = params, proxy.init(params)
  tx = falqon_jax.delta_only(optax.adam(0.05))
  p2, s2, m2 = params, tx.init(params), falqon_jax.merge_init(params, preset)
  for x in xs:
    updates, s1 = proxy.update(jax.grad(_loss)(p1, x), s1, p1)
    p1 = falqon_jax.apply_updates(p1, updates)
    updates, s2 = tx.update(jax.grad(_loss)(p2, x), s2, p2)
    p2 = optax.apply_updates(p2, updates)
    p2, m2 = falqon_jax.merge(p2, m2, preset)
    assert _bytes(p1) == _bytes(p2)
  assert int(s1.count) == int(m2.count) == STEPS
  assert _bytes(p1["head"]) == _bytes(params["head"])  # only deltas train
  assert _bytes(p1["layer"]["kernel"].qweight) != _bytes(params["layer"]["kernel"].qweight)


def test_delta_only_updates_leave_fp8_bytes_untouched(rng):
  """Only the deltas move under optax.apply_updates; -0.0 FP8 bytes included."""
  params = _params(rng, neg_zeros=True)
  mk = params["layer"]["kernel"]
  assert np.any(np.asarray(mk.qweight).view(np.uint8) == 0x80)
  x = jnp.asarray(rng.standard_normal((N, IN)), jnp.float32)
  grads = jax.grad(_loss)(params, x)
  tx = falqon_jax.delta_only(optax.adamw(0.05, weight_decay=0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  for apply in (optax.apply_updates, jax.jit(optax.apply_updates)):
    new = apply(params, updates)
    got = new["layer"]["kernel"]
    assert np.asarray(got.qweight).tobytes() == np.asarray(mk.qweight).tobytes()
    assert np.asarray(got.scale).tobytes() == np.asarray(mk.scale).tobytes()
    assert _bytes(new["head"]) == _bytes(params["head"])
    assert np.any(np.asarray(got.delta) != 0)
  # Why -0.0: a plain Adam gives NaN for a zero float8 gradient (its eps underflows), and
  # a +0.0 update (optax.set_to_zero) turns -0.0 bytes into +0.0.
  plain = optax.adam(0.05)
  u, _ = plain.update(grads, plain.init(params), params)
  assert np.all(np.isnan(np.asarray(u["layer"]["kernel"].qweight, np.float32)))
  zeroed = optax.apply_updates(params, optax.set_to_zero().update(grads, None)[0])
  assert (np.asarray(zeroed["layer"]["kernel"].qweight).tobytes()
          != np.asarray(mk.qweight).tobytes())


def _tiny_model():
  model = models.CausalLM(models.tiny_config(num_hidden_layers=1), rngs=nnx.Rngs(0))
  fnnx.meld(model, rank=8)
  return model


@pytest.mark.parametrize("preset", [falqon_jax.RECOMMENDED, falqon_jax.REFERENCE],
                         ids=["recommended", "reference"])
def test_nnx_optimizer_then_merge_equals_falqon_optimizer(rng, preset):
  ours, theirs = _tiny_model(), _tiny_model()
  ids = [jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32) for _ in range(3)]
  # One jitted gradient program for both models: bit-identical models give identical grads.
  grad = nnx.jit(nnx.grad(lambda m, t: jnp.mean(m(t) ** 2),
                          argnums=nnx.DiffState(0, fnnx.Melded)))
  # What a user writes: nnx.Optimizer on the melded state, then a merge of that state.
  opt = nnx.Optimizer(ours, falqon_jax.delta_only(optax.adam(1e-2)), wrt=fnnx.Melded)
  merge_state = falqon_jax.merge_init(nnx.state(ours, fnnx.Melded), preset)
  reference = fnnx.Optimizer(theirs, optax.adam(1e-2), preset)
  frozen = nnx.All(nnx.Param, nnx.Not(fnnx.Melded))  # Melded is an nnx.LoRAParam
  params_before = _bytes(nnx.state(ours, frozen))
  melded_before = _bytes(nnx.state(ours, fnnx.Melded))
  for t in ids:
    opt.update(ours, grad(ours, t))
    melded, merge_state = falqon_jax.merge(nnx.state(ours, fnnx.Melded), merge_state, preset)
    nnx.update(ours, melded)
    reference.update(theirs, grad(theirs, t))
    assert _bytes(nnx.state(ours)) == _bytes(nnx.state(theirs))
  assert int(merge_state.count) == len(ids)
  assert _bytes(nnx.state(ours, frozen)) == params_before  # only melded kernels train
  assert _bytes(nnx.state(ours, fnnx.Melded)) != melded_before


def test_when_gates_the_merge_as_proxy_update_accumulation_does(rng):
  """``when=MultiSteps.has_updated`` merges only on sync steps, like accumulation_steps."""
  params = _params(rng)
  xs = [jnp.asarray(rng.standard_normal((N, IN)), jnp.float32) for _ in range(4)]
  proxy = falqon_jax.proxy_update(optax.adam(0.05), accumulation_steps=2)
  p1, s1 = params, proxy.init(params)
  multi = optax.MultiSteps(optax.adam(0.05), every_k_schedule=2)
  tx = falqon_jax.delta_only(multi)
  p2, s2, m2 = params, tx.init(params), falqon_jax.merge_init(params)
  for i, x in enumerate(xs):
    updates, s1 = proxy.update(jax.grad(_loss)(p1, x), s1, p1)
    p1 = falqon_jax.apply_updates(p1, updates)
    updates, s2 = tx.update(jax.grad(_loss)(p2, x), s2, p2)
    p2 = optax.apply_updates(p2, updates)
    p2, m2 = falqon_jax.merge(p2, m2, when=multi.has_updated(s2))
    assert int(m2.count) == (i + 1) // 2
    assert _bytes(p1) == _bytes(p2)


def test_merge_under_jit_with_donation(rng):
  params = _params(rng)
  x = jnp.asarray(rng.standard_normal((N, IN)), jnp.float32)
  tx = falqon_jax.delta_only(optax.adam(0.05))
  opt_state, merge_state = tx.init(params), falqon_jax.merge_init(params)

  @jax.jit
  def step(params, opt_state, merge_state):
    updates, opt_state = tx.update(jax.grad(_loss)(params, x), opt_state, params)
    params, merge_state = falqon_jax.merge(optax.apply_updates(params, updates), merge_state)
    return params, opt_state, merge_state

  old = _bytes(params["layer"]["kernel"].qweight)
  donated = jax.jit(step.__wrapped__, donate_argnums=(0, 1, 2))
  new, _, merge_state = donated(jax.tree_util.tree_map(jnp.copy, params), opt_state,
                                merge_state)
  assert int(merge_state.count) == 1
  assert not np.any(np.asarray(new["layer"]["kernel"].delta))  # every row merged, reset
  assert _bytes(new["layer"]["kernel"].qweight) != old


def test_merge_misuse_is_a_one_line_error(rng):
  params = _params(rng)
  state = falqon_jax.merge_init(params, falqon_jax.REFERENCE)  # nearest: no key
  with pytest.raises(falqon_jax.UserInputError, match="needs a key"):
    falqon_jax.merge(params, state)  # RECOMMENDED rounds stochastically
  with pytest.raises(falqon_jax.UserInputError, match="no MeldedKernel"):
    falqon_jax.merge_init({"w": jnp.ones((4, 4))})
  with pytest.raises(falqon_jax.UserInputError, match="top_k=500 exceeds"):
    falqon_jax.merge(params, state, falqon_jax.REFERENCE, top_k=500)
  with pytest.raises(TypeError, match="MergeState"):
    falqon_jax.merge(params, (0, None), falqon_jax.REFERENCE)
  with pytest.raises(falqon_jax.UserInputError, match="when must be a bool scalar"):
    falqon_jax.merge(params, state, falqon_jax.REFERENCE, when=jnp.ones(2, bool))
  with pytest.raises(TypeError, match="unknown FALQON option 'topk'"):
    falqon_jax.merge(params, state, topk=3)


def test_merge_every_k_steps_accumulates_exactly_between_merges(rng):
  """merge_every=3: steps 3 and 6 merge every row and reset; the others only add the
  optimizer's increments to the live ΔBuffer, bit for bit."""
  opts = falqon_jax.RECOMMENDED.replace(live_delta=True, merge_every=3)
  k = rng.standard_normal((IN, OUT)) * 0.05
  p = {"layer": {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.zeros(OUT)},
       "head": {"kernel": jnp.asarray(rng.standard_normal((OUT, 8)), jnp.float32)}}
  params, _ = falqon_jax.meld(p, rank=RANK, targets=r"layer/kernel$", options=opts)
  assert params["layer"]["kernel"].live_delta
  tx = falqon_jax.delta_only(optax.sgd(0.05))
  state, merge_state = tx.init(params), falqon_jax.merge_init(params, opts)
  for step in range(1, 7):
    x = jnp.asarray(rng.standard_normal((N, IN)), jnp.float32)
    updates, state = tx.update(jax.grad(_loss)(params, x), state, params)
    stepped = optax.apply_updates(params, updates)
    params, merge_state = falqon_jax.merge(stepped, merge_state, opts)
    before, after = stepped["layer"]["kernel"], params["layer"]["kernel"]
    assert int(merge_state.count) == step
    if step % 3:
      assert _bytes(after) == _bytes(before)  # nothing merged, the delta kept
      assert float(jnp.abs(after.delta).max()) > 0
    else:
      assert after.qweight.tobytes() != before.qweight.tobytes()
      assert float(jnp.abs(after.delta).max()) == 0.0


def test_merge_every_needs_live_delta():
  with pytest.raises(ValueError, match="merge_every=4 needs live_delta=True"):
    falqon_jax.RECOMMENDED.replace(merge_every=4)
  for bad in (0, -1, 2.0, True):
    with pytest.raises((ValueError, TypeError), match="merge_every must be a positive int"):
      falqon_jax.RECOMMENDED.replace(live_delta=True, merge_every=bad)
  with pytest.raises(TypeError, match="live_delta must be a bool"):
    falqon_jax.FalqonOptions(live_delta=1)
  assert not falqon_jax.REFERENCE.live_delta and falqon_jax.REFERENCE.merge_every == 1
