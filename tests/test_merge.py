import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import falqon_jax
from falqon_jax import _native
from falqon_jax import fp8
from falqon_jax._merge import write_rows
import oracle

IN, OUT, RANK = 64, 96, 16


def _mk(rng, scaling="tensor", delta_std=0.05, shape=(IN, OUT, RANK)):
  in_f, out_f, rank = shape
  k = jnp.asarray(rng.standard_normal((in_f, out_f)) * 0.05, jnp.float32)
  mk = falqon_jax.meld_kernel(k, rank, scaling=scaling)
  # Distinct row norms so the top-k choice is unambiguous.
  delta = rng.standard_normal((out_f, rank)) * delta_std * np.linspace(0.5, 1.5, out_f)[:, None]
  return mk.replace(delta=jnp.asarray(rng.permutation(delta), jnp.float32))


def _u8(a):
  return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("k", [1, 7, RANK, OUT])
def test_merge_matches_the_full_matrix_reference(rng, k):
  mk = _mk(rng)
  new = falqon_jax.merge_top_k(mk, k)
  want, idx = oracle.merge_full_matrix(mk.qweight, mk.delta, k, OUT)
  oracle.assert_merged_fp8_close(new.qweight, want)
  # Integer rows, exact: the row L1 norms of this delta lie far apart next to the last bits
  # in which two summation orders can differ.
  np.testing.assert_array_equal(np.sort(np.asarray(falqon_jax.select_rows(mk.delta, k))),
                                np.sort(idx))
  # Everything else untouched: other rows, the A rows, the scale; delta reset in full.
  other = np.setdiff1d(np.arange(OUT + RANK), idx)
  np.testing.assert_array_equal(_u8(new.qweight)[other], _u8(mk.qweight)[other])
  assert float(new.scale) == float(mk.scale)
  assert not np.any(np.asarray(new.delta))


def test_dequantized_equivalence_within_half_ulp(rng):
  mk = _mk(rng, delta_std=0.02)
  new = falqon_jax.merge_top_k(mk, RANK)
  idx = np.asarray(falqon_jax.select_rows(mk.delta, RANK))
  s = float(mk.scale)
  raw_old = np.asarray(mk.qweight).astype(np.float64)
  update = np.asarray(mk.delta, np.float64)[idx] @ (raw_old[OUT:] / s)
  want = raw_old[idx] / s + update
  got = np.asarray(new.qweight).astype(np.float64)[idx] / s
  assert np.all(np.abs(want) * s < 448)  # away from saturation
  # Half an e4m3 ULP of the result (relative 2^-4 for normals, 2^-10 absolute below),
  # plus, off CPU, the merge product's TF32 / bf16x3 error (MERGE_PRECISION).
  bound = np.maximum(np.abs(got) * s * 2.0**-4, 2.0**-10) / s
  if jax.default_backend() != "cpu":
    bound = bound + 2.0**-10 * np.abs(update)
  assert np.all(np.abs(got - want) <= bound * (1 + 1e-6))


def test_update_below_half_ulp_leaves_row_unchanged(rng):
  mk = _mk(rng)
  tiny = np.zeros((OUT, RANK), np.float32)
  tiny[5] = 1e-9  # far below half an ULP of any nonzero weight
  new = falqon_jax.merge_top_k(mk.replace(delta=jnp.asarray(tiny)), 1)
  np.testing.assert_array_equal(_u8(new.qweight), _u8(mk.qweight))


def test_saturation_clamps_to_448_without_nan(rng):
  mk = _mk(rng)
  huge = np.asarray(mk.delta) * 0
  huge[3] = 1e4
  huge[7] = -1e4
  new = falqon_jax.merge_top_k(mk.replace(delta=jnp.asarray(huge, jnp.float32)), 2)
  rows = np.asarray(new.qweight.astype(jnp.float32))[[3, 7]]
  assert np.all(np.isfinite(rows)) and np.abs(rows).max() == 448.0
  assert np.sum(np.abs(rows) == 448.0) > IN // 2


def test_reset_merged_keeps_unmerged_rows_accumulating(rng):
  mk = _mk(rng)
  new = falqon_jax.merge_top_k(mk, 8, reset="merged")
  idx = np.asarray(falqon_jax.select_rows(mk.delta, 8))
  d_new, d_old = np.asarray(new.delta), np.asarray(mk.delta)
  assert not np.any(d_new[idx])
  keep = np.setdiff1d(np.arange(OUT), idx)
  np.testing.assert_array_equal(d_new[keep], d_old[keep])
  # The merged bytes do not depend on the reset mode.
  np.testing.assert_array_equal(_u8(new.qweight), _u8(falqon_jax.merge_top_k(mk, 8).qweight))


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_reset_residual_keeps_the_rounding_error_projected_on_a(rng, scaling):
  mk = _mk(rng, scaling=scaling, delta_std=0.02)
  new = falqon_jax.merge_top_k(mk, 8, reset="residual")
  idx = np.asarray(falqon_jax.select_rows(mk.delta, 8))
  # Same bytes as any other reset: only the delta differs.
  np.testing.assert_array_equal(_u8(new.qweight), _u8(falqon_jax.merge_top_k(mk, 8).qweight))
  keep = np.setdiff1d(np.arange(OUT), idx)
  np.testing.assert_array_equal(np.asarray(new.delta)[keep], np.asarray(mk.delta)[keep])
  # Float64 oracle: r = e Aᵀ (A Aᵀ)⁻¹ with e = wanted - stored (value units).
  s_old = np.broadcast_to(np.asarray(mk.scale, np.float64), (OUT + RANK,))
  s_new = np.broadcast_to(np.asarray(new.scale, np.float64), (OUT + RANK,))
  raw_old = np.asarray(mk.qweight).astype(np.float64)
  a = raw_old[OUT:] / s_old[OUT:, None]
  wanted = raw_old[idx] / s_old[idx, None] + np.asarray(mk.delta, np.float64)[idx] @ a
  stored = np.asarray(new.qweight).astype(np.float64)[idx] / s_new[idx, None]
  r = np.linalg.solve(a @ a.T, a @ (wanted - stored).T).T
  got = np.asarray(new.delta, np.float64)[idx]
  assert oracle.rel_err(got, r) < 1e-3
  # What is left after the correction is orthogonal to A's rows: nothing more to carry.
  left = wanted - stored - got @ a
  assert np.abs(left @ a.T).max() <= 1e-3 * np.abs((wanted - stored) @ a.T).max()


@pytest.mark.parametrize("reset", ["merged", "residual"])
def test_reset_residual_lets_updates_below_half_an_ulp_land(rng, reset):
  """200 updates, each a small fraction of an e4m3 step: rounded away unless carried."""
  mk0 = _mk(rng).replace(delta=jnp.zeros((OUT, RANK), jnp.float32))
  s = float(mk0.scale)
  raw0 = np.asarray(mk0.qweight).astype(np.float64)
  a = raw0[OUT:] / s
  ulp = np.abs(raw0[:4]).mean() * 2.0**-3 / s  # a typical e4m3 step of these rows
  step = np.zeros((OUT, RANK))
  step[:4] = rng.standard_normal((4, RANK))
  step[:4] *= 0.1 * ulp / np.abs(step[:4] @ a).mean()  # a tenth of a step per element
  merge = jax.jit(lambda m: falqon_jax.merge_top_k(m, 4, reset=reset))
  mk = mk0
  for _ in range(200):
    mk = merge(mk.replace(delta=mk.delta + jnp.asarray(step, jnp.float32)))
  effective = (np.asarray(mk.qweight).astype(np.float64)[:4] / s
               + np.asarray(mk.delta, np.float64)[:4] @ a)
  applied, wanted = effective - raw0[:4] / s, 200 * step[:4] @ a
  err = oracle.rel_err(applied, wanted)
  if reset == "merged":
    assert err > 0.9  # almost every step rounded away
  else:
    # Carried, less what the ΔBuffer cannot express: the part of each one-step flip of
    # a stored element that is orthogonal to A's rows (here r/in = 1/4 of it is not).
    assert err < 0.6, err


def test_stochastic_rounding_neighbours_unbiased_and_keyed(rng):
  mk = _mk(rng, delta_std=0.01)
  k = 4
  idx = np.asarray(falqon_jax.select_rows(mk.delta, k))
  raw = np.asarray(mk.qweight).astype(np.float64)
  exact = raw[idx] + np.asarray(mk.delta, np.float64)[idx] @ raw[OUT:]
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 300)
  merge = jax.jit(lambda m, key: falqon_jax.merge_top_k(m, k, rounding="stochastic", key=key).qweight)
  samples = np.stack([np.asarray(merge(mk, key)).astype(np.float64)[idx] for key in keys])
  lo = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.float8_e4m3fn)).astype(np.float64)
  # Each sample is an e4m3 neighbour of the value the merge sums in f32, which is within
  # RANK + 1 roundings of the terms' magnitude of the exact one.
  slack = (RANK + 1) * 2.0**-24 * (np.abs(raw[idx]) + np.abs(
      np.asarray(mk.delta, np.float64)[idx]) @ np.abs(raw[OUT:]))
  codes = np.arange(0, 0x7F, dtype=np.uint8).view(oracle.E4M3).astype(np.float64)
  below = np.array([codes[codes <= max(abs(v) - e, 0)].max()
                    for v, e in zip(exact.ravel(), slack.ravel())]).reshape(exact.shape)
  above = np.array([codes[codes >= min(abs(v) + e, 448)].min()
                    for v, e in zip(exact.ravel(), slack.ravel())]).reshape(exact.shape)
  mag = np.abs(samples)
  assert np.all((mag >= below) & (mag <= above))
  # Unbiased: the mean over keys tracks the exact value far better than nearest rounding.
  mean_err = np.abs(samples.mean(0) - exact).mean()
  nearest_err = np.abs(lo - exact).mean()
  assert mean_err < 0.35 * nearest_err
  other = np.setdiff1d(np.arange(OUT + RANK), idx)
  np.testing.assert_array_equal(np.asarray(merge(mk, keys[0])).view(np.uint8)[other], _u8(mk.qweight)[other])
  np.testing.assert_array_equal(_u8(merge(mk, keys[1])), _u8(merge(mk, keys[1])))


def test_row_scaling_merges_in_value_space_and_rescales_instead_of_clipping(rng):
  mk = _mk(rng, scaling="row")
  new = falqon_jax.merge_top_k(mk, RANK)
  idx = np.asarray(falqon_jax.select_rows(mk.delta, RANK))
  s_old, s_new = np.asarray(mk.scale, np.float64), np.asarray(new.scale, np.float64)
  raw_old = np.asarray(mk.qweight).astype(np.float64)
  a_val = raw_old[OUT:] / s_old[OUT:, None]
  want = raw_old[idx] / s_old[idx, None] + np.asarray(mk.delta, np.float64)[idx] @ a_val
  got = np.asarray(new.qweight).astype(np.float64)[idx] / s_new[idx, None]
  assert np.abs(got - want).max() <= 2.0**-4 * np.abs(want).max()
  other = np.setdiff1d(np.arange(OUT + RANK), idx)
  np.testing.assert_array_equal(_u8(new.qweight)[other], _u8(mk.qweight)[other])
  np.testing.assert_array_equal(s_new[other], s_old[other])
  # A huge update widens that row's range: no clipping, the value survives.
  huge = np.zeros((OUT, RANK), np.float32)
  huge[9] = 50.0
  big = falqon_jax.merge_top_k(mk.replace(delta=jnp.asarray(huge)), 1)
  want9 = raw_old[9] / s_old[9] + huge[9].astype(np.float64) @ a_val
  got9 = np.asarray(big.qweight).astype(np.float64)[9] / float(big.scale[9])
  assert float(big.scale[9]) < s_old[9]
  assert np.abs(got9 - want9).max() <= 2.0**-4 * np.abs(want9).max()
  assert np.abs(np.asarray(big.qweight.astype(jnp.float32))[9]).max() == 448.0


@pytest.mark.parametrize("via_bits", [None, True, False])  # None: the CPU custom call
def test_both_write_paths_give_the_same_bytes(rng, via_bits):
  q = jnp.asarray(rng.standard_normal((40, 32)) * 50, jnp.float32).astype(jnp.float8_e4m3fn)
  rows = jnp.asarray(rng.choice(40, 6, replace=False), jnp.int32)
  new = jnp.asarray(rng.standard_normal((6, 32)) * 50, jnp.float32).astype(jnp.float8_e4m3fn)
  got = write_rows(q, rows, new, via_bits=via_bits)
  want = _u8(q).copy()
  want[np.asarray(rows)] = _u8(new)
  np.testing.assert_array_equal(_u8(got), want)


def test_merge_touches_only_k_rows_and_updates_in_place_when_donated(rng):
  if jax.default_backend() == "cpu" and not _native.available():
    pytest.skip(f"CPU row write not in place without the extension: {_native.error()}")
  mk = _mk(rng, shape=(512, 1024, 64))
  merge = jax.jit(lambda m: falqon_jax.merge_top_k(m, 64), donate_argnums=0)
  compiled = merge.lower(mk).compile()
  text = compiled.as_text()
  # No full-size f32 copy of the weight (the reference's upcast of everything).
  assert not re.search(r"f32\[1088,512\]", text)
  if jax.default_backend() == "cpu":
    # No full-size copy in any dtype (a byte view included). On a GPU the in-place
    # scatter is itself a fusion of that shape, so there the memory figures decide.
    assert not re.search(r"(u8|f8e4m3fn)\[1088,512\]\S* (copy|fusion)", text)
  mem = compiled.memory_analysis()
  nbytes = mk.qweight.size
  assert mem.alias_size_in_bytes >= nbytes  # the output reuses the donated buffer
  # Temp: two delta-sized buffers (the reset) and the k rows' f32 math, nothing weight-sized.
  delta_bytes = 4 * mk.delta.size
  assert mem.temp_size_in_bytes <= 2 * delta_bytes + 3 * (64 * 512 * 4)
  if jax.default_backend() == "cpu":
    assert 'custom_call_target="falqon_write_rows"' in text


def test_stochastic_merge_of_every_row_costs_what_nearest_costs(rng):
  """The uniforms are hashed where they are used (fp8.hash_uniform): stochastic rounding
  adds no random-bits buffer and no traffic to a merge of every row."""
  mk = _mk(rng, shape=(512, 1024, 64))

  def compiled(rounding):
    key = jax.random.key(0) if rounding == "stochastic" else None
    merge = jax.jit(lambda m: falqon_jax.merge_top_k(
        m, 1024, reset="merged", rounding=rounding, key=key), donate_argnums=0)
    return merge.lower(mk).compile()

  nearest, stochastic = compiled("nearest"), compiled("stochastic")
  # A few KiB for the seed; a buffer of random bits would be 2 MiB (512 x 1024 x 4 B).
  assert (stochastic.memory_analysis().temp_size_in_bytes
          <= nearest.memory_analysis().temp_size_in_bytes + 64 * 1024)
  cost = lambda c: (c.cost_analysis()[0] if isinstance(c.cost_analysis(), list)
                    else c.cost_analysis())["bytes accessed"]
  assert cost(stochastic) <= 1.05 * cost(nearest)


@pytest.mark.parametrize("seed", range(3))
def test_randomized_shapes_match_reference(seed):
  r = np.random.default_rng(200 + seed)
  in_f, out_f = (int(r.integers(1, 6)) * 16 for _ in range(2))
  rank = int(r.integers(1, min(in_f, out_f) + 1))
  mk = _mk(r, shape=(in_f, out_f, rank))
  k = int(r.integers(1, out_f + 1))
  want, _ = oracle.merge_full_matrix(mk.qweight, mk.delta, k, out_f)
  oracle.assert_merged_fp8_close(falqon_jax.merge_top_k(mk, k).qweight, want)


def test_bad_input_errors(rng):
  mk = _mk(rng)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, out\] = \[1, 96\]"):
    falqon_jax.merge_top_k(mk, OUT + 1)
  with pytest.raises(ValueError, match="k must be"):
    falqon_jax.merge_top_k(mk, 0)
  with pytest.raises(ValueError, match="reset must be one of"):
    falqon_jax.merge_top_k(mk, 4, reset="some")
  with pytest.raises(ValueError, match="needs key"):
    falqon_jax.merge_top_k(mk, 4, rounding="stochastic")
  with pytest.raises(TypeError, match="needs a MeldedKernel"):
    falqon_jax.merge_top_k(mk.qweight, 4)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_inactive_rows_keep_their_bytes_including_negative_zero(rng, scaling, rounding):
  from falqon_jax._merge import merge_rows
  mk = _mk(rng, scaling=scaling)
  bits = np.asarray(mk.qweight).view(np.uint8).copy()
  bits[:OUT, ::3] = 0x80  # -0 codes in every backbone row
  mk = mk.replace(qweight=jnp.asarray(bits.view(oracle.E4M3)))
  idx = np.asarray(falqon_jax.select_rows(mk.delta, 8))
  for active in (0, 3):
    new = merge_rows(mk, 8, reset="merged", active=jnp.int32(active), rounding=rounding,
                     key=jax.random.key(active))
    got = _u8(new.qweight)
    untouched = np.setdiff1d(np.arange(OUT + RANK), idx[:active])
    np.testing.assert_array_equal(got[untouched], bits[untouched])
    if scaling == "row":
      np.testing.assert_array_equal(np.asarray(new.scale)[untouched], np.asarray(mk.scale)[untouched])
    else:
      assert float(new.scale) == float(mk.scale)
    d = np.asarray(new.delta)
    np.testing.assert_array_equal(d[idx[active:]], np.asarray(mk.delta)[idx[active:]])


@pytest.mark.parametrize("reset", ["merged", "residual"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_pallas_merge_implementation_matches(rng, scaling, reset):
  mk = _mk(rng, scaling=scaling)
  a = falqon_jax.merge_top_k(mk, 8, reset=reset)
  b = falqon_jax.merge_top_k(mk, 8, reset=reset, implementation="pallas")
  # The update's f32 dot runs in another program (the kernel's jit): its last bits, and so
  # an e4m3 rounding or a shrunk row scale, may differ.
  oracle.assert_fp8_close(b.qweight, a.qweight)
  np.testing.assert_allclose(np.asarray(b.scale), np.asarray(a.scale),
                             rtol=(RANK + 2) * 2.0**-23)  # RANK terms, a divide, a multiply
  # The reset is the same eager code on each row's stored bytes and scale: exact where
  # those match (every row, unless a rounding flipped).
  scales = [np.broadcast_to(np.asarray(m.scale), (OUT + RANK,)) for m in (a, b)]
  same = np.all(_u8(a.qweight) == _u8(b.qweight), axis=1) & (scales[0] == scales[1])
  np.testing.assert_array_equal(np.asarray(a.delta)[same[:OUT]], np.asarray(b.delta)[same[:OUT]])


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_non_finite_delta_rows_are_dropped_without_touching_the_weight(rng, implementation, scaling):
  mk = _mk(rng, scaling=scaling)
  d = np.asarray(mk.delta).copy()
  d[3, 0], d[7, 2] = np.nan, np.inf
  bad = mk.replace(delta=jnp.asarray(d))
  # The same rows with large finite deltas: the same top-k choice.
  d[3, 0] = d[7, 2] = 1e3
  ok = mk.replace(delta=jnp.asarray(d))
  idx = np.asarray(falqon_jax.select_rows(bad.delta, 8))
  assert {3, 7} <= set(idx)  # non-finite norms rank first
  good = np.setdiff1d(idx, [3, 7])
  for reset in ("all", "merged", "residual"):
    new = falqon_jax.merge_top_k(bad, 8, reset=reset, implementation=implementation)
    want = falqon_jax.merge_top_k(ok, 8, reset=reset, implementation=implementation)
    q = _u8(new.qweight)
    np.testing.assert_array_equal(q[[3, 7]], _u8(mk.qweight)[[3, 7]])
    rest = np.setdiff1d(np.arange(OUT + RANK), [3, 7])
    np.testing.assert_array_equal(q[rest], _u8(want.qweight)[rest])
    s_new, s_old, s_want = (np.broadcast_to(np.asarray(m.scale), (OUT + RANK,))
                            for m in (new, mk, want))
    np.testing.assert_array_equal(s_new[[3, 7]], s_old[[3, 7]])
    np.testing.assert_array_equal(s_new[rest], s_want[rest])
    assert np.all(np.isfinite(np.asarray(new.qweight.astype(jnp.float32))))
    # The unusable update is cleared with the merged rows' deltas; no NaN remains.
    dn = np.asarray(new.delta)
    assert np.all(np.isfinite(dn)) and not np.any(dn[[3, 7]])
    np.testing.assert_array_equal(dn[good], np.asarray(want.delta)[good])


def test_numpy_integer_k_is_accepted_and_bools_refused(rng):
  mk = _mk(rng)
  want = falqon_jax.merge_top_k(mk, 4)
  for k in (np.int64(4), np.int32(4)):
    assert falqon_jax.merge_top_k(mk, k).qweight.tobytes() == want.qweight.tobytes()
  for bad in (True, np.bool_(True), 4.0):
    with pytest.raises(ValueError, match="k must be an int"):
      falqon_jax.merge_top_k(mk, bad)


def test_select_rows_is_one_checked_function(rng):
  from falqon_jax import kernels
  assert falqon_jax.select_rows is kernels.select_rows
  delta = _mk(rng).delta
  for k in (0, OUT + 1, 2.0):
    with pytest.raises(ValueError, match="k must be an int"):
      falqon_jax.select_rows(delta, k)


def _package_imports():
  """``module -> falqon_jax modules it imports`` anywhere, function bodies included."""
  import ast
  import pathlib

  root = pathlib.Path(falqon_jax.__file__).parent
  mods = {}
  for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in mods.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names if a.name in mods}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
        # `from pkg import sub` imports the submodule; `from mod import name` the module.
        targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                    else node.module for a in node.names}
    graph[name] = targets - {name}
  return graph


def test_no_import_cycle_in_the_package():
  """An import cycle held together by imports inside functions is still a cycle."""
  graph, state, cycles = _package_imports(), {}, []

  def visit(m, path):
    state[m] = "open"
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        cycles.append(path[path.index(t):] + [t])
      elif t not in state:
        visit(t, path + [t])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles
