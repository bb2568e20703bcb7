"""Cost of the row-wise merge against a full-matrix rewrite like the reference's.

The reference's ``apply_delta_weight`` upcasts the whole FP8 weight to f32, adds the
k merged rows, and recasts everything, every step, for every layer. ``merge_top_k``
reads and writes only the k selected rows. Both run jitted with donated buffers in the
same process, on the same inputs; medians over repeated runs.

  python benchmarks/merge_cost.py                 # 4096 x 4096, rank 64, k = 64
  python benchmarks/merge_cost.py --out 11008 --k 8

The breakdown separates the k-row math from the in-place write. On CPU, XLA keeps no
fp8 scatter in place, so the write is a small custom call aliased to the donated weight
(falqon_jax._native, built on first use); ``--no-native`` times the uint8-view fallback
used when no C++ compiler exists (two full-size byte copies). GPUs scatter fp8 natively.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import falqon_jax
from falqon_jax import fp8
from falqon_jax._melded_kernel import MeldedKernel
from falqon_jax._merge import MERGE_PRECISION, compute_merged_rows, select_rows, write_rows


def full_matrix_rewrite(mk: MeldedKernel, k: int) -> MeldedKernel:
  """The reference's merge: upcast everything, add the rows, recast everything."""
  out = mk.out_features
  w = mk.qweight.astype(jnp.float32)
  rows = select_rows(mk.delta, k)
  backbone = w[:out].at[rows].add(
      jnp.dot(mk.delta[rows], w[out:], precision=MERGE_PRECISION))
  stacked = jnp.concatenate([backbone, w[out:]], 0)
  qweight = jnp.clip(stacked, -fp8.E4M3.max, fp8.E4M3.max).astype(fp8.E4M3.dtype)
  return mk.replace(qweight=qweight, delta=jnp.zeros_like(mk.delta))


def rows_only(mk: MeldedKernel, k: int):
  """The k-row math of merge_top_k without the write (selection, gather, matmul, cast)."""
  rows = select_rows(mk.delta, k)
  new, _ = compute_merged_rows(mk.qweight, mk.scale, mk.delta, rows,
                               out_features=mk.out_features)
  return rows, new


def time_it(fn, make_args, repeats):
  args = make_args()
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm up
  times = []
  for _ in range(repeats):
    args = make_args()
    jax.block_until_ready(args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    del out  # freeing a large result (munmap) is not part of the merge: keep it untimed
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--in_features", type=int, default=4096)
  parser.add_argument("--out", type=int, default=4096)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--k", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--no-native", action="store_true",
                      help="CPU: time the uint8-view write instead of the custom call")
  args = parser.parse_args()
  if args.no_native:  # read once, when the first merge is traced
    os.environ["FALQON_JAX_NATIVE"] = "0"

  key = jax.random.key(0)
  raw = jax.random.normal(key, (args.out + args.rank, args.in_features)) * 40
  qweight = jnp.clip(raw, -448, 448).astype(jnp.float8_e4m3fn)
  delta = jax.random.normal(jax.random.key(1), (args.out, args.rank)) * 1e-2

  def make_mk():  # fresh buffers each run: donation consumes them
    return (MeldedKernel(jnp.array(qweight), jnp.float32(100.0), jnp.array(delta),
                         args.in_features, args.out, args.rank),)

  ours = jax.jit(lambda mk: falqon_jax.merge_top_k(mk, args.k), donate_argnums=0)
  full = jax.jit(lambda mk: full_matrix_rewrite(mk, args.k), donate_argnums=0)
  math = jax.jit(lambda mk: rows_only(mk, args.k))
  write = jax.jit(write_rows, donate_argnums=0)
  rows, new_rows = math(*make_mk())

  # Same result before timing anything (both run the same f32 update on this machine).
  a, b = ours(*make_mk()), full(*make_mk())
  same = bool(jnp.all(lax.bitcast_convert_type(a.qweight, jnp.uint8)
                      == lax.bitcast_convert_type(b.qweight, jnp.uint8)))

  t_ours = time_it(ours, make_mk, args.repeats)
  t_full = time_it(full, make_mk, args.repeats)
  t_math = time_it(math, make_mk, args.repeats)
  t_write = time_it(write, lambda: (jnp.array(qweight), rows, new_rows), args.repeats)
  mem_ours = ours.lower(*make_mk()).compile().memory_analysis()
  mem_full = full.lower(*make_mk()).compile().memory_analysis()

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  if jax.default_backend() == "cpu":
    from falqon_jax import _native
    print(f"CPU row write: {'custom call (in place)' if _native.available() else 'uint8 view: ' + str(_native.error())}")
  print(f"shape: qweight ({args.out}+{args.rank}) x {args.in_features} e4m3, k = {args.k}")
  print(f"bit-identical results: {same}")
  print(f"full-matrix rewrite (reference): {t_full * 1e3:9.3f} ms   temp {mem_full.temp_size_in_bytes / 2**20:7.1f} MiB")
  print(f"merge_top_k (k rows, donated):   {t_ours * 1e3:9.3f} ms   temp {mem_ours.temp_size_in_bytes / 2**20:7.1f} MiB")
  print(f"  k-row math alone:             {t_math * 1e3:9.3f} ms")
  print(f"  row write alone (donated):     {t_write * 1e3:9.3f} ms")
  print(f"speedup: {t_full / t_ours:.1f}x (row math alone: {t_full / t_math:.1f}x)")


if __name__ == "__main__":
  main()
