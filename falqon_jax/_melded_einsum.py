"""Einsum layers on the melded FP8 GEMM: an einsum kernel seen as one 2-D ``(in, out)`` matrix.

A projection such as ``BTD,DNH->BTNH`` (kernel ``(D, N, H)``) is a dense layer whose
output features are ``N*H``. :func:`einsum_layout` reads that from the equation: kernel
labels the input shares (contracted) become ``in``, kernel labels only the output has
(kept) become ``out``, each group flattened in kernel order. The kernel is melded in that
2-D layout (:func:`to_2d`), and :func:`melded_einsum` moves the input's contracted axes
last, runs :func:`~falqon_jax.melded_dense` on ``(..., in)`` and puts the output axes
back in the equation's order, so the FP8 GEMM, its custom gradient and the merge are the
ones a ``MeldedLinear`` uses.

Equations that are not one GEMM are refused with the reason: a kernel label that the
input also batches over (``EBD,EDF->EBF``), labels summed away on one side, repeated
labels.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from falqon_jax._melded_dense import melded_dense
from falqon_jax._melded_kernel import MeldedKernel


class EinsumLayoutError(ValueError):
  """An einsum equation that is not one dense GEMM of the input against the kernel."""


@dataclasses.dataclass(frozen=True)
class EinsumLayout:
  """How an einsum ``lhs,rhs->out`` maps onto a 2-D ``(in, out)`` kernel.

  Attributes:
    lhs, rhs, out: the equation's labels (``...`` kept as is in ``lhs`` and ``out``).
    contracted: rhs labels summed with the input, in kernel order (the ``in`` axis).
    kept: rhs labels that reach the output, in kernel order (the ``out`` axis).
    kernel_shape: the einsum kernel's shape.
  """

  lhs: str
  rhs: str
  out: str
  contracted: str
  kept: str
  kernel_shape: tuple[int, ...]

  def _sizes(self, labels: str) -> tuple[int, ...]:
    return tuple(self.kernel_shape[self.rhs.index(c)] for c in labels)

  @property
  def in_features(self) -> int:
    return math.prod(self._sizes(self.contracted))

  @property
  def out_features(self) -> int:
    return math.prod(self._sizes(self.kept))

  @property
  def kept_shape(self) -> tuple[int, ...]:
    return self._sizes(self.kept)

  def axis_names(self, names: Optional[Sequence]) -> Optional[tuple]:
    """The 2-D kernel's ``(in, out)`` logical axis names from the einsum kernel's.

    A flattened group keeps the name of its leading axis (sharding the leading axis of a
    row-major reshape shards the flat axis the same way); a name on any other axis of the
    group cannot carry over, so that group is replicated.
    """
    if names is None or len(names) != len(self.rhs):
      return None
    by_label = dict(zip(self.rhs, names))

    def one(labels):
      if not labels or any(by_label[c] is not None for c in labels[1:]):
        return None
      return by_label[labels[0]]

    return (one(self.contracted), one(self.kept))


def einsum_layout(einsum_str: str, kernel_shape: Sequence[int]) -> EinsumLayout:
  """The 2-D layout of an ``input,kernel->output`` einsum; :class:`EinsumLayoutError` with
  the reason when it is not one dense GEMM."""
  eq = einsum_str.replace(" ", "")
  if eq.count("->") != 1 or eq.count(",") != 1:
    raise EinsumLayoutError(f"{einsum_str!r} is not an explicit two-operand einsum 'x,w->y'")
  operands, out = eq.split("->")
  lhs, rhs = operands.split(",")
  if "..." in rhs:
    raise EinsumLayoutError(f"{einsum_str!r}: an ellipsis in the kernel")
  if ("..." in lhs) != ("..." in out):
    raise EinsumLayoutError(f"{einsum_str!r}: an ellipsis on one side only")
  bare = [s.replace("...", "") for s in (lhs, rhs, out)]
  for s in bare:
    if not all(c in string.ascii_letters for c in s) or len(set(s)) != len(s):
      raise EinsumLayoutError(f"{einsum_str!r}: repeated or non-letter labels")
  x, w, y = (set(s) for s in bare)
  if len(rhs) != len(kernel_shape):
    raise EinsumLayoutError(
        f"{einsum_str!r}: {len(rhs)} kernel labels for a {len(kernel_shape)}-D kernel")
  batched = x & w & y
  if batched:
    raise EinsumLayoutError(
        f"{einsum_str!r} batches over kernel axes {''.join(sorted(batched))}: a batched"
        " GEMM, not one dense layer")
  summed = (x - w - y) | (w - x - y) | (y - x - w)
  if summed:
    raise EinsumLayoutError(
        f"{einsum_str!r}: labels {''.join(sorted(summed))} are on one side only")
  contracted = "".join(c for c in rhs if c in x)
  kept = "".join(c for c in rhs if c in y)
  if not contracted or not kept:
    raise EinsumLayoutError(f"{einsum_str!r}: the kernel has no contracted or no output axis")
  return EinsumLayout(lhs, rhs, out, contracted, kept, tuple(int(d) for d in kernel_shape))


def _perm(src: str, dst: str) -> tuple[int, ...]:
  return tuple(src.index(c) for c in dst)


def to_2d(kernel, layout: EinsumLayout):
  """The einsum kernel as a 2-D ``(in, out)`` dense kernel (an array, or a
  ``jax.ShapeDtypeStruct`` for an abstract one)."""
  shape = (layout.in_features, layout.out_features)
  if isinstance(kernel, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, kernel.dtype)
  k = jnp.transpose(kernel, _perm(layout.rhs, layout.contracted + layout.kept))
  return k.reshape(shape)


def _expand(layout: EinsumLayout, ndim: int) -> tuple[str, str]:
  """``lhs`` and ``out`` with ``...`` spelled out for an input of ``ndim`` axes."""
  lhs, out = layout.lhs, layout.out
  if "..." not in lhs:
    if ndim != len(lhs):
      raise ValueError(f"einsum {layout.lhs},{layout.rhs}->{layout.out} needs a {len(lhs)}-D"
                       f" input, got {ndim}-D")
    return lhs, out
  n = ndim - (len(lhs) - 3)
  if n < 0:
    raise ValueError(f"einsum {layout.lhs},{layout.rhs}->{layout.out} needs at least"
                     f" {len(lhs) - 3} input axes, got {ndim}")
  used = set(lhs + layout.rhs + out)
  fresh = "".join([c for c in string.ascii_letters if c not in used][:n])
  return lhs.replace("...", fresh), out.replace("...", fresh)


def melded_einsum(
    x: jax.Array,
    mk: MeldedKernel,
    layout: EinsumLayout,
    bias: Optional[jax.Array] = None,
    *,
    implementation: Union[str, Sequence[str]] = "xla",
) -> jax.Array:
  """``einsum(lhs,rhs->out, x, kernel) + bias`` through the melded FP8 kernel ``mk``
  (melded from :func:`to_2d` of the kernel), with :func:`~falqon_jax.melded_dense`'s
  gradient. ``bias`` spans the output axes the kernel gives, in output order, and
  broadcasts over the rest (as ``nnx.Einsum``'s)."""
  if mk.shape != (layout.in_features, layout.out_features):
    raise ValueError(f"melded kernel {mk.shape} does not match the einsum's 2-D layout"
                     f" {(layout.in_features, layout.out_features)}")
  lhs, out = _expand(layout, x.ndim)
  for c in layout.contracted:
    want = layout.kernel_shape[layout.rhs.index(c)]
    if x.shape[lhs.index(c)] != want:
      raise ValueError(f"einsum input axis {c!r} has size {x.shape[lhs.index(c)]}, the"
                       f" kernel's has {want}; input shape {x.shape}")
  batch = "".join(c for c in lhs if c not in layout.contracted)
  order = batch + layout.contracted
  xt = x if order == lhs else jnp.transpose(x, _perm(lhs, order))
  batch_shape = xt.shape[: len(batch)]
  y = melded_dense(xt.reshape(*batch_shape, layout.in_features), mk,
                   implementation=implementation)
  y = y.reshape(*batch_shape, *layout.kept_shape)
  got = batch + layout.kept
  y = y if got == out else jnp.transpose(y, _perm(got, out))
  if bias is not None:
    shape = [layout.kernel_shape[layout.rhs.index(c)] if c in layout.kept else 1 for c in out]
    y = y + bias.reshape(shape).astype(y.dtype)
  return y
