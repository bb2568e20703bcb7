import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import falqon_jax
import oracle

IN, OUT, RANK = 64, 96, 16
REF = falqon_jax.REFERENCE  # the tests below check the reference's semantics and variants


def _params(rng, extra=True):
  k = jnp.asarray(rng.standard_normal((IN, OUT)) * 0.05, jnp.float32)
  p = {"layer": {"kernel": k, "bias": jnp.zeros(OUT)}}
  if extra:
    p["head"] = {"kernel": jnp.asarray(rng.standard_normal((OUT, 10)), jnp.float32)}
  melded, _ = falqon_jax.meld(p, rank=RANK, targets=r"layer/kernel$")
  return melded


def _grads(params, delta_grad, other=0.0):
  """A gradient tree shaped like jax.grad's, with a chosen delta gradient."""
  def g(x):
    if isinstance(x, falqon_jax.MeldedKernel):
      return x.replace(qweight=jnp.zeros_like(x.qweight), scale=jnp.zeros_like(x.scale),
                       delta=jnp.asarray(delta_grad, jnp.float32))
    return jnp.full_like(x, other)
  return jax.tree_util.tree_map(g, params, is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel))


def _step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return falqon_jax.apply_updates(params, updates), state


def _changed_rows(a, b):
  return np.flatnonzero(np.any(np.asarray(a.qweight).view(np.uint8) != np.asarray(b.qweight).view(np.uint8), axis=1))


def test_one_step_adam_then_merge_of_the_largest_rows(rng):
  params = _params(rng)
  mk = params["layer"]["kernel"]
  g = rng.standard_normal((OUT, RANK)).astype(np.float32)
  g[:, RANK // 2:] = 0.0
  g[5] = rng.standard_normal(RANK) + 3.0  # the only full row: the largest L1 after Adam
  lr, eps = 0.05, 1e-8
  tx = falqon_jax.proxy_update(optax.adam(lr, eps=eps), REF, top_k=1, reset="merged")
  state = tx.init(params)
  new, state = _step(tx, params, state, _grads(params, g))
  b = -lr * g / (np.abs(g) + eps)  # Adam's bias-corrected first step
  d = np.asarray(new["layer"]["kernel"].delta)
  keep = np.arange(OUT) != 5
  # f32 bias correction (1 - 0.999 in f32) makes this approximate at ~1e-5.
  np.testing.assert_allclose(d[keep], b[keep], rtol=2e-5)
  assert not np.any(d[5])
  assert list(_changed_rows(new["layer"]["kernel"], mk)) == [5]
  raw = np.asarray(mk.qweight).astype(np.float64)
  want = raw[5] + b[5].astype(np.float64) @ raw[OUT:]
  got = np.asarray(new["layer"]["kernel"].qweight).astype(np.float64)[5]
  assert np.all(np.abs(got - want) <= np.maximum(np.abs(got) * 2.0**-4, 2.0**-10) + 1e-6)
  adam = state.inner_state.inner_state[0]
  assert int(adam.count) == 1 and int(state.count) == 1
  np.testing.assert_allclose(np.asarray(adam.mu["layer"]["kernel"]), 0.1 * g, rtol=1e-6)
  # Everything that is not a delta is frozen.
  np.testing.assert_array_equal(np.asarray(new["head"]["kernel"]), np.asarray(params["head"]["kernel"]))


def test_reference_default_merges_rank_rows_and_resets_all(rng):
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.adam(0.05), REF)
  state = tx.init(params)
  g = rng.standard_normal((OUT, RANK)).astype(np.float32)
  new, state = _step(tx, params, state, _grads(params, g))
  assert len(_changed_rows(new["layer"]["kernel"], params["layer"]["kernel"])) == RANK
  assert not np.any(np.asarray(new["layer"]["kernel"].delta))
  assert float(new["layer"]["kernel"].scale) == float(params["layer"]["kernel"].scale)


@pytest.mark.parametrize("top_k, warmup, counts", [
    (3, 2, [RANK, RANK, 3, 3]),  # warmup merges rank rows, then top_k
    ("all", 1, [RANK, OUT, OUT, OUT]),  # then every row
])
def test_rows_merged_per_step_follow_warmup_then_top_k(rng, top_k, warmup, counts):
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.sgd(0.5), REF, top_k=top_k, topk_warmup_steps=warmup)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
  got = []
  for _ in range(len(counts)):
    g = _grads(params, rng.standard_normal((OUT, RANK)))
    new, state = step(params, state, g)
    got.append(len(_changed_rows(new["layer"]["kernel"], params["layer"]["kernel"])))
    params = new
  assert got == counts


def test_reset_residual_carries_rounding_error_through_the_optimizer(rng):
  """One SGD step with updates below half an e4m3 step: rounded away unless carried."""
  params = _params(rng)
  g = rng.standard_normal((OUT, RANK)).astype(np.float32) * 1e-5
  new = {}
  for reset in ("merged", "residual"):
    tx = falqon_jax.proxy_update(optax.sgd(1.0), REF, top_k="all", reset=reset)
    new[reset], _ = _step(tx, params, tx.init(params), _grads(params, g))
  # Same FP8 bytes (the same eager ops on the same inputs); "merged" drops what did not
  # land, "residual" keeps it as delta.
  np.testing.assert_array_equal(np.asarray(new["merged"]["layer"]["kernel"].qweight).view(np.uint8),
                                np.asarray(new["residual"]["layer"]["kernel"].qweight).view(np.uint8))
  assert not np.any(np.asarray(new["merged"]["layer"]["kernel"].delta))
  kept = np.asarray(new["residual"]["layer"]["kernel"].delta)
  unchanged = np.setdiff1d(np.arange(OUT), _changed_rows(new["residual"]["layer"]["kernel"],
                                                          params["layer"]["kernel"]))
  assert len(unchanged) > OUT // 2  # most rows did not move at all ...
  # ... so their whole update (-g, exactly representable through A) is carried.
  np.testing.assert_allclose(kept[unchanged], -g[unchanged], rtol=1e-3, atol=1e-7)


def test_non_finite_step_is_skipped_and_counted(rng):
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.adam(0.05), REF, reset="merged", top_k=4)
  state = tx.init(params)
  params, state = _step(tx, params, state, _grads(params, rng.standard_normal((OUT, RANK))))
  before_p, before_s = params, state
  bad = rng.standard_normal((OUT, RANK)).astype(np.float32)
  bad[3, 2] = np.nan
  params, state = _step(tx, params, state, _grads(params, bad))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before_p)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert int(state.skipped) == 1 and int(state.count) == 1
  for a, b in zip(jax.tree_util.tree_leaves(state.inner_state.inner_state),
                  jax.tree_util.tree_leaves(before_s.inner_state.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params, state = _step(tx, params, state, _grads(params, rng.standard_normal((OUT, RANK))))
  assert int(state.count) == 2 and int(state.skipped) == 1


def test_reset_merged_accumulates_unmerged_rows_across_steps(rng):
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.sgd(1e-3), REF, top_k=2, reset="merged")
  state = tx.init(params)
  g = np.ones((OUT, RANK), np.float32)
  g[:2] *= 10  # rows 0 and 1 merge first
  params, state = _step(tx, params, state, _grads(params, g))
  params, state = _step(tx, params, state, _grads(params, g))
  d = np.asarray(params["layer"]["kernel"].delta)
  # Rows never merged hold two steps of -lr * g.
  np.testing.assert_allclose(d[10], -2e-3 * g[10], rtol=1e-6)


def test_clipping_inside_inner_sees_only_deltas(rng):
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), falqon_jax.REFERENCE,
                               top_k=1, reset="merged")
  state = tx.init(params)
  g = rng.standard_normal((OUT, RANK)).astype(np.float32)
  # The frozen head gets an enormous gradient; the clip must not see it.
  new, _ = _step(tx, params, state, _grads(params, g, other=1e6))
  d = np.asarray(new["layer"]["kernel"].delta)
  merged = _changed_rows(new["layer"]["kernel"], params["layer"]["kernel"])
  keep = np.setdiff1d(np.arange(OUT), merged)
  np.testing.assert_allclose(d[keep], -(g / np.linalg.norm(g))[keep], rtol=1e-5)


def test_composes_with_schedules_under_jit_with_donation(rng):
  params = _params(rng)
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 10)
  tx = falqon_jax.proxy_update(optax.chain(optax.clip_by_global_norm(3.0), optax.adamw(sched, weight_decay=0.0)), REF)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _step(tx, p, s, g), donate_argnums=(0, 1))
  q0 = np.asarray(params["layer"]["kernel"].qweight).copy()
  for _ in range(3):
    params, state = step(params, state, _grads(params, rng.standard_normal((OUT, RANK))))
  assert int(state.count) == 3
  assert np.any(np.asarray(params["layer"]["kernel"].qweight).view(np.uint8) != q0.view(np.uint8))


def test_stochastic_rounding_is_deterministic_per_key(rng):
  params = _params(rng)
  g = _grads(params, rng.standard_normal((OUT, RANK)))
  outs = []
  for seed in (0, 0, 1):
    tx = falqon_jax.proxy_update(optax.sgd(1e-3), REF, rounding="stochastic", key=jax.random.key(seed))
    new, _ = _step(tx, params, tx.init(params), g)
    outs.append(np.asarray(new["layer"]["kernel"].qweight).view(np.uint8))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert np.any(outs[0] != outs[2])


def test_misuse_errors(rng):
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.adam(1e-3), REF)
  state = tx.init(params)
  updates, _ = tx.update(_grads(params, np.ones((OUT, RANK))), state, params)
  with pytest.raises((ValueError, TypeError)):
    optax.apply_updates(params, updates)  # would add FP8 bytes: refused
  with pytest.raises(TypeError, match="must come from falqon_jax.proxy_update"):
    falqon_jax.apply_updates(params, _grads(params, np.ones((OUT, RANK))))
  with pytest.raises(ValueError, match="needs params"):
    tx.update(_grads(params, np.ones((OUT, RANK))), state)
  with pytest.raises(ValueError, match="holds no MeldedKernel"):
    tx.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="top_k=200 exceeds the 96 rows"):
    falqon_jax.proxy_update(optax.adam(1e-3), REF, top_k=200).init(params)
  with pytest.raises(ValueError, match='top_k must be None, "all" or a positive int'):
    falqon_jax.proxy_update(optax.adam(1e-3), REF, top_k=0)


def test_gradient_accumulation_merges_only_on_the_update_step(rng):
  params = _params(rng)
  g1, g2 = (rng.standard_normal((OUT, RANK)).astype(np.float32) for _ in range(2))
  # SGD: Adam's sqrt/divide compile to different last bits inside MultiSteps' cond.
  acc = falqon_jax.proxy_update(optax.sgd(0.05), REF, accumulation_steps=2)
  state = acc.init(params)
  mid, state = _step(acc, params, state, _grads(params, g1))
  assert mid["layer"]["kernel"].qweight.tobytes() == params["layer"]["kernel"].qweight.tobytes()
  assert not np.any(np.asarray(mid["layer"]["kernel"].delta)) and int(state.count) == 0
  end, state = _step(acc, mid, state, _grads(mid, g2))
  assert int(state.count) == 1
  # The same as one step on the mean gradient.
  one = falqon_jax.proxy_update(optax.sgd(0.05), REF)
  want, _ = _step(one, params, one.init(params), _grads(params, (g1 + g2) / 2))
  # MultiSteps' running mean is another f32 formula than (g1 + g2) / 2: a last-bit
  # difference in a delta can move a merged element across an e4m3 rounding boundary.
  oracle.assert_fp8_close(end["layer"]["kernel"].qweight, want["layer"]["kernel"].qweight)
  with pytest.raises(ValueError, match="accumulation_steps must be a positive int"):
    falqon_jax.proxy_update(optax.adam(0.05), REF, accumulation_steps=0)


def test_pallas_merge_implementation_gives_the_same_step(rng):
  params = _params(rng)
  g = _grads(params, rng.standard_normal((OUT, RANK)))
  outs = []
  for impl in ("xla", "pallas"):
    tx = falqon_jax.proxy_update(optax.adam(0.05), REF, top_k=4, reset="merged", implementation=impl)
    new, _ = _step(tx, params, tx.init(params), g)
    outs.append(new["layer"]["kernel"])
  # The kernel's update dot runs in another program: an e4m3 rounding may flip.
  oracle.assert_fp8_close(outs[1].qweight, outs[0].qweight)
  # The same rows (the same eager top-k), zeroed; the others are the same eager Adam step.
  np.testing.assert_array_equal(np.asarray(outs[0].delta), np.asarray(outs[1].delta))


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_non_finite_updates_from_finite_gradients_are_skipped(rng, accumulation_steps):
  """A NaN learning rate turns finite gradients into NaN updates: skipped like NaN gradients."""
  params = _params(rng)
  tx = falqon_jax.proxy_update(optax.adam(float("nan")), REF, top_k=4, reset="merged",
                               accumulation_steps=accumulation_steps)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
  for i in range(accumulation_steps):  # the last call is the one that updates
    before_p, before_s = params, state
    params, state = step(params, state, _grads(params, rng.standard_normal((OUT, RANK))))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before_p)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert np.all(np.isfinite(np.asarray(params["layer"]["kernel"].qweight.astype(jnp.float32))))
  assert int(state.skipped) == 1 and int(state.count) == 0
  assert not bool(state.inner_state.last_finite)
  for a, b in zip(jax.tree_util.tree_leaves(state.inner_state.inner_state),
                  jax.tree_util.tree_leaves(before_s.inner_state.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_numpy_integer_counts_are_accepted_and_bools_refused(rng):
  params = _params(rng)
  g = _grads(params, rng.standard_normal((OUT, RANK)))
  changed = []
  for top_k, warmup, acc in ((3, 1, 1), (np.int64(3), np.int64(1), np.int32(1))):
    tx = falqon_jax.proxy_update(optax.sgd(0.5), REF, top_k=top_k, topk_warmup_steps=warmup,
                                 accumulation_steps=acc)
    state = tx.init(params)
    p, state = _step(tx, params, state, g)
    p, state = _step(tx, p, state, g)
    changed.append(p["layer"]["kernel"].qweight.tobytes())
  assert changed[0] == changed[1]
  for bad in (dict(top_k=3.0), dict(top_k=True), dict(topk_warmup_steps=True),
              dict(topk_warmup_steps=1.0), dict(accumulation_steps=True),
              dict(accumulation_steps=np.float32(2))):
    with pytest.raises(ValueError, match="must be"):
      falqon_jax.proxy_update(optax.sgd(0.5), REF, **bad)


def _run(tx, params, steps=3):
  """``steps`` proxy updates on fixed, row-varying delta gradients; the final params."""
  state = tx.init(params)
  for step in range(steps):
    g = np.outer(np.arange(1, OUT + 1), np.ones(RANK)) * 1e-3 * (step + 1)
    updates, state = tx.update(_grads(params, g), state, params)
    params = falqon_jax.apply_updates(params, updates)
  return params, state


def _bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def test_bare_meld_and_proxy_update_are_the_recommended_preset(rng):
  """The defaults are RECOMMENDED, with a deterministic default rounding key: the bare
  calls give the same bytes as options=RECOMMENDED (both one program: bit-exact)."""
  k = jnp.asarray(rng.standard_normal((IN, OUT)) * 0.05, jnp.float32)
  bare, _ = falqon_jax.meld({"w": {"kernel": k}})
  explicit, _ = falqon_jax.meld({"w": {"kernel": k}}, options=falqon_jax.RECOMMENDED)
  assert bare["w"]["kernel"].rank == falqon_jax.RECOMMENDED.rank
  assert _bytes(bare) == _bytes(explicit)
  small = {"w": {"kernel": k}}
  small, _ = falqon_jax.meld(small, RANK)
  a, sa = _run(falqon_jax.proxy_update(optax.sgd(0.5)), small)
  b, sb = _run(falqon_jax.proxy_update(optax.sgd(0.5), falqon_jax.RECOMMENDED), small)
  assert _bytes(a) == _bytes(b)
  assert np.array_equal(jax.random.key_data(sa.key), jax.random.key_data(jax.random.key(0)))
  # RECOMMENDED merges every row with stochastic rounding: it is not REFERENCE's run.
  c, _ = _run(falqon_jax.proxy_update(optax.sgd(0.5), REF), small)
  assert _bytes(a) != _bytes(c)


def test_reference_preset_is_the_explicit_reference_settings(rng):
  """REFERENCE equals spelling out the official code's settings (same program: bit-exact)."""
  params = _params(rng)
  explicit = falqon_jax.proxy_update(
      optax.sgd(0.5), top_k=None, topk_warmup_steps=0, reset="all", rounding="nearest",
      implementation="xla")
  a, sa = _run(falqon_jax.proxy_update(optax.sgd(0.5), REF), params)
  b, sb = _run(explicit, params)
  assert _bytes(a) == _bytes(b) and sa.key is None and sb.key is None
  assert REF == falqon_jax.FalqonOptions(
      rank=64, init="svd", scaling="tensor", top_k=None, topk_warmup_steps=0, reset="all",
      rounding="nearest", implementation="xla", fused_groups=False, seed=0)


def test_stochastic_rounding_key_defaults_to_the_seed(rng):
  params = _params(rng)
  seeded = REF.replace(rounding="stochastic", top_k="all", seed=3)
  a, _ = _run(falqon_jax.proxy_update(optax.sgd(0.5), seeded), params)
  b, _ = _run(falqon_jax.proxy_update(optax.sgd(0.5), seeded, key=jax.random.key(3)), params)
  c, _ = _run(falqon_jax.proxy_update(optax.sgd(0.5), seeded.replace(seed=4)), params)
  assert _bytes(a) == _bytes(b) and _bytes(a) != _bytes(c)
