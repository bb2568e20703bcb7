"""Benchmark of falqon_jax.kernels: Pallas against XLA at LLaMA-7B sizes, checked on device.

For each kernel and size it compiles both implementations, checks the Pallas result
against the XLA reference on the device (mismatching bytes, expected 0), then times both
and reports the median time per call, the effective bandwidth (the minimum bytes the op
must move, over the time) and that bandwidth as a fraction of a measured
device-to-device copy.

Timing: JAX exposes no CUDA events, so each measurement runs ``--inner`` back-to-back
calls inside one jitted ``fori_loop`` (host dispatch amortised away; the loop carries the
outputs so nothing is hoisted or dead), waits with ``block_until_ready``, and divides.
The reported figure is the median over ``--reps`` such measurements.

Usage:
  python benchmarks/kernels.py              # GPU: LLaMA-7B sizes
  python benchmarks/kernels.py --smoke      # any backend (CPU: interpret mode), tiny sizes
  python benchmarks/kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from falqon_jax import fp8, kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import save_json  # noqa: E402

QUANTIZE_SIZES = [(8448, 4096), (8448, 11008)]  # 16 x 528 tokens x (hidden, mlp)
MERGE_SIZES = [(4096, 4096), (11008, 4096)]  # (out, in) of q/k/v/o and gate/up
MERGE_RANK, MERGE_KS = 64, (8, 64)
SMOKE_QUANTIZE = [(40, 100)]
SMOKE_MERGE = [(48, 64)]
SMOKE_RANK, SMOKE_KS = 8, (4,)


def _median_time(step, carry, inner: int, reps: int) -> float:
  """Median seconds per call of ``step`` run ``inner`` times back to back, jitted."""

  @jax.jit
  def loop(carry):
    return lax.fori_loop(0, inner, lambda i, c: step(i, c), carry)

  jax.block_until_ready(loop(carry))  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(carry))
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, inner: int, reps: int) -> float:
  """Bytes/s of a device-to-device copy (read + write) of an ``nbytes`` uint8 buffer."""
  x = jnp.arange(nbytes, dtype=jnp.uint32).astype(jnp.uint8)

  def step(i, c):
    # ``c ^ i`` forces a fresh full-size write each trip (a bare copy could be elided).
    return c ^ i.astype(jnp.uint8)

  return 2 * nbytes / _median_time(step, x, inner, reps)


def _barrier(x, i):
  # Makes x loop-variant so XLA cannot hoist the op out of the timing loop.
  x, _ = lax.optimization_barrier((x, i))
  return x


def bench_quantize(m, n, fmt, axis, known_amax, impl, args):
  key = jax.random.key(0)
  x = jax.random.normal(key, (m, n), jnp.bfloat16) * 3
  # A known amax (e.g. fused into the producer, or last step's) skips the amax pass.
  amax = jnp.max(jnp.abs(x), axis=axis).astype(jnp.float32) if known_amax else None
  f = functools.partial(kernels.quantize, fmt=fmt, axis=axis, amax=amax,
                        implementation=impl)
  want = kernels.quantize(x, fmt, axis=axis, amax=amax, implementation="xla")
  got = jax.jit(f)(x)
  bad = int(jnp.sum(lax.bitcast_convert_type(got[0], jnp.uint8)
                    != lax.bitcast_convert_type(want[0], jnp.uint8)))
  bad += int(jnp.sum(got[1] != want[1]))

  def step(i, c):
    return f(_barrier(x, i))

  t = _median_time(step, want, args.inner, args.reps)
  nbytes = x.size * x.dtype.itemsize + x.size  # read x once, write fp8 once
  return t, nbytes, bad


def bench_merge(out, n, rank, k, impl, args, rounding="nearest"):
  keys = jax.random.split(jax.random.key(1), 3)
  w = jax.random.normal(keys[0], (out + rank, n), jnp.float32)
  scale = fp8.compute_scale(w)
  q = fp8.quantize(w, scale)
  delta = jax.random.normal(keys[1], (out, rank), jnp.float32) * 0.1
  rows = kernels.select_rows(delta, k)
  kw = dict(out_features=out, rounding=rounding,
            key=keys[2] if rounding == "stochastic" else None)
  f = functools.partial(kernels.merge_rows, implementation=impl, **kw)
  want = kernels.merge_rows(q, scale, delta, rows, implementation="xla", **kw)
  got = jax.jit(f)(q, scale, delta, rows)
  wb = np.asarray(lax.bitcast_convert_type(want[0], jnp.uint8)).astype(np.int16)
  gb = np.asarray(lax.bitcast_convert_type(got[0], jnp.uint8)).astype(np.int16)
  bad = int((wb != gb).sum())
  if bad:  # how far: same-sign fp8 codes are monotone, so a code distance is in ulps
    print(f"  merge {out}x{n} k={k}: {bad} bytes differ, max code distance"
          f" {int(np.abs(wb - gb).max())}", file=sys.stderr)

  def step(i, c):
    qw, s = c
    return f(qw, s, delta, rows)  # the loop carries qweight: in place when XLA can

  t = _median_time(step, (q, scale), args.inner, args.reps)
  nbytes = 2 * k * n + rank * n + k * rank * 4 + k * 4  # rows r/w, A, delta rows, indices
  return t, nbytes, bad


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU too")
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--inner", type=int, default=None)
  p.add_argument("--json", default=None, help="write the rows here as JSON")
  args = p.parse_args(argv)
  smoke = args.smoke
  args.reps = args.reps or (3 if smoke else 15)
  args.inner = args.inner or (2 if smoke else 50)
  dev = jax.devices()[0]
  print(f"# device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__},"
        f" python {platform.python_version()}, reps={args.reps}, inner={args.inner}")
  copy_bytes = (1 << 16) if smoke else (1 << 30)
  bw = copy_bandwidth(copy_bytes, args.inner, args.reps)
  print(f"# device-to-device copy: {bw / 1e9:.1f} GB/s ({copy_bytes} bytes)")
  if jax.default_backend() == "cpu" and not smoke:
    print("# warning: CPU backend: Pallas runs in interpret mode; figures mean nothing")

  rows = []
  header = "| op | shape | variant | impl | median µs | GB/s | of copy | mismatches |"
  print(header)
  print("|" + "---|" * 8)

  def save():  # after every row: a run cut short keeps what it measured
    save_json(dict(device=dev.device_kind, backend=jax.default_backend(),
                   jax=jax.__version__, copy_gbps=bw / 1e9, rows=rows), args.json)

  def record(op, shape, variant, impl, bench, *bench_args):
    try:
      t, nbytes, bad = bench(*bench_args)
    except Exception as e:  # one kernel failing to compile must not hide the others
      msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
      rows.append(dict(op=op, shape=shape, variant=variant, impl=impl, error=msg))
      print(f"| {op} | {shape} | {variant} | {impl} | FAILED: {msg} | | | |", flush=True)
      save()
      return
    r = dict(op=op, shape=shape, variant=variant, impl=impl, us=t * 1e6,
             gbps=nbytes / t / 1e9, of_copy=nbytes / t / bw, mismatches=bad)
    rows.append(r)
    print(f"| {op} | {shape} | {variant} | {impl} | {r['us']:.1f} | {r['gbps']:.2f} |"
          f" {r['of_copy']:.0%} | {bad} |", flush=True)
    save()

  for m, n in SMOKE_QUANTIZE if smoke else QUANTIZE_SIZES:
    for fmt, axis, known in (("e4m3", None, False), ("e4m3", -1, False),
                             ("e5m2", None, False), ("e4m3", None, True)):
      variant = f"{fmt} {'per-row' if axis else 'per-tensor'}{' known amax' if known else ''}"
      for impl in ("xla", "pallas"):
        record("quantize", f"{m}x{n} bf16", variant, impl,
               bench_quantize, m, n, fmt, axis, known, impl, args)
  for out, n in SMOKE_MERGE if smoke else MERGE_SIZES:
    rank, ks = (SMOKE_RANK, SMOKE_KS) if smoke else (MERGE_RANK, MERGE_KS)
    for k in ks:
      for rounding in ("nearest", "stochastic"):
        for impl in ("xla", "pallas"):
          record("merge", f"{out}x{n} r{rank}", f"k={k} {rounding}", impl,
                 bench_merge, out, n, rank, k, impl, args, rounding)
  save()
  return rows


if __name__ == "__main__":
  main()
