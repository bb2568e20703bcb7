"""Which TPU generations run FALQON's FP8 GEMMs at FP8 speed: read from the TPU compiler.

No TPU is needed: with libtpu installed, JAX compiles for a named TPU topology without a
device (deviceless AOT, as MaxText's train_compile.py does). For each generation this
compiles the library's ``melded_dense`` forward and its backward (gradients for ``x`` and
the kernel's ``delta`` against a cotangent input), and, for each of their FP8 GEMMs, a
plain bf16 ``dot_general`` of the same shape. It reads the compiled HLO:

* operands: the element types the ``convolution`` (XLA TPU's dot) consumes. ``f8e4m3fn`` /
  ``f8e5m2`` there means no ``convert`` to bf16/f32 was inserted before the dot in HLO.
* fp8/bf16: the compiler's own cost-model estimate (``estimated_cycles`` of the dot's
  fusion) over that of the bf16 dot. TPUs without FP8 matrix units still take f8 operands
  in HLO and widen them inside the dot's emitter, so this ratio is what tells them apart:
  about 0.5 where the MXU runs FP8 at twice the bf16 rate, 1 or more where it upcasts.

Each pass is compiled twice: with default options, and with every buffer kept in HBM
(``xla_max_cross_program_prefetches=0``, ``xla_{jf,vf,gf}_vmem_memory_space_assignment``
off), since in a one-layer program the compiler may park a whole operand in VMEM and
leave the dot a fallback tiling. verdict: ``native fp8 dot`` when every GEMM of the pass
takes f8 operands and, in the HBM-only compile, the pass's GEMMs are estimated at most
0.75x the bf16 cycles (halfway between the two rates), else ``upcast``. These are
compiler estimates for one TensorCore, not measured times.

Usage:
  pip install 'jax[tpu]'   # libtpu matching jax
  python benchmarks/tpu_fp8_hlo.py
  python benchmarks/tpu_fp8_hlo.py --generations v6e:2x2 tpu7x:2x2x1 --dump /tmp/hlo
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import sys

# Deviceless: keep JAX's own default backend on the CPU, and tell libtpu there is no TPU
# metadata server or worker list to look for (else it logs errors while loading).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import falqon_jax  # noqa: E402

# The smallest slice of each generation the topology API accepts (one host's chips).
GENERATIONS = ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1"]
NATIVE_MAX_RATIO = 0.75
DEFAULT_OPTIONS = {}
# A lone layer's program may place a whole operand in VMEM (a cross-program prefetch or
# memory-space assignment); the dot then gets too little scratch VMEM and a fallback tiling,
# and its estimate says more about that placement than about the dot's rate. The verdict
# reads the compile that keeps every buffer in HBM.
# libtpu keeps one memory-space-assignment switch per TPU family (jf, vf, gf).
HBM_ONLY = {"xla_max_cross_program_prefetches": 0,
            **{f"xla_{fam}_vmem_memory_space_assignment": False for fam in ("jf", "vf", "gf")}}
_TN = (((1,), (1,)), ((), ()))  # the library's GEMM layout: both operands contract last

_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_CONV = re.compile(r"(?:convolution|dot)\(%([\w.\-]+), %([\w.\-]+)\)")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')


def gemms(hlo_text):
  """Every dot in compiled TPU HLO: output shape, operand dtypes, estimated cycles."""
  dtypes, found, cycles, comp = {}, [], {}, None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, dtype, dims = m.groups()
    dtypes[name] = dtype
    own = _CYCLES.search(line)
    calls = _CALLS.search(line)
    if own and calls:  # a fusion's estimate covers the computation it calls
      cycles[calls.group(1)] = int(own.group(1))
    conv = _CONV.search(line)
    if conv and re.search(r"\} (?:convolution|dot)\(", line):
      shape = tuple(int(d) for d in dims.split(",") if d)
      found.append(dict(shape=shape, operands=conv.groups(), comp=comp,
                        cycles=int(own.group(1)) if own else None))
  for g in found:
    g["operands"] = tuple(dtypes[o] for o in g["operands"])
    if g["cycles"] is None:
      g["cycles"] = cycles.get(g["comp"])
  return found


def _compile(fn, args, device, options):
  sharding = jax.sharding.SingleDeviceSharding(device)
  lowered = jax.jit(fn, in_shardings=sharding, out_shardings=sharding).lower(*args)
  return lowered.compile(compiler_options=options)


def _bf16_cycles(device, a_shape, b_shape, precision, options):
  """Estimated cycles of the same TN dot_general with bf16 operands."""
  a = jax.ShapeDtypeStruct(a_shape, jnp.bfloat16)
  b = jax.ShapeDtypeStruct(b_shape, jnp.bfloat16)
  dot = lambda a, b: lax.dot_general(a, b, _TN, precision=precision,
                                     preferred_element_type=jnp.float32)
  (g,) = gemms(_compile(dot, (a, b), device, options).as_text())
  return g["cycles"]


def _write(path, text):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def check_generation(topology, n, d_in, d_out, rank, dump=None):
  """Rows (pass, operands, fp8/bf16 default, fp8/bf16 HBM only, verdict) for a topology."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology, "tpu").devices[0]
  mk = jax.eval_shape(lambda k: falqon_jax.meld_kernel(k, rank),
                      jax.ShapeDtypeStruct((d_in, d_out), jnp.float32))
  x = jax.ShapeDtypeStruct((n, d_in), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((n, d_out), jnp.bfloat16)

  def backward(x, mk, g):
    # A cotangent input, so XLA cannot fold the e5m2 quantization of g into a constant.
    loss = lambda x, delta: jnp.sum(
        (falqon_jax.melded_dense(x, mk.replace(delta=delta)) * g).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(x, mk.delta)

  # Each GEMM by its output shape, with the operand shapes and precision the library uses.
  passes = {
      "forward": (falqon_jax.melded_dense, (x, mk), {
          (n, d_out + rank): ((n, d_in), (d_out + rank, d_in), lax.Precision.DEFAULT)}),
      "backward": (backward, (x, mk, g), {
          (n, d_in): ((n, d_out), (d_in, d_out), lax.Precision.HIGHEST),
          (d_out, rank): ((d_out, n), (rank, n), lax.Precision.HIGHEST)}),
  }
  rows = []
  for name, (fn, args, wanted) in passes.items():
    ratios = []
    for opts in (DEFAULT_OPTIONS, HBM_ONLY):
      text = _compile(fn, args, device, opts).as_text()
      if dump:
        tag = "" if opts == DEFAULT_OPTIONS else "_hbm_only"
        _write(os.path.join(dump, f"{topology.replace(':', '_')}_{name}{tag}.hlo"), text)
      found = {tuple(gm["shape"]): gm for gm in gemms(text)}
      missing = [s for s in wanted if s not in found]
      if missing:
        raise RuntimeError(f"no dot of shape {missing[0]} in the compiled {name} pass")
      ops = [found[shape]["operands"] for shape in wanted]
      fp8_cycles = sum(found[shape]["cycles"] for shape in wanted)
      bf16_cycles = sum(_bf16_cycles(device, *wanted[shape], opts) for shape in wanted)
      ratios.append(fp8_cycles / bf16_cycles)
    # HLO prints a buffer placed in VMEM with memory space S(1).
    placed = " (a buffer still in VMEM)" if "S(1)}" in text else ""
    if not all(t.startswith("f8") for pair in ops for t in pair):
      verdict = "upcast (convert before the dot)"
    elif ratios[1] <= NATIVE_MAX_RATIO:
      verdict = "native fp8 dot"
    else:
      verdict = "upcast (in the dot emitter)"
    rows.append((name, ", ".join(" x ".join(p) for p in ops), *ratios, verdict + placed))
  return device.device_kind, rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--generations", nargs="+", default=GENERATIONS,
                 help="TPU topology names (e.g. v6e:2x2, tpu7x:2x2x1)")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--in_features", type=int, default=4096)
  p.add_argument("--out_features", type=int, default=4096)
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--dump", help="folder to write each compiled HLO to")
  args = p.parse_args(argv)
  if args.in_features == args.out_features + args.rank:
    # GEMMs are told apart by output shape; here dx and [y|Ax] would share one.
    p.error("--in_features must differ from --out_features + --rank; change one of them")

  if importlib.util.find_spec("libtpu") is None:
    print("tpu_fp8_hlo: libtpu is not installed; install the matching one with"
          " `pip install 'jax[tpu]'` to compile for TPUs without a device")
    return 0
  try:
    from jax.experimental import topologies
    topologies.get_topology_desc  # noqa: B018
  except (ImportError, AttributeError) as e:
    print(f"tpu_fp8_hlo: this jax has no deviceless TPU topology API ({e})")
    return 0
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)

  print(f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')};"
        f" x ({args.tokens}, {args.in_features}) bf16, melded kernel"
        f" {args.in_features}x{args.out_features} at rank {args.rank}")
  print("fp8/bf16: the compiler's estimated cycles of the pass's FP8 GEMMs over the same"
        " GEMMs in bf16 (lower is faster), with default options and with"
        " every buffer kept in HBM (the verdict's)")
  head = (f"{'generation':<13} {'chip':<12} {'pass':<9} {'dot operands':<36}"
          f" {'default':>8} {'HBM only':>8}  verdict")
  print(head)
  print("-" * len(head))
  for topo in args.generations:
    try:
      kind, rows = check_generation(topo, args.tokens, args.in_features,
                                    args.out_features, args.rank, args.dump)
    except Exception as e:  # one generation's failure (bad name, fp8 refused) is its row
      msg = " ".join(str(e).split())[:160]
      print(f"{topo:<13} {'-':<12} {'-':<9} {type(e).__name__}: {msg}")
      continue
    for name, ops, ratio, ratio_hbm, verdict in rows:
      ops = ops.replace("f8e4m3fn", "e4m3").replace("f8e5m2", "e5m2")
      print(f"{topo:<13} {kind:<12} {name:<9} {ops:<36} {ratio:>7.2f}x {ratio_hbm:>7.2f}x"
            f"  {verdict}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
