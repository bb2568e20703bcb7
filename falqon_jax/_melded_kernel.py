"""The melded FP8 kernel: one e4m3 weight ``[W; A]`` with a shared scale, plus the ΔBuffer.

Spec: falqon-reference.md sections 1 and 2.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from falqon_jax import fp8
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class MeldedKernel:
  """A dense kernel melded with its frozen LoRA ``A`` into one FP8 weight.

  Attributes:
    qweight: float8_e4m3fn, shape ``(out + rank, in)``. Rows ``[:out]`` are the backbone
      ``W`` (torch ``nn.Linear`` layout, i.e. the transpose of a Flax kernel), rows
      ``[out:]`` are ``A``. Row-major with the contracting dim last, as FP8 GEMMs want.
    scale: float32 scale(s), ``raw = value * scale``. A 0-d array with
      ``scaling="tensor"`` (the reference), shape ``(out + rank,)`` with ``scaling="row"``.
    delta: float32, shape ``(out, rank)``: the ΔBuffer ``B``, the only trainable leaf.
    in_features, out_features, rank: static sizes.
    scaling: static, ``"tensor"`` or ``"row"``.
    live_delta: static: the forward and ``dx`` include ``delta`` (``y = x (W + BA)ᵀ``);
      False (the reference) ignores it, exact only while it is zero.
  """

  qweight: jax.Array
  scale: jax.Array
  delta: jax.Array
  in_features: int = dataclasses.field(metadata=dict(static=True))
  out_features: int = dataclasses.field(metadata=dict(static=True))
  rank: int = dataclasses.field(metadata=dict(static=True))
  scaling: str = dataclasses.field(default="tensor", metadata=dict(static=True))
  live_delta: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int]:
    """The Flax kernel shape ``(in, out)`` this stands in for."""
    return (self.in_features, self.out_features)

  @property
  def backbone_scale(self) -> jax.Array:
    """Scale(s) of the backbone rows, broadcastable against ``(out, in)``."""
    if self.scaling == "row":
      return self.scale[..., : self.out_features, None]
    return self.scale

  @property
  def lora_a_scale(self) -> jax.Array:
    """Scale(s) of the A rows, broadcastable against ``(rank, in)``."""
    if self.scaling == "row":
      return self.scale[..., self.out_features :, None]
    return self.scale

  def backbone(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized backbone in Flax layout ``(in, out)``."""
    w = fp8.dequantize(self.qweight[..., : self.out_features, :], self.backbone_scale)
    return jnp.swapaxes(w, -1, -2).astype(dtype)

  def lora_a(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized ``A``, shape ``(rank, in)``."""
    a = fp8.dequantize(self.qweight[..., self.out_features :, :], self.lora_a_scale)
    return a.astype(dtype)

  def replace(self, **changes) -> "MeldedKernel":
    return dataclasses.replace(self, **changes)

  @property
  def num_trainable(self) -> int:
    return self.out_features * self.rank


jax.tree_util.register_dataclass(MeldedKernel)


def is_melded(x) -> bool:
  """Whether ``x`` is a :class:`MeldedKernel` (an ``is_leaf`` for tree maps)."""
  return isinstance(x, MeldedKernel)


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_kernel(kernel, what: str = "kernel") -> jax.Array:
  """Validates a Flax-layout dense kernel; returns it as an array."""
  if isinstance(kernel, MeldedKernel):
    raise TypeError(f"{what} is already a MeldedKernel; meld each kernel once")
  if not hasattr(kernel, "ndim"):
    kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise UserInputError(
        f"{what} must be a 2-D (in, out) dense kernel, got shape {tuple(kernel.shape)}"
    )
  if not jnp.issubdtype(kernel.dtype, jnp.floating) or jnp.dtype(kernel.dtype).itemsize < 2:
    raise TypeError(
        f"{what} must be a bf16/f16/f32 floating kernel, got dtype {kernel.dtype}"
    )
  if not _is_tracer(kernel) and not bool(jnp.all(jnp.isfinite(kernel))):
    raise UserInputError(f"{what} contains NaN or Inf; fix the checkpoint before melding")
  return kernel


def is_int(x) -> bool:
  """A Python or numpy integer, not a bool: counts often come from numpy arithmetic."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_rank(rank, in_features: int, out_features: int, what: str = "kernel") -> int:
  if not is_int(rank):
    raise TypeError(f"rank must be an int, got {rank!r}")
  rank = int(rank)
  if rank <= 0 or rank > min(in_features, out_features):
    raise UserInputError(
        f"rank must be in [1, min(in, out)] = [1, {min(in_features, out_features)}] for"
        f" {what} of shape ({in_features}, {out_features}), got {rank}"
    )
  return rank


def _scale_of(w: jax.Array, scaling: str) -> jax.Array:
  if scaling == "row":
    return fp8.compute_scale(w, fp8.E4M3, axis=-1)[:, 0]
  return fp8.compute_scale(w, fp8.E4M3)


def _as_rows(scale: jax.Array, scaling: str) -> jax.Array:
  return scale[:, None] if scaling == "row" else scale


def _svd_lora_a(w: jax.Array, rank: int, scaling: str) -> jax.Array:
  """A = sqrt(S_r) Vh_r from the SVD of W's quantization error (reference section 2)."""
  s0 = _as_rows(_scale_of(w, scaling), scaling)
  # The error is taken in W's own dtype, as the reference does (bf16 W -> bf16 error).
  err = w - fp8.dequantize(fp8.quantize(w, s0), s0, w.dtype)
  _, s, vh = jnp.linalg.svd(err.astype(jnp.float32), full_matrices=False)
  return jnp.sqrt(s[:rank])[:, None] * vh[:rank]


def _random_lora_a(w: jax.Array, rank: int, key: jax.Array) -> jax.Array:
  """The reference's placeholder init: Normal(mean W, std W) clipped to [min W, max W]."""
  wf = w.astype(jnp.float32)
  a = jnp.mean(wf) + jnp.std(wf) * jax.random.normal(key, (rank, w.shape[1]), jnp.float32)
  return jnp.clip(a, jnp.min(wf), jnp.max(wf)).astype(w.dtype)


def _stack(kernel, key, *, rank: int, init: str, scaling: str):
  """``([W; A], its own scale)``: the unquantized melded weight, ``(out + rank, in)``."""
  w = kernel.T  # (out, in)
  if init == "svd":
    a = _svd_lora_a(w, rank, scaling)
  else:
    a = _random_lora_a(w, rank, key)
  # cat([W, A]) promotes like torch.cat (bf16 W + f32 A -> f32); exact for the amax.
  dtype = jnp.promote_types(w.dtype, a.dtype)
  stacked = jnp.concatenate([w.astype(dtype), a.astype(dtype)], 0)
  return stacked, _scale_of(stacked, scaling)


def _quantize_stacked(stacked, scale, *, rank: int, scaling: str) -> MeldedKernel:
  rows, in_features = stacked.shape
  qweight = fp8.quantize(stacked, _as_rows(scale, scaling), fp8.E4M3)
  return MeldedKernel(
      qweight=qweight,
      scale=scale,
      delta=jnp.zeros((rows - rank, rank), jnp.float32),
      in_features=in_features,
      out_features=rows - rank,
      rank=rank,
      scaling=scaling,
  )


def _meld(kernel, key, *, rank: int, init: str, scaling: str) -> MeldedKernel:
  stacked, scale = _stack(kernel, key, rank=rank, init=init, scaling=scaling)
  return _quantize_stacked(stacked, scale, rank=rank, scaling=scaling)


_meld_jit = jax.jit(_meld, static_argnames=("rank", "init", "scaling"))
_stack_jit = jax.jit(_stack, static_argnames=("rank", "init", "scaling"))
_quantize_jit = jax.jit(_quantize_stacked, static_argnames=("rank", "scaling"))


def meld_kernel(
    kernel: jax.Array,
    rank: Optional[int] = None,
    *,
    options: FalqonOptions = RECOMMENDED,
    key: Optional[jax.Array] = None,
    name: str = "kernel",
    **overrides,
) -> MeldedKernel:
  """Melds one Flax-layout dense kernel ``(in, out)`` into a :class:`MeldedKernel`.

  ``options`` (a :class:`~falqon_jax.FalqonOptions`, :data:`~falqon_jax.RECOMMENDED` by
  default) gives ``rank``, ``init``, ``scaling`` and ``seed``; ``rank`` and keyword
  overrides (``init="random"``) replace its fields. With ``init="svd"`` (both presets),
  ``A = sqrt(S_r) Vh_r`` from the SVD of the quantization error ``E = W - DQ(Q(W))``, one
  scale covers ``[W; A]``, the backbone rows are ``Q(W; scale)`` and ``delta`` is zero.
  ``init="random"`` draws ``A`` from ``Normal(mean W, std W)`` clipped to W's range, with
  ``key`` (default ``jax.random.key(options.seed)``).

  ``scaling="row"`` (beyond the reference) gives every row of ``[W; A]`` its own scale.

  Example:
    >>> import jax, falqon_jax
    >>> k = jax.random.normal(jax.random.key(0), (64, 96)) * 0.02
    >>> mk = falqon_jax.meld_kernel(k, rank=16)
    >>> mk.qweight.shape, mk.delta.shape
    ((112, 64), (96, 16))
  """
  if rank is not None:
    overrides["rank"] = rank
  options = resolve(options, overrides)
  kernel = check_kernel(kernel, name)
  in_features, out_features = kernel.shape
  rank = check_rank(options.rank, in_features, out_features, name)
  if key is None:
    # Unused by the SVD init, but one jitted signature either way.
    key = jax.random.key(options.seed)
  mk = _meld_jit(kernel, key, rank=rank, init=options.init, scaling=options.scaling)
  return mk.replace(live_delta=options.live_delta)


def meld_group(
    kernels,
    *,
    options: FalqonOptions = RECOMMENDED,
    keys=None,
    names=None,
) -> list[MeldedKernel]:
  """Melds the kernels of one fused group (q/k/v, gate/up) with one shared scale.

  Serving engines fuse such a group into one GEMM with one per-tensor scale (vLLM
  requantizes every shard to the group's largest ``weight_scale``), so the trained bytes
  survive only if the group already shares it. Each kernel gets its ``A`` as
  :func:`meld_kernel` would; the shared scale is the smallest of the members' own
  ``[W; A]`` scales (the largest amax), so no member saturates, and every member's
  ``[W; A]`` is quantized with it. Merges never change a per-tensor scale, so the group
  keeps sharing it through training. ``options`` are checked; ``scaling="row"`` needs no
  sharing and melds each kernel alone. ``keys``: one per kernel (default
  ``jax.random.key(options.seed)``).
  """
  kernels = list(kernels)
  names = list(names) if names is not None else [f"kernel {i}" for i in range(len(kernels))]
  if keys is None:
    keys = [jax.random.key(options.seed)] * len(kernels)
  checked = []
  for kernel, name in zip(kernels, names):
    kernel = check_kernel(kernel, name)
    checked.append((kernel, check_rank(options.rank, *kernel.shape, name)))
  if options.scaling != "tensor" or len(kernels) < 2:
    melded = [_meld_jit(k, key, rank=r, init=options.init, scaling=options.scaling)
              for (k, r), key in zip(checked, keys)]
  else:
    stacks = [_stack_jit(k, key, rank=r, init=options.init, scaling=options.scaling)
              for (k, r), key in zip(checked, keys)]
    shared = jnp.min(jnp.stack([scale for _, scale in stacks]))
    melded = [_quantize_jit(stacked, shared, rank=r, scaling=options.scaling)
              for (stacked, _), (_, r) in zip(stacks, checked)]
  return [mk.replace(live_delta=options.live_delta) for mk in melded]
