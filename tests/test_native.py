"""The CPU in-place row write (falqon_jax._native): bytes, aliasing, build and fallback."""

import os
import pathlib
import re
import shutil
import tomllib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import falqon_jax
from falqon_jax import _native
from falqon_jax._merge import write_rows
import oracle

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only extension")

HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture
def native():
  if not HAVE_COMPILER:
    pytest.skip("no C++ compiler: the fallback path is tested below")
  assert _native.available(), _native.error()
  return _native


@pytest.fixture
def fresh_native_state(tmp_path, monkeypatch):
  """A clean build state and cache dir; restores the real one afterwards."""
  monkeypatch.setenv("FALQON_JAX_CACHE_DIR", str(tmp_path / "cache"))
  _native._reset_for_tests()
  yield tmp_path / "cache"
  monkeypatch.undo()
  _native._reset_for_tests()


def _bytes(a):
  return np.asarray(a).view(np.uint8)


def _expected(target, rows, new):
  want = _bytes(target).copy()
  n = target.shape[-2]
  for i, r in enumerate(np.asarray(rows)):
    if -n <= r < n:
      want[r] = _bytes(new)[i]
  return want


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16, jnp.float32])
def test_rows_match_numpy_for_every_width(native, rng, dtype):
  target = jnp.asarray(rng.standard_normal((48, 40)) * 30, jnp.float32).astype(dtype)
  rows = jnp.asarray(rng.choice(48, 9, replace=False), jnp.int32)
  new = jnp.asarray(rng.standard_normal((9, 40)) * 30, jnp.float32).astype(dtype)
  got = jax.jit(native.write_rows)(target, rows, new)
  assert got.dtype == target.dtype and got.shape == target.shape
  np.testing.assert_array_equal(_bytes(got), _expected(target, rows, new))


def test_negative_rows_wrap_and_out_of_range_rows_are_dropped_like_at_set(native, rng):
  target = jnp.asarray(rng.standard_normal((16, 32)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
  rows = jnp.asarray([-1, 3, 16, -17, 7], jnp.int32)
  new = jnp.asarray(rng.standard_normal((5, 32)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
  got = native.write_rows(target, rows, new)
  want = target.at[rows].set(new)  # jnp semantics: wrap -1, drop 16 and -17
  np.testing.assert_array_equal(_bytes(got), _bytes(want))


def test_donated_write_is_in_place_and_undonated_input_survives(native, rng):
  target = jnp.asarray(rng.standard_normal((1088, 512)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
  rows = jnp.asarray(rng.choice(1024, 64, replace=False), jnp.int32)
  new = jnp.asarray(rng.standard_normal((64, 512)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
  compiled = jax.jit(native.write_rows, donate_argnums=0).lower(target, rows, new).compile()
  text = compiled.as_text()
  assert 'custom_call_target="falqon_write_rows"' in text
  assert "output_to_operand_aliasing" in text
  mem = compiled.memory_analysis()
  assert mem.alias_size_in_bytes >= target.size
  assert mem.temp_size_in_bytes < 64 * 512 * 4  # k rows at most, never the weight

  before = _bytes(target).copy()
  got = jax.jit(native.write_rows)(target, rows, new)  # not donated: XLA copies first
  np.testing.assert_array_equal(_bytes(target), before)
  np.testing.assert_array_equal(_bytes(got), _expected(target, rows, new))


def test_vmap_writes_each_batch_member_its_own_rows(native, rng):
  target = jnp.asarray(rng.standard_normal((3, 24, 16)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
  rows = jnp.asarray(np.stack([rng.choice(24, 5, replace=False) for _ in range(3)]), jnp.int32)
  new = jnp.asarray(rng.standard_normal((3, 5, 16)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
  got = jax.jit(jax.vmap(native.write_rows))(target, rows, new)
  for b in range(3):
    np.testing.assert_array_equal(_bytes(got[b]), _expected(target[b], rows[b], new[b]))
  # Only the targets batched: rows and new rows broadcast to every member.
  got = jax.vmap(native.write_rows, in_axes=(0, None, None))(target, rows[0], new[0])
  for b in range(3):
    np.testing.assert_array_equal(_bytes(got[b]), _expected(target[b], rows[0], new[0]))


def test_sharded_and_pmapped_merges_write_the_right_rows(native, rng):
  k = jnp.asarray(rng.standard_normal((64, 128)) * 0.05, jnp.float32)
  mk = falqon_jax.meld_kernel(k, 16)
  mk = mk.replace(delta=jnp.asarray(rng.standard_normal(mk.delta.shape), jnp.float32))
  want = jax.jit(lambda m: falqon_jax.merge_top_k(m, 16))(mk)  # bytes: see test_merge
  # Sharded and pmapped merges are other programs: the f32 update's last bits may differ,
  # so an element may round one e4m3 step away; a misplaced row would be far off.

  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows_sharded = NamedSharding(mesh, P("data", None))
  sharded = mk.replace(qweight=jax.device_put(mk.qweight, rows_sharded))
  got = jax.jit(lambda m: falqon_jax.merge_top_k(m, 16))(sharded)
  oracle.assert_fp8_close(got.qweight, want.qweight)

  stacked = jax.tree.map(lambda x: jnp.stack([x] * 4), mk)
  got = jax.pmap(lambda m: falqon_jax.merge_top_k(m, 16))(stacked)
  for i in range(4):
    oracle.assert_fp8_close(got.qweight[i], want.qweight)
    # Replicas of one program: the same bytes.
    np.testing.assert_array_equal(_bytes(got.qweight[i]), _bytes(got.qweight[0]))


def test_bad_shapes_and_dtypes_get_one_line_errors(native):
  t = jnp.zeros((8, 4), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match=r"needs target \(\.\.\., R, C\)"):
    native.write_rows(t, jnp.arange(2), jnp.zeros((3, 4), jnp.float8_e4m3fn))
  with pytest.raises(TypeError, match="dtype"):
    native.write_rows(t, jnp.arange(2), jnp.zeros((2, 4), jnp.float32))


def test_build_is_cached_atomically_and_reused(native, fresh_native_state):
  assert _native.available(), _native.error()
  built = sorted(p.name for p in fresh_native_state.iterdir())
  assert built == [_native.library_path().name]  # no temporary left behind
  stamp = _native.library_path().stat().st_mtime_ns
  _native._reset_for_tests()
  assert _native.available()
  assert _native.library_path().stat().st_mtime_ns == stamp  # loaded, not rebuilt


@pytest.mark.parametrize("cxx, reason", [
    ("/nonexistent/c++", "no C++ compiler"),
    ("false", "failed (exit 1)"),
])
def test_a_failed_build_warns_once_leaves_nothing_and_falls_back(
    rng, monkeypatch, fresh_native_state, cxx, reason):
  monkeypatch.setenv("CXX", cxx)
  with pytest.warns(RuntimeWarning, match=re.escape(reason)):
    assert not _native.available()
  assert reason in _native.error()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the warning is not repeated
    assert not _native.available()
  leftovers = list(fresh_native_state.iterdir()) if fresh_native_state.exists() else []
  assert leftovers == []

  # The merge still gives the right bytes, through the uint8 view.
  q = jnp.asarray(rng.standard_normal((40, 32)) * 50, jnp.float32).astype(jnp.float8_e4m3fn)
  rows = jnp.asarray(rng.choice(40, 6, replace=False), jnp.int32)
  new = jnp.asarray(rng.standard_normal((6, 32)) * 50, jnp.float32).astype(jnp.float8_e4m3fn)
  np.testing.assert_array_equal(_bytes(write_rows(q, rows, new)), _expected(q, rows, new))


def test_disabled_by_environment_without_warning(monkeypatch, fresh_native_state):
  monkeypatch.setenv("FALQON_JAX_NATIVE", "0")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not _native.available()
  assert "FALQON_JAX_NATIVE=0" in _native.error()
  assert not fresh_native_state.exists()  # nothing built


def test_extension_source_ships_in_the_wheel():
  root = pathlib.Path(__file__).resolve().parents[1]
  with open(root / "pyproject.toml", "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["falqon_jax"]
  shipped = {p.relative_to(root / "falqon_jax").as_posix()
             for pattern in package_data for p in (root / "falqon_jax").glob(pattern)}
  assert _native._SOURCE.relative_to(root / "falqon_jax").as_posix() in shipped
