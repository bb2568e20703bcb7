"""The fine-tuning methods the benchmarks compare, behind one interface, in pure JAX.

Every method runs the same decoder, :class:`falqon_jax.models.CausalLM` (a Llama config,
:func:`llama_config`), and replaces each targeted ``nnx.Linear`` projection by its own
layer: FALQON melds it (:func:`falqon_jax.nnx.meld`, a ``MeldedLinear``), the baselines
swap in a :class:`StateLinear` holding a *kernel state* (a pytree dataclass) that
:func:`apply_state` runs. :func:`falqon_jax.models.split` then makes the model a pure
function of a params tree in which each state is one leaf:

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
* ``falqon``: ``falqon_jax.meld`` + ``falqon_jax.proxy_update`` with
  ``falqon_jax.REFERENCE`` (the official code's semantics); fields of
  ``falqon_jax.FalqonOptions`` (:data:`FALQON_SPEC_OPTIONS`) select the variant.

Each :class:`Method` also builds its optimizer. All of them use the same inner optimizer
(clip the global norm at 3.0, Adam (0.9, 0.999), constant learning rate, no weight decay,
as the FALQON reference), with the learning rate passed at each call so that one compiled
step serves a whole learning-rate sweep. FALQON's step is the library's own
(:func:`falqon_jax.train.make_train_step`); the baselines differentiate their
trainable leaves only, with the same loss (:func:`falqon_jax.train.next_token_nll`).

qwix 0.1.8 (``LoraProvider`` with fp8 or nf4 weights) installs beside jax 0.10.2 and runs,
but it is not used here: it owns its LoRA params (``kernel_lora_a``/``_b``), which does not
fit this one-tree harness, and in its fp8 LoRA path only the forward is an FP8 dot (NN
layout); the dx product is a bf16 x fp8 dot, i.e. a dequantized bf16 GEMM (checked on
its jaxpr, CPU). The FP8 baselines below quantize g to e5m2 for an FP8 dx GEMM, as
Transformer Engine does, which makes them the stronger baselines. qwix's nf4 is per
output channel by default; QLoRA's (and this file's) is per block of 64.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import falqon_jax
from falqon_jax import _melded_dense as _md
from falqon_jax import fp8, models, train
from falqon_jax import nnx as fnnx

METHODS = ("bf16-lora", "fp8-base-lora", "fp8-all-lora", "qlora-nf4", "falqon")
"""The five methods, in the order the tables print them."""

DIAGNOSTICS = ("lora-fa",)
"""Not baselines but yardsticks, run on request. ``lora-fa``: FALQON's parameterization
with no FP8 at all (bf16 ``W``, ``A`` frozen at FALQON's SVD init, only ``B`` trained,
``W + BA`` exact). Its gain is what FALQON could keep if the FP8 merge lost nothing."""

LLAMA_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
"""Every linear of a Llama decoder layer (the paper puts LoRA on all of them), as a regex
over the CausalLM's kernel paths (``layers/0/self_attn/q_proj/kernel``)."""

INIT_STD = 0.02
"""HF Llama's ``initializer_range``: every random-init matrix is N(0, INIT_STD)."""

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
  """Dynamic per-tensor scale and saturating cast: the library's own (melded_dense's)."""
  return _md._quantize(x, fmt, "xla")


_fp8_tn = _md._fp8_gemm  # (a @ b.T) * inv_scale on fp8 operands: the library's FP8 GEMM


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


class KernelState(nnx.Variable):
  """A baseline's kernel state: one pytree leaf of the model's params, as
  :class:`falqon_jax.nnx.Melded` is for FALQON."""


class StateLinear(nnx.Module):
  """An ``nnx.Linear`` whose kernel is a baseline's kernel state:
  ``y = apply_state(x, state) + bias``, in the replaced layer's compute dtype."""

  def __init__(self, state, bias: Optional[jax.Array] = None, *, dtype=None):
    if not is_state(state) or isinstance(state, falqon_jax.MeldedKernel):
      raise TypeError(f"StateLinear needs a baseline kernel state, got {type(state).__name__}")
    self.kernel = KernelState(state)
    self.bias = None if bias is None else nnx.Param(bias)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    bias = None if self.bias is None else self.bias[...]
    return apply_state(x, self.kernel.get_value(), bias)


def swap_in(lm: nnx.Module, path: tuple, linear: nnx.Linear, state) -> None:
  """Replaces the ``nnx.Linear`` at ``path`` of ``lm`` by the layer that runs ``state``
  (a ``MeldedLinear`` for FALQON's kernel, else a :class:`StateLinear`)."""
  if isinstance(state, falqon_jax.MeldedKernel):
    fnnx.swap_in(lm, path, linear, state)
    return
  bias = None if linear.bias is None else linear.bias[...]
  parent = lm
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  setattr(parent, path[-1], StateLinear(state, bias, dtype=linear.dtype))


def _matcher(targets: str):
  pattern = re.compile(targets)
  return lambda path, leaf: pattern.search(path) is not None


# ----------------------------------------------------------------------------------------
# Methods


def _lora_init(key, in_f, out_f, rank):
  """PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0 (f32 masters)."""
  bound = 1.0 / np.sqrt(in_f)
  a = jax.random.uniform(key, (in_f, rank), jnp.float32, -bound, bound)
  return a, jnp.zeros((rank, out_f), jnp.float32)


def inner_optimizer(lr, clip: float = 3.0) -> optax.GradientTransformation:
  """The shared optimizer: global-norm clip, Adam(0.9, 0.999, 1e-8), then ``-lr``.

  ``lr`` may be traced: built inside a jitted step, one compiled step serves every
  learning rate of a sweep (the state does not depend on it)."""
  return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(),
                     optax.scale(-lr))


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
    falqon: overrides of ``falqon_jax.REFERENCE`` (:data:`FALQON_SPEC_OPTIONS`).
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

  @property
  def falqon_options(self) -> falqon_jax.FalqonOptions:
    """``falqon_jax.REFERENCE`` at this rank with this method's overrides."""
    return falqon_jax.REFERENCE.replace(rank=self.rank, **self.options)

  def prepare_kernel(self, kernel: jax.Array, key: jax.Array):
    """The kernel state for one Flax ``(in, out)`` kernel.

    FALQON melds the kernel in its own dtype, as :func:`falqon_jax.nnx.meld` does (a
    bf16 W's quantization error is taken in bf16, as in the reference)."""
    in_f, out_f = kernel.shape
    if self.kind == "falqon":
      return falqon_jax.meld_kernel(kernel, options=self.falqon_options, key=key)
    if self.kind == "lora-fa":  # FALQON's A and update unit, in exact arithmetic
      mk = falqon_jax.meld_kernel(kernel, self.rank)
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

  def prepare(self, model: models.Functional, params, key: jax.Array,
              targets: str = LLAMA_TARGETS, copy: bool = True):
    """``(model, params)`` of the CausalLM ``model`` holds with ``params``, each
    projection whose kernel path (``layers/0/self_attn/q_proj/kernel``) matches
    ``targets`` replaced by this method's layer; everything else unchanged.

    FALQON melds with :func:`falqon_jax.nnx.meld` (``key`` for ``init="random"``); the
    baselines get a :class:`StateLinear` per projection, each with its own fold of
    ``key``. With ``copy`` (the default) no leaf is shared with ``params``, so a train
    step that donates the result leaves the caller's base model intact.
    """
    lm = model.merge(params)
    if self.kind == "falqon":
      fnnx.meld(lm, options=self.falqon_options, targets=targets, key=key)
    else:
      for path, linear, index in fnnx.meld_plan(lm, _matcher(targets), targets):
        state = self.prepare_kernel(linear.kernel[...], jax.random.fold_in(key, index))
        swap_in(lm, path, linear, state)
    model, out = models.split(lm)
    return model, (jax.tree_util.tree_map(jnp.copy, out) if copy else out)

  def optimizer(self, key: Optional[jax.Array] = None) -> "Optimizer":
    """The optimizer for this method's prepared params (``key``: stochastic rounding's)."""
    if self.kind != "falqon":
      return Optimizer(inner_optimizer, falqon=False)
    options = self.falqon_options
    key = key if options.rounding == "stochastic" else None  # default: key(options.seed)
    return Optimizer(lambda lr: falqon_jax.proxy_update(inner_optimizer(lr), options, key=key),
                     falqon=True)


@jax.jit
def _quantize_weight(kernel):
  """e4m3 (out, in) copy of an (in, out) kernel with one per-tensor scale."""
  s = fp8.compute_scale(kernel, fp8.E4M3)
  return fp8.quantize(kernel.T, s, fp8.E4M3), s


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A method's optimizer: ``tx(lr)`` is its optax transformation at learning rate ``lr``.

  FALQON's (``falqon=True``) is :func:`falqon_jax.proxy_update` over the whole params
  tree, for :func:`falqon_jax.train.make_train_step`; the baselines' is
  :func:`inner_optimizer` over :func:`trainable_tree`.
  """

  tx: Callable[[Any], optax.GradientTransformation]
  falqon: bool

  def init(self, params):
    return self.tx(0.0).init(params if self.falqon else trainable_tree(params))

  def update(self, params, grads, state, lr):
    """A baseline's update: ``grads`` is the gradient of :func:`trainable_tree`."""
    if self.falqon:
      raise TypeError("FALQON updates inside falqon_jax.train.make_train_step")
    t = trainable_tree(params)
    updates, state = self.tx(lr).update(grads, state, t)
    return with_trainable(params, optax.apply_updates(t, updates)), state


FALQON_SPEC_OPTIONS = ("init", "scaling", "top_k", "topk_warmup_steps", "reset", "rounding",
                       "implementation", "fused_groups", "live_delta", "merge_every")
_BOOL_OPTIONS = ("fused_groups", "live_delta")
_INT_OPTIONS = ("topk_warmup_steps", "merge_every")
"""The ``falqon_jax.FalqonOptions`` fields a spec may set (rank and seed come from the run)."""


def make_method(spec: str, rank: int, alpha: float = 16.0) -> Method:
  """A method from a spec: a kind, optionally with falqon options in brackets, e.g.
  ``falqon[reset=merged,rounding=stochastic]`` or ``falqon[top_k=4,topk_warmup_steps=10]``."""
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
      if k not in FALQON_SPEC_OPTIONS or not v:
        raise ValueError(f"bad falqon option {item!r} in {spec!r}; options: {FALQON_SPEC_OPTIONS}")
      if k in _BOOL_OPTIONS and v not in ("true", "false"):
        raise ValueError(f"{k} takes true or false, got {v!r} in {spec!r}")
      options[k] = (int(v) if k in _INT_OPTIONS or (k == "top_k" and v != "all")
                    else v == "true" if k in _BOOL_OPTIONS else v)
    falqon_jax.REFERENCE.replace(**options)  # checks the values: a one-line error
  return Method(spec.strip(), kind, rank, alpha, tuple(sorted(options.items())))


# ----------------------------------------------------------------------------------------
# The model: falqon_jax.models.CausalLM with a Llama config


def llama_config(**overrides) -> models.ModelConfig:
  """A Llama :class:`falqon_jax.models.ModelConfig` from HF config.json keys: LLaMA-7B's
  shape by default."""
  hf = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
  hf.update(overrides)
  return models.ModelConfig.from_hf(hf, "llama_config")


def build(cfg: models.ModelConfig, key: jax.Array, method: Optional[Method] = None, *,
          dtype=jnp.bfloat16, param_dtype=None, targets: str = LLAMA_TARGETS,
          std: float = INIT_STD):
  """``(model, params)`` of a random-init CausalLM computing in ``dtype``, each projection
  matching ``targets`` already in ``method``'s state (none without a method).

  HF's init: every matrix N(0, ``std``), every norm weight 1; values in ``param_dtype``
  (default ``dtype``: f32 masters for pretraining need ``param_dtype=jnp.float32``).
  Built one leaf at a time on an abstract model, so no full-precision copy of the whole
  model ever exists.
  """
  param_dtype = param_dtype or dtype
  lm = nnx.eval_shape(lambda: models.CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  plan = {}
  if method is not None:
    plan = {p: lin for p, lin, _ in fnnx.meld_plan(lm, _matcher(targets), targets)}
  variables = [(p, v) for p, v in nnx.iter_graph(lm) if isinstance(v, nnx.Param)]
  for n, (path, var) in enumerate(variables):
    k = jax.random.fold_in(key, n)
    shape = tuple(var.get_value().shape)
    if "/".join(map(str, path)).endswith("norm/weight"):
      var.set_value(jnp.ones(shape, param_dtype))
    elif path[-1] == "kernel" and path[:-1] in plan:
      # Its own key for the state: a random A drawn with W's key would repeat W's numbers.
      w = _normal(k, shape, std, param_dtype)
      state = method.prepare_kernel(w, jax.random.fold_in(k, 1))
      swap_in(lm, path[:-1], plan[path[:-1]], state)
    else:
      var.set_value(_normal(k, shape, std, param_dtype))
  return models.split(lm)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, std, dtype):
  return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def cast_floats(tree, dtype=jnp.bfloat16):
  """Every float array leaf (not kernel states) cast to ``dtype``."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if not is_state(x) and jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree, is_leaf=is_state)


def lm_batch(tokens) -> dict:
  """The :mod:`falqon_jax.train` batch of a (B, T) token array: every token valid, every
  next-token target counted."""
  return {"input_ids": tokens, "loss_mask": jnp.ones_like(tokens)}


def next_token_loss(logits, tokens):
  """Mean next-token cross-entropy in f32 over all positions but the last (the loss
  :func:`falqon_jax.train.make_train_step` minimizes on :func:`lm_batch`)."""
  total, n = train.next_token_nll(logits, lm_batch(tokens))
  return total / n


def make_train_step(model: models.Functional, opt: Optimizer, *, remat: bool = False,
                    donate: bool = True):
  """``step(params, opt_state, tokens, lr) -> (params, opt_state, loss)``, jitted with
  params and opt_state donated unless ``donate=False`` (donated, FALQON's merge writes
  its rows in place). ``remat`` recomputes each decoder layer in the backward pass.

  FALQON runs :func:`falqon_jax.train.make_train_step`. The baselines take gradients
  with respect to their trainable leaves only, so none pays for a gradient it throws
  away (FALQON's unused gradients are dead code that XLA drops).
  """
  loss_sum = train.make_loss_fn(model, remat=remat)

  def step(params, opt_state, tokens, lr):
    batch = lm_batch(tokens)
    if opt.falqon:
      state = train.TrainState(jnp.zeros([], jnp.int32), params, opt_state)
      state, metrics = train.make_train_step(model, opt.tx(lr), remat=remat)(state, batch)
      return state.params, state.opt_state, metrics["loss"]

    def loss_of(trainable):
      total, n = loss_sum(with_trainable(params, trainable), batch)
      return total / n

    loss, grads = jax.value_and_grad(loss_of)(trainable_tree(params))
    params, opt_state = opt.update(params, grads, opt_state, lr)
    return params, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(model: models.Functional, params, tokens):
  """:func:`next_token_loss` of ``model`` (static) with ``params`` on ``tokens``."""
  return next_token_loss(train.forward(model, params, lm_batch(tokens)), tokens)
