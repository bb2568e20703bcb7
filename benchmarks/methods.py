"""The fine-tuning methods the benchmarks compare, behind one interface, in pure JAX.

Every method replaces each targeted ``nn.Dense`` kernel of a linen model by a *kernel
state* (a pytree dataclass) and supplies the dense op that runs on it; one linen
interceptor (:func:`intercepted`) routes every Dense call to that op, so the same model
code (Hugging Face's Flax Llama layers, see :class:`LlamaLM`) runs all of them:

* ``bf16-lora``: frozen bf16 ``W``, LoRA ``A``/``B`` on a separate path. Every GEMM has
  bf16 operands and a bf16 result (f32 accumulation inside the GEMM); the f32 master
  copies of A and B are cast once per step, and ``alpha/r`` is folded into the small
  ``N x r`` product, not into the ``N x out`` output.
* ``fp8-base-lora``: frozen e4m3 ``W`` (quantized once, per tensor) and a bf16 LoRA
  branch, as qwix ``LoraProvider(weight_qtype=float8_e4m3fn, act_qtype=...)`` or
  Transformer Engine do. Each step quantizes x (e4m3) for the forward GEMM and g (e5m2)
  for the dx GEMM; both GEMMs are FP8 ``lax.dot_general`` in the TN layout with the
  scales applied after the dot.
* ``fp8-all-lora``: TorchAO's ``convert_to_float8_training`` applied to a PEFT LoRA
  model, the paper's "FP8 LoRA" baseline: the base *and* ``lora_A``/``lora_B`` are
  float8 linears with dynamic per-tensor scaling, so each one quantizes its input and its
  (bf16) weight every step, and its gradients are FP8 GEMMs too. Unlike TorchAO 0.8, the
  frozen base's weight-gradient GEMM is never computed (XLA drops it as dead code), so
  this baseline is stronger than the paper's.
* ``qlora-nf4``: NF4 backbone (block 64, one f32 absmax per block, no double
  quantization) dequantized to bf16 before each GEMM, forward and backward (recomputed,
  never saved, as bitsandbytes does), plus a bf16 LoRA branch.
* ``falqon``: ``falqon_jax.meld`` + ``falqon_jax.proxy_update``; the options of
  ``proxy_update`` (``reset``, ``rounding``, ``top_k``, ``warmup_steps``) and of the meld
  (``scaling``, ``init``) select the variant.

Each :class:`Method` also builds its optimizer step. All of them use the same inner
optimizer (clip the global norm at 3.0, Adam (0.9, 0.999), constant learning rate, no
weight decay, as the FALQON reference), with the learning rate passed at each call so
that one compiled step serves a whole learning-rate sweep.

qwix 0.1.8 (``LoraProvider`` with fp8 or nf4 weights) installs beside jax 0.10.2 and runs,
but it is not used here: it owns its LoRA params (``kernel_lora_a``/``_b``), which does not
fit this one-tree harness, and in its fp8 LoRA path only the forward is an FP8 dot (NN
layout); the dx product is a bf16 x fp8 dot, i.e. a dequantized bf16 GEMM (checked on
its jaxpr, CPU). The FP8 baselines below quantize g to e5m2 for an FP8 dx GEMM, as
Transformer Engine does, which makes them the stronger baselines. qwix's nf4 is per
output channel by default; QLoRA's (and this file's) is per block of 64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import falqon_jax
from falqon_jax import fp8

METHODS = ("bf16-lora", "fp8-base-lora", "fp8-all-lora", "qlora-nf4", "falqon")
"""The five methods, in the order the tables print them."""

DIAGNOSTICS = ("lora-fa",)
"""Not baselines but yardsticks, run on request. ``lora-fa``: FALQON's parameterization
with no FP8 at all (bf16 ``W``, ``A`` frozen at FALQON's SVD init, only ``B`` trained,
``W + BA`` exact). Its gain is what FALQON could keep if the FP8 merge lost nothing."""

LLAMA_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
"""Every linear of a Llama decoder layer (the paper puts LoRA on all of them)."""

_TN = (((1,), (1,)), ((), ()))  # contract the last dim of both 2-D operands

FAST_COMPILE = {"xla_backend_optimization_level": 0}
"""Compiler options for the tiny CI runs: XLA CPU's backend optimizations take about
two thirds of a small model's compile time and change nothing that a smoke run checks."""


# ----------------------------------------------------------------------------------------
# Kernel states


def _state(cls):
  """A frozen dataclass registered as a pytree; fields marked static are metadata."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(cls)


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@_state
class LoraKernel:
  """bf16-lora: frozen ``w`` (in, out) bf16; trainable ``a`` (in, r), ``b`` (r, out) f32."""

  w: jax.Array
  a: jax.Array
  b: jax.Array
  scaling: float = _static(1.0)
  trainable = ("a", "b")


@_state
class LoraFaKernel(LoraKernel):
  """lora-fa: a :class:`LoraKernel` whose ``a`` is frozen too; only ``b`` trains."""

  trainable = ("b",)


@_state
class Fp8BaseLoraKernel:
  """fp8-base-lora: frozen ``qw`` (out, in) e4m3 with scale ``w_scale``; ``a``, ``b`` f32."""

  qw: jax.Array
  w_scale: jax.Array
  a: jax.Array
  b: jax.Array
  scaling: float = _static(1.0)
  trainable = ("a", "b")


@_state
class Fp8AllLoraKernel:
  """fp8-all-lora: bf16 ``w`` (in, out) cast to e4m3 every step; ``a``, ``b`` f32."""

  w: jax.Array
  a: jax.Array
  b: jax.Array
  scaling: float = _static(1.0)
  trainable = ("a", "b")


@_state
class Nf4LoraKernel:
  """qlora-nf4: ``codes`` (out, in // 2) uint8, two 4-bit NF4 codes per byte, and
  ``absmax`` (out, in // 64) f32; ``a``, ``b`` f32."""

  codes: jax.Array
  absmax: jax.Array
  a: jax.Array
  b: jax.Array
  scaling: float = _static(1.0)
  trainable = ("a", "b")


STATE_TYPES = (LoraKernel, LoraFaKernel, Fp8BaseLoraKernel, Fp8AllLoraKernel, Nf4LoraKernel,
               falqon_jax.MeldedKernel)


def is_state(x) -> bool:
  return isinstance(x, STATE_TYPES)


def trainable_fields(state) -> tuple[str, ...]:
  if isinstance(state, falqon_jax.MeldedKernel):
    return ("delta",)
  return type(state).trainable


# ----------------------------------------------------------------------------------------
# FP8 and NF4 building blocks


def _quantize(x, fmt):
  """Dynamic per-tensor scale and saturating cast (falqon_jax.fp8 numerics)."""
  scale = fp8.compute_scale(x, fmt)
  return fp8.quantize(x, scale, fmt), scale


def _fp8_tn(a, b, inv_scale, precision, out_dtype):
  """``(a @ b.T) * inv_scale`` on fp8 operands: the pattern XLA maps to cuBLASLt FP8."""
  acc = lax.dot_general(a, b, _TN, precision=precision, preferred_element_type=jnp.float32)
  return (acc * inv_scale).astype(out_dtype)


# fp8-base-lora: frozen FP8 weight; dx in FP8; no weight gradient; nothing saved but
# references to the frozen weight.
@jax.custom_vjp
def frozen_fp8_matmul(x2, qw, w_scale):
  """``x2 (N, in) @ W`` for a frozen e4m3 ``qw (out, in)``: forward e4m3 x e4m3, backward
  ``dx = e5m2(g) . W``. ``qw`` and ``w_scale`` get no gradient."""
  return _frozen_fwd(x2, qw, w_scale)[0]


def _frozen_fwd(x2, qw, w_scale):
  xq, sx = _quantize(x2, fp8.E4M3)
  y = _fp8_tn(xq, qw, (1.0 / sx) * (1.0 / w_scale), lax.Precision.DEFAULT, x2.dtype)
  return y, (qw, w_scale, jnp.zeros((), x2.dtype))


def _frozen_bwd(res, g):
  qw, w_scale, like = res
  gq, sg = _quantize(g, fp8.E5M2)
  # TN needs the contracting dim (out) last on both sides: transpose the fp8 weight.
  dx = _fp8_tn(gq, qw.T, (1.0 / sg) * (1.0 / w_scale), lax.Precision.HIGHEST, like.dtype)
  return dx, None, None


frozen_fp8_matmul.defvjp(_frozen_fwd, _frozen_bwd)


# fp8-all-lora: TorchAO's Float8Linear with dynamic tensorwise scaling. Input and weight
# are cast to e4m3 every step (the fp8 copies are what backward uses), g to e5m2.
@jax.custom_vjp
def float8_linear(x2, w):
  """``x2 (N, in) @ w (in, out)`` as TorchAO's float8 linear: three FP8 GEMMs."""
  return _f8l_fwd(x2, w)[0]


def _f8l_fwd(x2, w):
  xq, sx = _quantize(x2, fp8.E4M3)
  wq, sw = _quantize(w, fp8.E4M3)
  y = _fp8_tn(xq, wq.T, (1.0 / sx) * (1.0 / sw), lax.Precision.DEFAULT, x2.dtype)
  return y, (xq, sx, wq, sw, jnp.zeros((), x2.dtype), jnp.zeros((), w.dtype))


def _f8l_bwd(res, g):
  xq, sx, wq, sw, like_x, like_w = res
  gq, sg = _quantize(g, fp8.E5M2)
  dx = _fp8_tn(gq, wq, (1.0 / sg) * (1.0 / sw), lax.Precision.HIGHEST, like_x.dtype)
  # Weight gradient; XLA removes it as dead code when w is frozen.
  dw = _fp8_tn(xq.T, gq.T, (1.0 / sx) * (1.0 / sg), lax.Precision.HIGHEST, jnp.float32)
  return dx, dw.astype(like_w.dtype)


float8_linear.defvjp(_f8l_fwd, _f8l_bwd)


NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
"""The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023), in code order."""

NF4_BLOCK = 64


def nf4_quantize(w_out_in: jax.Array):
  """NF4 codes (out, in // 2) uint8 and absmax (out, in // 64) f32 for a (out, in) weight."""
  out_f, in_f = w_out_in.shape
  if in_f % NF4_BLOCK:
    raise ValueError(f"NF4 needs in_features divisible by {NF4_BLOCK}, got {in_f}")
  blocks = w_out_in.astype(jnp.float32).reshape(out_f, in_f // NF4_BLOCK, NF4_BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  # Nearest level via the midpoints (no 16x temporary, unlike an argmin over levels).
  mids = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
  codes = jnp.searchsorted(mids, normed.reshape(out_f, in_f)).astype(jnp.uint8)
  packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
  return packed, absmax


def nf4_dequantize(codes, absmax, dtype=jnp.bfloat16):
  """The (out, in) weight in ``dtype`` from packed NF4 codes and block absmax."""
  out_f = codes.shape[0]
  hi, lo = codes >> 4, codes & 0xF
  idx = jnp.stack([hi, lo], axis=-1).reshape(out_f, -1, NF4_BLOCK)
  vals = jnp.asarray(NF4_CODE)[idx] * absmax[..., None]
  return vals.reshape(out_f, -1).astype(dtype)


@jax.custom_vjp
def nf4_matmul(x2, codes, absmax):
  """``x2 @ W`` for a frozen NF4 weight: dequantized to x's dtype in the forward and again
  in the backward (never saved), as bitsandbytes does."""
  w = nf4_dequantize(codes, absmax, x2.dtype)
  return lax.dot_general(x2, w, _TN)


def _nf4_fwd(x2, codes, absmax):
  return nf4_matmul(x2, codes, absmax), (codes, absmax, jnp.zeros((), x2.dtype))


def _nf4_bwd(res, g):
  codes, absmax, like = res
  w = nf4_dequantize(codes, absmax, like.dtype)
  return jnp.dot(g.astype(like.dtype), w), None, None


nf4_matmul.defvjp(_nf4_fwd, _nf4_bwd)


# ----------------------------------------------------------------------------------------
# The dense op of every state


def _lora_branch(x2, a, b, scaling, dtype):
  """``((x A) * scaling) B`` with bf16 GEMMs; the scaling touches only the N x r product."""
  ax = jnp.dot(x2, a.astype(dtype))
  return jnp.dot(ax * jnp.asarray(scaling, dtype), b.astype(dtype))


def apply_state(x: jax.Array, state, bias=None) -> jax.Array:
  """``x (..., in) -> (..., out)`` through any kernel state, in x's dtype."""
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  dt = x.dtype
  if isinstance(state, falqon_jax.MeldedKernel):
    return falqon_jax.melded_dense(x, state, bias)
  if isinstance(state, LoraKernel):  # lora-fa included
    y = jnp.dot(x2, state.w.astype(dt)) + _lora_branch(x2, state.a, state.b, state.scaling, dt)
  elif isinstance(state, Fp8BaseLoraKernel):
    y = frozen_fp8_matmul(x2, state.qw, state.w_scale)
    y = y + _lora_branch(x2, state.a, state.b, state.scaling, dt)
  elif isinstance(state, Fp8AllLoraKernel):
    y = float8_linear(x2, state.w)
    ax = float8_linear(x2, state.a.astype(dt)) * jnp.asarray(state.scaling, dt)
    y = y + float8_linear(ax, state.b.astype(dt))
  elif isinstance(state, Nf4LoraKernel):
    y = nf4_matmul(x2, state.codes, state.absmax)
    y = y + _lora_branch(x2, state.a, state.b, state.scaling, dt)
  else:
    raise TypeError(f"not a kernel state: {type(state).__name__}")
  y = y.reshape(*lead, y.shape[-1])
  return y if bias is None else y + bias.astype(y.dtype)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != "__call__" or module.scope is None
      or not isinstance(module, nn.Dense) or not module.has_variable("params", "kernel")):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  if not is_state(kernel):
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  dtype = module.dtype or jnp.asarray(x).dtype
  bias = module.get_variable("params", "bias") if module.use_bias else None
  return apply_state(jnp.asarray(x, dtype), kernel, bias)


@contextlib.contextmanager
def intercepted():
  """Routes every ``nn.Dense`` whose kernel is a kernel state to :func:`apply_state`.

  Put the ``with`` inside the traced (jitted) function: interception acts at trace time.
  """
  with nn.intercept_methods(_interceptor):
    yield


# ----------------------------------------------------------------------------------------
# Methods


def _lora_init(key, in_f, out_f, rank):
  """PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0 (f32 masters)."""
  bound = 1.0 / np.sqrt(in_f)
  a = jax.random.uniform(key, (in_f, rank), jnp.float32, -bound, bound)
  return a, jnp.zeros((rank, out_f), jnp.float32)


class LrArgState(optax.EmptyState):
  pass


def scale_by_lr_arg() -> optax.GradientTransformationExtraArgs:
  """``-lr * updates`` with ``lr`` passed to ``update(..., lr=...)``: one compiled step
  serves every learning rate of a sweep."""

  def init(params):
    del params
    return LrArgState()

  def update(updates, state, params=None, *, lr, **extra):
    del params, extra
    return jax.tree_util.tree_map(lambda u: -lr * u, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def inner_optimizer(clip: float = 3.0) -> optax.GradientTransformationExtraArgs:
  """The shared optimizer: global-norm clip, Adam(0.9, 0.999, 1e-8), lr from the call."""
  return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(),
                     scale_by_lr_arg())


def trainable_tree(params):
  """The trainable leaves: a dict per kernel state, None elsewhere."""
  return jax.tree_util.tree_map(
      lambda p: {f: getattr(p, f) for f in trainable_fields(p)} if is_state(p) else None,
      params, is_leaf=is_state)


def with_trainable(params, trainable):
  """``params`` with the trainable leaves of each kernel state replaced."""
  return jax.tree_util.tree_map(
      lambda p, t: dataclasses.replace(p, **t) if is_state(p) else p,
      params, trainable, is_leaf=is_state)


def states_only(params):
  return jax.tree_util.tree_map(lambda p: p if is_state(p) else None, params,
                                is_leaf=is_state)


def count_trainable(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable_tree(params)))


@dataclasses.dataclass(frozen=True)
class Method:
  """One fine-tuning method.

  Attributes:
    name: the label in tables (e.g. ``falqon``, ``falqon[merged,stochastic]``).
    kind: one of :data:`METHODS`.
    rank: LoRA rank.
    alpha: LoRA alpha; the LoRA branch is scaled by ``alpha / rank`` (FALQON has none).
    falqon: ``proxy_update`` options (``reset``, ``rounding``, ``top_k``,
      ``warmup_steps``) plus ``scaling`` and ``init`` for the meld.
  """

  name: str
  kind: str
  rank: int = 64
  alpha: float = 16.0
  falqon: tuple = ()

  def __post_init__(self):
    if self.kind not in METHODS + DIAGNOSTICS:
      raise ValueError(f"unknown method kind {self.kind!r}; use one of "
                       f"{', '.join(METHODS + DIAGNOSTICS)}")

  @property
  def options(self) -> dict:
    return dict(self.falqon)

  def prepare_kernel(self, kernel: jax.Array, key: jax.Array):
    """The kernel state for one Flax ``(in, out)`` kernel."""
    in_f, out_f = kernel.shape
    if self.kind == "falqon":
      opts = self.options
      init = opts.get("init", "svd")
      return falqon_jax.meld_kernel(kernel.astype(jnp.float32), self.rank, init=init,
                                    key=key if init == "random" else None,
                                    scaling=opts.get("scaling", "tensor"))
    if self.kind == "lora-fa":  # FALQON's A and update unit, in exact arithmetic
      mk = falqon_jax.meld_kernel(kernel.astype(jnp.float32), self.rank)
      a = mk.lora_a(jnp.float32).T  # merging delta adds delta @ A (dequantized) to W
      return LoraFaKernel(kernel.astype(jnp.bfloat16), a,
                          jnp.zeros((self.rank, out_f), jnp.float32), 1.0)
    a, b = _lora_init(key, in_f, out_f, self.rank)
    scaling = float(self.alpha) / self.rank
    if self.kind == "bf16-lora":
      return LoraKernel(kernel.astype(jnp.bfloat16), a, b, scaling)
    if self.kind == "fp8-all-lora":
      return Fp8AllLoraKernel(kernel.astype(jnp.bfloat16), a, b, scaling)
    if self.kind == "fp8-base-lora":
      qw, s = _quantize_weight(kernel)
      return Fp8BaseLoraKernel(qw, s, a, b, scaling)
    codes, absmax = jax.jit(nf4_quantize)(kernel.T)
    return Nf4LoraKernel(codes, absmax, a, b, scaling)

  def prepare(self, params, key: jax.Array, targets: str = LLAMA_TARGETS, copy: bool = True):
    """``params`` with every kernel whose slash-joined path matches ``targets`` replaced
    by this method's state; everything else unchanged.

    With ``copy`` (the default) no leaf is shared with ``params``, so a train step that
    donates the result leaves the caller's base model intact.
    """
    pattern = re.compile(targets)
    counter = iter(range(1 << 30))

    def convert(kpath, leaf):
      path = "/".join(str(getattr(k, "key", k)) for k in kpath)
      if not pattern.search(path) or getattr(leaf, "ndim", 0) != 2:
        return leaf
      return self.prepare_kernel(leaf, jax.random.fold_in(key, next(counter)))

    out = jax.tree_util.tree_map_with_path(convert, params)
    if not any(is_state(x) for x in jax.tree_util.tree_leaves(out, is_leaf=is_state)):
      raise ValueError(f"targets {targets!r} matched no 2-D kernel")
    return jax.tree_util.tree_map(jnp.copy, out) if copy else out

  def optimizer(self, key: Optional[jax.Array] = None) -> "Optimizer":
    """The optimizer step for this method's prepared params."""
    inner = inner_optimizer()
    if self.kind != "falqon":
      return Optimizer(
          init=lambda params: inner.init(trainable_tree(params)),
          step=functools.partial(_lora_step, inner))
    opts = {k: v for k, v in self.options.items() if k not in ("scaling", "init")}
    if opts.get("rounding") == "stochastic":
      opts["key"] = jax.random.key(0) if key is None else key
    tx = falqon_jax.proxy_update(inner, **opts)
    return Optimizer(init=lambda params: tx.init(states_only(params)),
                     step=functools.partial(_falqon_step, tx))


@jax.jit
def _quantize_weight(kernel):
  """e4m3 (out, in) copy of an (in, out) kernel with one per-tensor scale."""
  s = fp8.compute_scale(kernel, fp8.E4M3)
  return fp8.quantize(kernel.T, s, fp8.E4M3), s


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """``init(params) -> state``; ``step(params, grads, state, lr) -> (params, state)``,
  where ``grads`` is the gradient of the :func:`trainable_tree`."""

  init: Callable[[Any], Any]
  step: Callable[..., Any]


def _lora_step(inner, params, grads, state, lr):
  t = trainable_tree(params)
  updates, state = inner.update(grads, state, t, lr=lr)
  return with_trainable(params, optax.apply_updates(t, updates)), state


def _falqon_step(tx, params, grads, state, lr):
  melded = states_only(params)
  grads = with_trainable(melded, grads)  # MeldedKernel nodes whose delta is the gradient
  updates, state = tx.update(grads, state, melded, lr=lr)
  new = falqon_jax.apply_updates(melded, updates)
  return jax.tree_util.tree_map(lambda p, n: n if is_state(p) else p, params, new,
                                is_leaf=is_state), state


def make_method(spec: str, rank: int, alpha: float = 16.0) -> Method:
  """A method from a spec: a kind, optionally with falqon options in brackets, e.g.
  ``falqon[reset=merged,rounding=stochastic]`` or ``falqon[top_k=4,warmup_steps=10]``."""
  m = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", spec.strip())
  if not m:
    raise ValueError(f"bad method spec {spec!r}; e.g. falqon[reset=merged,rounding=stochastic]")
  kind, opts = m.group(1), m.group(2)
  options = {}
  if opts:
    if kind != "falqon":
      raise ValueError(f"only falqon takes options, got {spec!r}")
    for item in opts.split(","):
      k, _, v = item.partition("=")
      if k not in ("reset", "rounding", "top_k", "warmup_steps", "scaling", "init") or not v:
        raise ValueError(f"bad falqon option {item!r} in {spec!r}")
      options[k] = int(v) if k == "warmup_steps" or (k == "top_k" and v != "all") else v
  return Method(spec.strip(), kind, rank, alpha, tuple(sorted(options.items())))


# ----------------------------------------------------------------------------------------
# The model: Hugging Face's Flax Llama layers, with per-layer remat


def _hf():
  from transformers.models.llama import modeling_flax_llama  # the optional [hf] extra

  return modeling_flax_llama


class _Layers(nn.Module):
  config: Any
  dtype: Any
  remat: bool

  def setup(self):
    cls = _hf().FlaxLlamaDecoderLayer
    cls = nn.remat(cls) if self.remat else cls
    self.blocks = [cls(self.config, dtype=self.dtype, name=str(i))
                   for i in range(self.config.num_hidden_layers)]

  def __call__(self, h, mask, pos):
    for block in self.blocks:
      h = block(h, mask, pos)[0]
    return h


class _Model(nn.Module):
  config: Any
  dtype: Any
  remat: bool

  def setup(self):
    cfg = self.config
    init = jax.nn.initializers.normal(cfg.initializer_range)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                                 dtype=self.dtype)
    self.layers = _Layers(cfg, self.dtype, self.remat)
    self.norm = _hf().FlaxLlamaRMSNorm(cfg, dtype=self.dtype)

  def __call__(self, input_ids):
    batch, seq = input_ids.shape
    mask = jnp.ones((batch, seq), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return self.norm(self.layers(self.embed_tokens(input_ids), mask, pos))


class LlamaLM(nn.Module):
  """A causal LM made of transformers' Flax Llama layers (``FlaxLlamaDecoderLayer``,
  ``FlaxLlamaRMSNorm``) under HF's param names (``model/layers/0/self_attn/q_proj/kernel``,
  ``lm_head/kernel``), so its tree is a ``FlaxLlamaForCausalLM`` tree.

  It exists because HF's Flax Llama has no gradient checkpointing; ``remat=True`` wraps
  each decoder layer in ``nn.remat``. Returns logits in ``dtype``.
  """

  config: Any
  dtype: Any = jnp.bfloat16
  remat: bool = True

  def setup(self):
    cfg = self.config
    self.model = _Model(cfg, self.dtype, self.remat)
    self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                            kernel_init=jax.nn.initializers.normal(cfg.initializer_range))

  def __call__(self, input_ids):
    return self.lm_head(self.model(input_ids))


def llama_config(**overrides):
  """A ``LlamaConfig`` (the [hf] extra): LLaMA-7B's shape by default."""
  import transformers

  base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
              max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.02)
  base.update(overrides)
  # transformers 4.57.6's Flax rotary table keeps only max_position_embeddings entries of
  # its 2 * head_dim sin|cos axis, so a short max length would truncate it.
  head_dim = base["hidden_size"] // base["num_attention_heads"]
  base["max_position_embeddings"] = max(base["max_position_embeddings"], 2 * head_dim)
  return transformers.LlamaConfig(**base)


def cast_floats(tree, dtype=jnp.bfloat16):
  """Every float array leaf (not kernel states) cast to ``dtype``."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if not is_state(x) and jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree, is_leaf=is_state)


def next_token_loss(logits, tokens):
  """Mean next-token cross-entropy in f32 over all positions but the last."""
  logits = logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(model: nn.Module, opt: Optimizer, loss_fn=next_token_loss,
                    donate: bool = True):
  """``step(params, opt_state, tokens, lr) -> (params, opt_state, loss)``, jitted with
  params and opt_state donated unless ``donate=False`` (donated, FALQON's merge writes
  its rows in place).

  Gradients are taken with respect to the trainable leaves only, so no method pays for
  a gradient it throws away.
  """

  def step(params, opt_state, tokens, lr):
    def loss_of(trainable):
      with intercepted():
        logits = model.apply({"params": with_trainable(params, trainable)}, tokens)
      return loss_fn(logits, tokens)

    loss, grads = jax.value_and_grad(loss_of)(trainable_tree(params))
    params, opt_state = opt.step(params, grads, opt_state, lr)
    return params, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval_loss(model: nn.Module, loss_fn=next_token_loss):
  """``eval(params, tokens) -> loss``, jitted."""

  def evaluate(params, tokens):
    with intercepted():
      return loss_fn(model.apply({"params": params}, tokens), tokens)

  return jax.jit(evaluate)
