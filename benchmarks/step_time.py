"""Step time, throughput and memory of every method, side by side, with a floor for each.

Two scopes, one table each (and one JSON with ``--json``):

* layer: forward + backward (dx and the trainable gradients) of one linear at LLaMA-7B
  sizes (4096->4096, 4096->11008, 11008->4096), N = 16 x 528 tokens. Achieved TFLOP/s
  counts the two big GEMMs (y = xW and dx = gW^T, 4 N in out FLOPs) against the measured
  bf16 and FP8 GEMM peaks; "outside" is the share of the time not spent in those two
  GEMMs, measured alone at the same shape and precision.
* model: one optimizer step of a LLaMA-shaped model (random init;
  ``falqon_jax.models.CausalLM``, remat per layer), 16 x 528 tokens, rank 64, all seven
  linears of every layer adapted.
  ``--layers 4,8`` measures two depths and extrapolates per layer to the full depth.
* state: the persistent training state of the model scope at full depth (parameters,
  trainable copies and optimizer state), summed from shapes with ``jax.eval_shape``:
  exact on any device, nothing allocated. Peak memory adds activations, which are
  about the same for every method.

Every row prints a first-principles floor next to the measurement: GEMM FLOPs at the
measured peak of their precision plus the bytes the method must move at the measured
copy bandwidth (counting rules in :func:`linear_traffic`). On a GPU, each FP8 method's
compiled HLO is searched for the cuBLASLt FP8 custom call, and each model-scope run is
a fresh subprocess so the device's peak-memory counter belongs to that method alone.

  python benchmarks/step_time.py --json step_time.json            # GPU, full sizes
  python benchmarks/step_time.py --scope model --shape 13b --layers 4,8
  python benchmarks/step_time.py --smoke                          # tiny, any device (CI)

On CPU the smoke mode is automatic: FP8 is emulated there, so the timings only check
that everything runs; they say nothing about FP8 speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import methods as M  # noqa: E402
from results_io import save_json  # noqa: E402

# The reference and the CLI's default (every row merged each step: its cost is the question).
DEFAULT_METHODS = ("bf16-lora,fp8-base-lora,fp8-all-lora,qlora-nf4,falqon,"
                   "falqon[init=random,reset=merged,rounding=stochastic,top_k=all]")
SHAPES = {  # hidden, intermediate, layers, heads
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "smoke": (128, 320, 2, 4),
}
FP8_CALL = "__cublas$lt$matmul$f8"
FP8_KINDS = ("fp8-base-lora", "fp8-all-lora", "falqon")
# Elementwise work common to every method, per layer and step (norms, RoPE, residual
# adds, silu*mul, softmax over fwd, recompute and bwd), in bf16 passes over an N x hidden
# tensor: the estimate behind performance-notes.md's ~44 ms at 7B (44 ms x 3 TB/s over
# 32 layers and 8448 x 4096 x 2 bytes is about 60 passes).
COMMON_PASSES = 60
TARGETS = {"bf16-lora": 1.7, "fp8-base-lora": 1.12, "qlora-nf4": 3.0}


# ----------------------------------------------------------------------------------------
# Measurement helpers


def median_time(fn, args_fn, steps, warmup):
  """Median wall time of ``fn(*args_fn())`` over ``steps`` calls after ``warmup``."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args_fn()))
  times = []
  for _ in range(steps):
    args = args_fn()
    jax.block_until_ready(args)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def compiled_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled call."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # some backends have no memory analysis
    return None


def fp8_calls(compiled) -> int | None:
  """How many cuBLASLt FP8 GEMM calls the compiled HLO holds (None off GPU)."""
  if jax.default_backend() != "gpu":
    return None
  return compiled.as_text().count(FP8_CALL)


def measure_peaks(smoke: bool, steps: int):
  """Measured bf16 and FP8 GEMM TFLOP/s (square, TN) and copy bandwidth (bytes/s)."""
  n = 256 if smoke else 8192
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  tn = (((1,), (1,)), ((), ()))
  bf16 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, tn))
  f8 = jax.jit(lambda a, b: jax.lax.dot_general(
      a, b, tn, preferred_element_type=jnp.bfloat16))
  a8, b8 = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
  t_bf16 = median_time(bf16, lambda: (a, b), steps, 2)
  t_f8 = median_time(f8, lambda: (a8, b8), steps, 2)
  size = (1 << 22) if smoke else (1 << 29)  # elements: 1 GiB of bf16 on a GPU
  x = jnp.ones((size,), jnp.bfloat16)
  scale = jax.jit(lambda x: x * 2)
  t_copy = median_time(scale, lambda: (x,), steps, 2)
  return {"bf16_tflops": 2 * n**3 / t_bf16 / 1e12, "fp8_tflops": 2 * n**3 / t_f8 / 1e12,
          "copy_gbps": 2 * 2 * size / t_copy / 1e9, "gemm_n": n, "copy_bytes": 2 * size}


# ----------------------------------------------------------------------------------------
# First-principles floor


def gemm_precision(kind: str) -> str:
  return "fp8" if kind in FP8_KINDS else "bf16"


def linear_flops(kind: str, n, din, dout, rank, fwd_passes=1):
  """(big-GEMM FLOPs, small-GEMM FLOPs) of one linear's step: forward ``fwd_passes``
  times (2 with remat), dx once; the LoRA branch and FALQON's extra rows separately."""
  big = 2 * n * din * dout * (fwd_passes + 1)
  if kind == "falqon":
    small = 2 * n * din * rank * fwd_passes + 2 * n * dout * rank  # [W; A] rows, dB
  else:  # xA, (xA)B forward; dB, d(xA), dA, dx-branch backward
    small = 2 * n * rank * (din + dout) * fwd_passes + 2 * n * rank * 2 * (din + dout)
  return big, small


def linear_traffic(kind: str, n, din, dout, rank, fwd_passes=1, fused=False) -> float:
  """Minimum bytes one linear's step moves in HBM beyond its GEMMs' own operand reads.

  Counted: the GEMMs' activation I/O (read x and write y per forward, read g and write
  dx once, bf16); weight reads (bf16 2 B, FP8 1 B per element per GEMM); quantization
  (naive: an amax read, a read and an FP8 write, 2+2+1 B per element; ``fused``: 2+1,
  and q/k/v or gate/up share one quantized input, which the caller approximates by
  quantizing x once per forward); the separate LoRA branch (re-reading x in the forward
  and for dA, reading and writing y and dx to add the branch: 2 + 2 + 4 + 4 B); NF4
  dequantization (read 0.5 B, write 2 B per element, forward and backward); FP8 weight
  transposes for dx (1 + 1 B per element).
  """
  x, y, w = n * din, n * dout, din * dout
  q = 3 if fused else 5
  act = fwd_passes * (2 * x + 2 * y) + 2 * y + 2 * x
  lora = fwd_passes * (2 * x + 4 * y) + 2 * x + 4 * x
  if kind == "bf16-lora":
    return act + 2 * w * (fwd_passes + 1) + lora
  if kind == "qlora-nf4":
    return act + (2.5 + 2) * w * (fwd_passes + 1) + lora
  if kind == "fp8-base-lora":
    return act + w * (fwd_passes + 1) + 2 * w + fwd_passes * q * x + q * y + lora
  if kind == "fp8-all-lora":  # + bf16 W quantized per pass, x quantized again for A
    return (act + (5 + 1) * w * (fwd_passes + 1) + 2 * fwd_passes * q * x + q * y
            + fwd_passes * (4 * y) + 4 * x)
  # falqon: quantize x per forward, g once; Ax is N x rank (negligible); W^T for dx.
  return act + w * (fwd_passes + 1) + 2 * w + fwd_passes * q * x + q * y


def floor_seconds(flops_bf16, flops_fp8, nbytes, peaks):
  return (flops_bf16 / (peaks["bf16_tflops"] * 1e12) + flops_fp8 / (peaks["fp8_tflops"] * 1e12)
          + nbytes / (peaks["copy_gbps"] * 1e9))


def layer_floor(kind, n, din, dout, rank, peaks, fwd_passes=1, fused=False):
  big, small = linear_flops(kind, n, din, dout, rank, fwd_passes)
  fp8_kind = gemm_precision(kind) == "fp8"
  return floor_seconds(0 if fp8_kind else big + small,
                       big + small if fp8_kind else 0,
                       linear_traffic(kind, n, din, dout, rank, fwd_passes, fused), peaks)


def model_floor(kind, n, seq, hidden, inter, layers, vocab, rank, peaks, fused=False):
  """Step floor with remat: every linear (forward twice, dx once), attention scores
  (bf16), the LM head (forward and dx, bf16) and the common elementwise passes."""
  dims = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]
  t = 0.0
  for din, dout in dims:
    t += layer_floor(kind, n, din, dout, rank, peaks, 2, fused)
  attn = 4 * n * seq * hidden * (2 + 2)  # QK^T and PV: fwd, recompute, 2x in bwd
  common = COMMON_PASSES * n * hidden * 2
  t = layers * (t + floor_seconds(attn, 0, common, peaks))
  head = 2 * 2 * n * hidden * vocab
  return t + floor_seconds(head, 0, 2 * n * vocab * 4, peaks)


# ----------------------------------------------------------------------------------------
# Layer scope


def layer_case(method: M.Method, n, din, dout, steps, warmup, peaks, gemm_cache, opts=None):
  key = jax.random.key(0)
  w = (jax.random.normal(key, (din, dout), jnp.float32) * 0.02).astype(jnp.bfloat16)
  state = method.prepare_kernel(w, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (n, din), jnp.bfloat16)
  gy = jax.random.normal(jax.random.key(3), (n, dout), jnp.bfloat16)

  def fwd_bwd(state, x, gy):
    t = {f: getattr(state, f) for f in M.trainable_fields(state)}
    y, vjp = jax.vjp(lambda t, x: M.apply_state(x, dataclasses.replace(state, **t)), t, x)
    dt, dx = vjp(gy)
    return y, dt, dx

  compiled = jax.jit(fwd_bwd).lower(state, x, gy).compile(opts)
  t = median_time(compiled, lambda: (state, x, gy), steps, warmup)
  prec = gemm_precision(method.kind)
  if (prec, n, din, dout) not in gemm_cache:
    gemm_cache[(prec, n, din, dout)] = gemm_pair_time(prec, n, din, dout, steps, warmup)
  t_gemm = gemm_cache[(prec, n, din, dout)]
  flops = 4 * n * din * dout
  peak = peaks["fp8_tflops" if prec == "fp8" else "bf16_tflops"]
  return {
      "method": method.name, "kind": method.kind, "shape": f"{din}->{dout}", "n": n,
      "ms": t * 1e3, "tflops": flops / t / 1e12, "peak_tflops": peak,
      "gemm_ms": t_gemm * 1e3, "outside": max(0.0, 1 - t_gemm / t),
      "floor_ms": layer_floor(method.kind, n, din, dout, method.rank, peaks) * 1e3,
      "compiled_mib": _mib(compiled_bytes(compiled)), "fp8_calls": fp8_calls(compiled),
      "trainable": int(sum(np.prod(getattr(state, f).shape)
                           for f in M.trainable_fields(state))),
  }


def gemm_pair_time(prec, n, din, dout, steps, warmup):
  """Time of the two big GEMMs alone (y = xW, dx = g W^T) at this shape and precision."""
  tn = (((1,), (1,)), ((), ()))
  dt = jnp.float8_e4m3fn if prec == "fp8" else jnp.bfloat16
  x = jax.random.normal(jax.random.key(0), (n, din), jnp.bfloat16).astype(dt)
  w = jax.random.normal(jax.random.key(1), (dout, din), jnp.bfloat16).astype(dt)
  wt = jnp.asarray(w.T)
  g = jax.random.normal(jax.random.key(2), (n, dout), jnp.bfloat16)
  g = g.astype(jnp.float8_e5m2 if prec == "fp8" else jnp.bfloat16)
  kw = dict(preferred_element_type=jnp.bfloat16) if prec == "fp8" else {}
  fwd = jax.jit(lambda x, w: jax.lax.dot_general(x, w, tn, **kw))
  bwd = jax.jit(lambda g, wt: jax.lax.dot_general(g, wt, tn, **kw))
  return (median_time(fwd, lambda: (x, w), steps, warmup)
          + median_time(bwd, lambda: (g, wt), steps, warmup))


# ----------------------------------------------------------------------------------------
# Model scope


def model_setup(spec, shape, layers, seq, rank):
  """(method, Llama config) of a model-scope case."""
  hidden, inter, _, heads = SHAPES[shape]
  vocab = 256 if shape == "smoke" else 32000
  method = M.make_method(spec, rank)
  if method.kind == "falqon":  # the SVD init costs minutes at 7B; A's values do not
    opts = dict(method.falqon, init="random")  # change the step time
    method = dataclasses.replace(method, falqon=tuple(sorted(opts.items())))
  cfg = M.llama_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=seq)
  return method, cfg


def state_case(spec, shape, seq, rank):
  """Bytes of the persistent training state at full depth, from shapes alone."""
  method, cfg = model_setup(spec, shape, SHAPES[shape][2], seq, rank)
  params = jax.eval_shape(lambda: M.build(cfg, jax.random.key(0), method)[1])
  opt_state = jax.eval_shape(method.optimizer().init, params)

  def nbytes(tree):
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, x)  # a key is its raw uint32 words
      total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total

  return {"method": spec, "kind": method.kind, "shape": shape, "layers": cfg.num_layers,
          "params_gib": nbytes(params) / 2**30, "opt_state_gib": nbytes(opt_state) / 2**30,
          "trainable": M.count_trainable(params)}


def model_case(spec, shape, layers, batch, seq, rank, steps, warmup, peaks, fast_compile=False):
  method, cfg = model_setup(spec, shape, layers, seq, rank)
  hidden, inter, _, _ = SHAPES[shape]
  vocab = cfg.vocab_size
  model, params = M.build(cfg, jax.random.key(0), method)
  opt = method.optimizer()
  opt_state = opt.init(params)
  trainable = M.count_trainable(params)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab)
  lr = jnp.float32(1e-4)
  step = M.make_train_step(model, opt, remat=True)
  compiled = step.lower(params, opt_state, tokens, lr).compile(
      M.FAST_COMPILE if fast_compile else None)
  calls = fp8_calls(compiled)
  mem = compiled_bytes(compiled)
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], tokens, lr)
    return loss

  t = median_time(run, lambda: (), steps, warmup)  # donated: the state threads through
  finite = bool(jnp.isfinite(run()))
  n = batch * seq
  return {
      "method": spec, "kind": method.kind, "shape": shape, "layers": layers, "n": n,
      "ms": t * 1e3, "tokens_per_s": n / t, "compiled_mib": _mib(mem),
      "device_peak_mib": _mib(device_peak_bytes()), "trainable": trainable,
      "fp8_calls": calls, "finite_loss": finite,
      "floor_ms": model_floor(method.kind, n, seq, hidden, inter, layers, vocab, rank,
                              peaks) * 1e3,
      "floor_fused_ms": model_floor(method.kind, n, seq, hidden, inter, layers, vocab,
                                    rank, peaks, fused=True) * 1e3,
  }


def _mib(b):
  return None if b is None else b / 2**20


def run_isolated(task: dict) -> dict:
  """One model-scope case in a fresh process (a clean device peak-memory counter)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                         json.dumps(task)], capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"method": task["spec"], "shape": task["shape"], "layers": task["layers"],
            "error": tail[0][:300]}
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------
# Tables


def fmt(v, spec=".2f", none="-"):
  return none if v is None else format(v, spec)


def print_layer_table(rows, peaks):
  print(f"\nLayer scope: one linear, forward + backward, N tokens. Peaks measured here:"
        f" bf16 {peaks['bf16_tflops']:.3g} TFLOP/s, fp8 {peaks['fp8_tflops']:.3g} TFLOP/s"
        f" ({peaks['gemm_n']}^3 TN), copy {peaks['copy_gbps']:.0f} GB/s")
  w = max([len(r["method"]) for r in rows] + [12])
  head = (f"{'shape':>12} {'method':<{w}} {'ms':>9} {'vs bf16':>7} {'TFLOP/s':>8}"
          f" {'%peak':>6} {'outside':>7} {'floor ms':>9} {'MiB':>8} {'fp8 GEMMs':>9}")
  print(head)
  base = {r["shape"]: r["ms"] for r in rows if r["kind"] == "bf16-lora"}
  for r in rows:
    ratio = base.get(r["shape"], float("nan")) / r["ms"]
    print(f"{r['shape']:>12} {r['method']:<{w}} {r['ms']:9.3f} {ratio:6.2f}x"
          f" {r['tflops']:8.2f} {100 * r['tflops'] / r['peak_tflops']:5.0f}%"
          f" {100 * r['outside']:6.0f}% {r['floor_ms']:9.3f} {fmt(r['compiled_mib'], '8.1f')}"
          f" {fp8_label(r):>9}")


def fp8_label(r):
  if r.get("fp8_calls") is None:
    return "n/a"
  if r["kind"] in FP8_KINDS:
    return f"{r['fp8_calls']} ok" if r["fp8_calls"] else "0 MISSING"
  return str(r["fp8_calls"])


def print_model_table(rows, extrapolated):
  print("\nModel scope: one optimizer step (remat per layer, all linears adapted)")
  w = max([len(r["method"]) for r in rows] + [12])
  print(f"{'shape':>6} {'L':>3} {'method':<{w}} {'ms':>9} {'vs bf16':>7} {'tok/s':>9}"
        f" {'floor ms':>9} {'fused':>8} {'comp MiB':>9} {'peak MiB':>9} {'mem/bf16':>8}"
        f" {'trainable':>11} {'fp8 GEMMs':>9}")
  base = {(r["shape"], r["layers"]): r for r in rows
          if r.get("kind") == "bf16-lora" and "error" not in r}
  for r in rows:
    if "error" in r:
      print(f"{r['shape']:>6} {r['layers']:>3} {r['method']:<{w}} FAILED: {r['error']}")
      continue
    b = base.get((r["shape"], r["layers"]))
    ratio = b["ms"] / r["ms"] if b else float("nan")
    mem = r["device_peak_mib"] or r["compiled_mib"]
    bmem = b and (b["device_peak_mib"] or b["compiled_mib"])
    mem_ratio = fmt(mem / bmem if mem and bmem else None, "7.2f") + "x"
    print(f"{r['shape']:>6} {r['layers']:>3} {r['method']:<{w}} {r['ms']:9.1f} {ratio:6.2f}x"
          f" {r['tokens_per_s']:9.0f} {r['floor_ms']:9.1f} {r['floor_fused_ms']:8.1f}"
          f" {fmt(r['compiled_mib'], '9.0f')} {fmt(r['device_peak_mib'], '9.0f')}"
          f" {mem_ratio:>8} {r['trainable']:11,d} {fp8_label(r):>9}")
  for e in extrapolated:
    print(f"  extrapolated {e['shape']} to {e['full_layers']} layers: {e['method']:<{w}}"
          f" {e['per_layer_ms']:.2f} ms/layer, {e['full_ms']:.0f} ms/step"
          f" ({e['vs_bf16']:.2f}x vs bf16-lora)")


def print_state_table(rows):
  print("\nPersistent state at full depth (params + optimizer state, exact from shapes)")
  w = max([len(r["method"]) for r in rows] + [12])
  print(f"{'shape':>6} {'L':>3} {'method':<{w}} {'params GiB':>10} {'opt GiB':>8}"
        f" {'total GiB':>9} {'vs bf16':>7} {'trainable':>13}")
  base = {r["shape"]: r["params_gib"] + r["opt_state_gib"] for r in rows
          if r["kind"] == "bf16-lora"}
  for r in rows:
    total = r["params_gib"] + r["opt_state_gib"]
    ratio = fmt(total / base[r["shape"]] if r["shape"] in base else None, "6.2f") + "x"
    print(f"{r['shape']:>6} {r['layers']:>3} {r['method']:<{w}} {r['params_gib']:10.2f}"
          f" {r['opt_state_gib']:8.2f} {total:9.2f} {ratio:>7} {r['trainable']:13,d}")


def check_targets(rows):
  """Model-scope targets of the issue (GPU only): speedups and peak memory."""
  lines = []
  by = {}
  for r in rows:
    if "error" not in r:
      by.setdefault((r["shape"], r["layers"]), {})[r["method"]] = r
  for (shape, layers), group in by.items():
    for name, r in group.items():
      if r["kind"] != "falqon":
        continue
      for base_kind, target in TARGETS.items():
        b = next((x for x in group.values() if x["kind"] == base_kind), None)
        if b:
          got = b["ms"] / r["ms"]
          lines.append(f"{shape} L={layers} {name} vs {base_kind}: {got:.2f}x"
                       f" (target >= {target}x) {'met' if got >= target else 'MISSED'}")
      b = next((x for x in group.values() if x["kind"] == "bf16-lora"), None)
      mem, bmem = r.get("device_peak_mib"), b and b.get("device_peak_mib")
      if mem and bmem:
        lines.append(f"{shape} L={layers} {name} peak memory {mem / bmem:.2f}x bf16-lora"
                     f" (target <= 0.6x) {'met' if mem / bmem <= 0.6 else 'MISSED'}")
  return lines


def extrapolate(rows):
  """Per-layer slope between two depths, and the full-depth step time it implies."""
  out = []
  groups = {}
  for r in rows:
    if "error" not in r:
      groups.setdefault((r["shape"], r["method"]), []).append(r)
  bf16 = {}
  for (shape, name), rs in groups.items():
    if len(rs) < 2:
      continue
    rs = sorted(rs, key=lambda r: r["layers"])
    lo, hi = rs[0], rs[-1]
    per = (hi["ms"] - lo["ms"]) / (hi["layers"] - lo["layers"])
    full = SHAPES[shape][2]
    e = {"shape": shape, "method": name, "kind": hi["kind"], "per_layer_ms": per,
         "full_layers": full, "full_ms": hi["ms"] + per * (full - hi["layers"])}
    out.append(e)
    if hi["kind"] == "bf16-lora":
      bf16[shape] = e["full_ms"]
  for e in out:
    e["vs_bf16"] = bf16.get(e["shape"], float("nan")) / e["full_ms"]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scope", choices=("layer", "model", "state", "all"), default="all")
  parser.add_argument("--methods", default=DEFAULT_METHODS,
                      help="comma list of method specs (falqon options in brackets)")
  parser.add_argument("--shape", default="7b", help="model shape(s): 7b, 13b, comma list")
  parser.add_argument("--layers", default=None,
                      help="depth(s) for the model scope, e.g. 32 or 4,8 (default: full)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=528)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (automatic on CPU): a correctness run, not a benchmark")
  parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                      help="each model-scope case in a fresh process (auto: on GPU)")
  parser.add_argument("--json", default=None, help="write every figure to this file")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:  # one isolated model-scope case; prints its JSON row
    task = json.loads(args.worker)
    print(json.dumps(model_case(**task)))
    return None

  backend = jax.default_backend()
  # The state scope only sums shapes: full sizes on any device, unless asked for smoke.
  smoke = args.smoke or (backend == "cpu" and args.scope != "state")
  specs = [s for s in _split_specs(args.methods)]
  for s in specs:
    M.make_method(s, args.rank)  # fail early on a bad spec
  if smoke:
    shapes, batch, seq, rank = ["smoke"], 2, 32, 16
    layer_dims = [(128, 128), (128, 320), (320, 128)]
    steps, warmup = min(args.steps, 3), 1
  else:
    shapes, batch, seq, rank = args.shape.split(","), args.batch, args.seq, args.rank
    layer_dims = [(4096, 4096), (4096, 11008), (11008, 4096)]
    steps, warmup = args.steps, args.warmup
  for s in shapes:
    if s not in SHAPES:
      raise SystemExit(f"unknown --shape {s!r}; use 7b, 13b or a comma list of them")
  n = batch * seq
  device = f"{jax.devices()[0].device_kind} ({backend})"
  size = "SMOKE (tiny sizes)" if smoke else "full sizes"
  print(f"device: {device}, jax {jax.__version__}, {size}")
  if backend == "cpu" and args.scope != "state":
    print("CPU: FP8 is emulated (converted to f32); these timings say nothing about FP8 speed.")
  peaks = measure_peaks(smoke, steps) if args.scope != "state" else None
  result = {"device": device, "backend": backend, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "smoke": smoke, "peaks": peaks, "layer": [], "model": [], "extrapolated": [],
            "state": [], "targets": []}

  if args.scope in ("state", "all"):
    for shape in shapes:
      for spec in specs:
        result["state"].append(state_case(spec, shape, seq, rank))
    print_state_table(result["state"])
    save_json(result, args.json)

  if args.scope in ("layer", "all"):
    cache = {}
    for din, dout in layer_dims:
      for spec in specs:
        method = M.make_method(spec, rank)
        result["layer"].append(layer_case(method, n, din, dout, steps, warmup, peaks, cache,
                                           M.FAST_COMPILE if smoke else None))
        save_json(result, args.json)
    print_layer_table(result["layer"], peaks)

  if args.scope in ("model", "all"):
    isolate = args.isolate == "yes" or (args.isolate == "auto" and backend == "gpu")
    for shape in shapes:
      depths = ([SHAPES[shape][2]] if args.layers is None or smoke
                else [int(d) for d in args.layers.split(",")])
      for layers in depths:
        for spec in specs:
          task = dict(spec=spec, shape=shape, layers=layers, batch=batch, seq=seq,
                      rank=rank, steps=steps, warmup=warmup, peaks=peaks,
                      fast_compile=smoke)
          row = run_isolated(task) if isolate else model_case(**task)
          result["model"].append(row)
          save_json(result, args.json)
          print(f"  done: {shape} L={layers} {spec}: "
                + (row.get("error") or f"{row['ms']:.1f} ms"), flush=True)
    result["extrapolated"] = extrapolate(result["model"])
    print_model_table(result["model"], result["extrapolated"])
    if backend == "gpu" and not smoke:
      result["targets"] = check_targets(result["model"])
      print("\nTargets (model scope):")
      for line in result["targets"]:
        print("  " + line)

  save_json(result, args.json)
  if args.json:
    print(f"\nwrote {args.json}")
  return result


def _split_specs(text):
  """Splits a comma list of specs, keeping commas inside brackets."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch == "[") - (ch == "]")
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  return [s.strip() for s in out + [cur] if s.strip()]


if __name__ == "__main__":
  main()
