"""Flax NNX integration: :class:`MeldedLinear`, in-place :func:`meld`, and :class:`Optimizer`.

``meld(model, rank=...)`` swaps every targeted ``nnx.Linear`` of a model for a
:class:`MeldedLinear` holding the FP8 ``[W; A]`` (:class:`FP8Weight`, frozen) and the
ΔBuffer (:class:`Delta`, the only differentiable state). ``nnx.split`` / ``nnx.merge``,
``nnx.jit`` and ``nnx.grad(..., argnums=nnx.DiffState(0, Delta))`` work as usual;
:class:`Optimizer` runs FALQON's proxy update (merge top-k rows into the FP8 weight).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> from falqon_jax import nnx as fnnx
  >>> model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(64, 32, rngs=nnx.Rngs(1)))
  >>> report = fnnx.meld(model, rank=16)
  >>> opt = fnnx.Optimizer(model, optax.adam(1e-2))
  >>> x = jnp.ones((8, 32))
  >>> @nnx.jit
  ... def step(model, opt):
  ...   loss = lambda m: jnp.mean(m(x) ** 2)
  ...   l, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, fnnx.Delta))(model)
  ...   opt.update(model, g)
  ...   return l
  >>> float(step(model, opt)) > 0
  True
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from falqon_jax._meld import MeldReport, _matcher
from falqon_jax._meld import meld as _core_meld
from falqon_jax._melded_dense import melded_dense
from falqon_jax._melded_kernel import MeldedKernel
from falqon_jax._proxy_update import apply_updates, proxy_update
from falqon_jax.errors import UserInputError

__all__ = ["Delta", "FP8Weight", "MeldedLinear", "Optimizer", "meld", "kernels"]


class Delta(nnx.Variable):
  """The ΔBuffer ``B`` (out, rank): the only state FALQON differentiates and updates."""


class FP8Weight(nnx.Variable):
  """Frozen melded FP8 state: the e4m3 ``[W; A]`` and its scale(s)."""


class MeldedLinear(nnx.Module):
  """An ``nnx.Linear`` whose kernel is melded: ``y = melded_dense(x, kernel) + bias``.

  Example:
    >>> import jax, jax.numpy as jnp, falqon_jax
    >>> from falqon_jax.nnx import MeldedLinear
    >>> mk = falqon_jax.meld_kernel(jax.random.normal(jax.random.key(0), (64, 32)), 16)
    >>> MeldedLinear(mk)(jnp.ones((4, 64))).shape
    (4, 32)
  """

  def __init__(self, kernel: MeldedKernel, bias: Optional[jax.Array] = None, *, dtype=None,
               axes: Optional[tuple] = None):
    """``axes``: the replaced kernel's logical axis names ``(in, out)``, if it had any; the
    FP8 rows, row scales, delta and bias are then named along ``out`` (the A rows too), so
    a mesh's rules shard them as they sharded the kernel."""
    if not isinstance(kernel, MeldedKernel):
      raise TypeError(f"MeldedLinear needs a MeldedKernel, got {type(kernel).__name__}")
    in_ax, out_ax = axes if axes is not None else (None, None)

    def named(*names):  # logical names only: applying them needs a mesh
      return {} if axes is None else {"out_sharding": names, "eager_sharding": False}

    self.qweight = FP8Weight(kernel.qweight, **named(out_ax, in_ax))
    self.scale = FP8Weight(kernel.scale, **named(*(out_ax,) * kernel.scale.ndim))
    self.delta = Delta(kernel.delta, **named(out_ax, None))
    self.bias = None if bias is None else nnx.Param(bias, **named(out_ax))
    self.in_features = kernel.in_features
    self.out_features = kernel.out_features
    self.rank = kernel.rank
    self.scaling = kernel.scaling
    self.dtype = dtype

  @property
  def kernel(self) -> MeldedKernel:
    return MeldedKernel(
        qweight=self.qweight[...], scale=self.scale[...], delta=self.delta[...],
        in_features=self.in_features, out_features=self.out_features, rank=self.rank,
        scaling=self.scaling,
    )

  def set_kernel(self, mk: MeldedKernel) -> None:
    self.qweight[...] = mk.qweight
    self.scale[...] = mk.scale
    self.delta[...] = mk.delta

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    bias = None if self.bias is None else self.bias[...]
    return melded_dense(x, self.kernel, bias)


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _layers(model, cls) -> list[tuple[tuple, Any]]:
  return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, cls) and p]


def _set(model, path, value) -> None:
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def meld(model: nnx.Module, rank: int = 64, *, targets=None, **meld_kwargs) -> MeldReport:
  """Melds the ``nnx.Linear`` layers of ``model`` in place; returns the report.

  Targets follow :func:`falqon_jax.meld` over the paths ``layers/0/kernel`` (regex or
  predicate); the default melds every Linear with dims that are multiples of 16, except
  embeddings and the LM head (``lm_head``, ``embed*``...). ``init``, ``key`` and
  ``scaling`` pass through.
  """
  match = None if targets is None else _matcher(targets)
  # One tree, one meld: each layer gets its own key (per-leaf), as with falqon_jax.meld.
  tree: dict = {}
  linears = []
  for path, linear in _layers(model, nnx.Linear):
    kernel = linear.kernel[...]
    if match is not None and not match(_path_str(path) + "/kernel", kernel):
      continue
    node = tree
    for k in path:
      node = node.setdefault(str(k), {})
    node["kernel"] = kernel
    linears.append((path, linear))
  if not linears:
    if targets is not None:
      raise UserInputError(f"targets {targets!r} matched no nnx.Linear kernel")
    raise UserInputError("model has no nnx.Linear layer to meld")
  tree, report = _core_meld(tree, rank, targets=targets, **meld_kwargs)
  melded, skipped = list(report.melded), list(report.skipped)
  for path, linear in linears:
    node = tree
    for k in path:
      node = node[str(k)]
    if isinstance(node["kernel"], MeldedKernel):
      bias = linear.bias[...] if linear.bias is not None else None
      axes = linear.kernel.get_metadata().get("out_sharding")
      _set(model, path, MeldedLinear(node["kernel"], bias, dtype=linear.dtype, axes=axes))
  if targets is not None and not melded:
    raise UserInputError(f"targets {targets!r} matched no nnx.Linear kernel")
  return MeldReport(tuple(melded), tuple(skipped))


def kernels(model: nnx.Module) -> dict[str, MeldedKernel]:
  """``{path: MeldedKernel}`` for every :class:`MeldedLinear` of ``model``."""
  return {_path_str(p): m.kernel for p, m in _layers(model, MeldedLinear)}


class OptState(nnx.Variable):
  """The proxy-update optimizer state."""


class Optimizer(nnx.Object):
  """FALQON's optimizer for NNX models: :func:`falqon_jax.proxy_update` on the deltas.

  ``update(model, grads)`` takes the ``nnx.State`` that
  ``nnx.grad(loss, argnums=nnx.DiffState(0, Delta))`` returns, runs the inner optax
  optimizer on the deltas, merges the top-k rows of every layer into its FP8 weight and
  resets the ΔBuffers, all in place. Works inside ``nnx.jit``.

  Args:
    model: a melded model (see :func:`meld`).
    inner: the optax optimizer for the deltas.
    **proxy_kwargs: ``top_k``, ``warmup_steps``, ``reset``, ``rounding``, ``key``.
  """

  def __init__(self, model: nnx.Module, inner: optax.GradientTransformation, **proxy_kwargs):
    self.tx = proxy_update(inner, **proxy_kwargs)
    ks = kernels(model)
    if not ks:
      raise UserInputError("model has no MeldedLinear: call falqon_jax.nnx.meld(model, rank) first")
    self.opt_state = OptState(self.tx.init(ks))
    self.step = OptState(jnp.zeros([], jnp.int32))

  def update(self, model: nnx.Module, grads) -> None:
    ks = kernels(model)
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(grads)}
    gks = {}
    for path, mk in ks.items():
      key = (*path.split("/"), "delta")
      if key not in flat:
        raise UserInputError(
            f"grads hold no delta for layer {path!r}; take them with"
            " nnx.grad(loss, argnums=nnx.DiffState(0, falqon_jax.nnx.Delta))"
        )
      g = flat[key]
      gks[path] = mk.replace(delta=g[...] if hasattr(g, "__getitem__") else g.value)
    updates, state = self.tx.update(gks, self.opt_state.get_value(), ks)
    new = apply_updates(ks, updates)
    for path, layer in _layers(model, MeldedLinear):
      layer.set_kernel(new[_path_str(path)])
    self.opt_state.set_value(state)
    self.step[...] = self.step[...] + 1
