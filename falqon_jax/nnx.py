"""Flax NNX integration: :class:`MeldedLinear`, :class:`MeldedEinsum`, in-place :func:`meld`,
and :class:`Optimizer`.

``meld(model, rank=...)`` swaps every targeted ``nnx.Linear`` of a model for a
:class:`MeldedLinear`, and every einsum projection (``nnx.Einsum``, or a module like
tunix's ``Einsum`` with an ``einsum_str`` and one weight) for a :class:`MeldedEinsum`;
each holds one :class:`Melded` variable with a :class:`~falqon_jax.MeldedKernel` (the FP8
``[W; A]``, its scale and the ΔBuffer, the only part that trains). ``nnx.split`` /
``nnx.merge``, ``nnx.jit`` and ``nnx.grad(..., argnums=nnx.DiffState(0, Melded))`` work as
usual; :class:`Melded` is an ``nnx.LoRAParam``, so LoRA tooling that selects
``nnx.LoRAParam`` (optimizers, checkpoints: see :mod:`falqon_jax.tunix`) selects the melded
kernels whole. :class:`Optimizer` runs FALQON's proxy update (merge top-k rows into the
FP8 weight); :func:`get_partition_spec` shards melded kernels on a mesh.

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
  ...   l, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, fnnx.Melded))(model)
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
from flax.core import spmd as _spmd

from falqon_jax._meld import (
    MeldedLayer, MeldReport, SkippedLeaf, _matcher, fused_groups, meld_check, meld_members,
)
from falqon_jax._melded_dense import melded_dense
from falqon_jax._melded_einsum import (
    EinsumLayout, EinsumLayoutError, einsum_layout, melded_einsum, to_2d,
)
from falqon_jax._melded_kernel import MeldedKernel
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax._proxy_update import apply_updates, proxy_update
from falqon_jax.errors import UserInputError

__all__ = [
    "Melded", "MeldedEinsum", "MeldedLinear", "Optimizer", "get_named_sharding",
    "get_partition_spec", "kernels", "meld",
]


class Melded(nnx.LoRAParam):
  """A melded layer's state: one :class:`~falqon_jax.MeldedKernel` (FP8 ``[W; A]``, its
  scale(s) and the ΔBuffer ``B``).

  The kernel stays one pytree leaf of the model's state, so ``nnx.state(model)`` and
  ``nnx.split`` hand :func:`falqon_jax.proxy_update`, checkpoints and exports the same
  ``MeldedKernel`` leaves as a melded params tree. Differentiate with
  ``nnx.DiffState(0, Melded)``: only ``delta`` gets a nonzero gradient.

  An ``nnx.LoRAParam`` (so an ``nnx.Param``): LoRA tooling that selects ``nnx.LoRAParam``
  (tunix's ``PeftTrainer`` optimizer, gradients and LoRA-only checkpoints) gets the whole
  kernel, FP8 rows included, which the merges change. Filter the frozen rest of a model
  with ``nnx.All(nnx.Param, nnx.Not(Melded))``.
  """


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
    """``axes``: the replaced kernel's logical axis names ``(in, out)``, if it had any;
    :func:`get_partition_spec` then shards the FP8 rows (A rows too), row scales, delta
    and bias along ``out`` and the FP8 columns along ``in``, as the kernel was."""
    if not isinstance(kernel, MeldedKernel):
      raise TypeError(f"MeldedLinear needs a MeldedKernel, got {type(kernel).__name__}")
    # Not ``out_sharding``: nnx's own spec functions would give the whole kernel one spec.
    self.kernel = Melded(kernel, **({} if axes is None else {"kernel_axes": tuple(axes)}))
    out_named = {} if axes is None else {"out_sharding": (axes[1],), "eager_sharding": False}
    self.bias = None if bias is None else nnx.Param(bias, **out_named)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    bias = None if self.bias is None else self.bias[...]
    return melded_dense(x, self.kernel.get_value(), bias)


class MeldedEinsum(nnx.Module):
  """An einsum projection (``nnx.Einsum``, tunix's ``Einsum``) whose kernel is melded.

  The kernel is melded in the 2-D ``(in, out)`` layout that
  :func:`~falqon_jax._melded_einsum.einsum_layout` reads from ``einsum_str``
  (contracted kernel axes -> ``in``, output axes -> ``out``), and the layer runs
  :func:`~falqon_jax.melded_dense` on it: the same FP8 GEMM, gradient and merge as
  :class:`MeldedLinear`. ``shape`` / ``kernel_shape`` stay the einsum kernel's, which the
  models that hold such layers read (tunix's attention takes head counts from them).

  Example:
    >>> import jax, jax.numpy as jnp, falqon_jax
    >>> from falqon_jax.nnx import MeldedEinsum
    >>> from falqon_jax._melded_einsum import einsum_layout, to_2d
    >>> w = jax.random.normal(jax.random.key(0), (64, 4, 16))  # (D, N, H)
    >>> mk = falqon_jax.meld_kernel(to_2d(w, einsum_layout("BTD,DNH->BTNH", w.shape)), 16)
    >>> MeldedEinsum(mk, "BTD,DNH->BTNH", w.shape)(jnp.ones((2, 8, 64))).shape
    (2, 8, 4, 16)
  """

  def __init__(self, kernel: MeldedKernel, einsum_str: str, kernel_shape,
               bias: Optional[jax.Array] = None, *, dtype=None,
               axes: Optional[tuple] = None):
    """``axes``: the einsum kernel's logical axis names (one per kernel axis), if any;
    :func:`get_partition_spec` maps them onto the 2-D layout
    (:meth:`~falqon_jax._melded_einsum.EinsumLayout.axis_names`). ``bias``: over the
    output axes the kernel gives, broadcast as ``nnx.Einsum`` does."""
    if not isinstance(kernel, MeldedKernel):
      raise TypeError(f"MeldedEinsum needs a MeldedKernel, got {type(kernel).__name__}")
    layout = einsum_layout(einsum_str, kernel_shape)
    if kernel.shape != (layout.in_features, layout.out_features):
      raise ValueError(f"MeldedEinsum: melded kernel {kernel.shape} is not the 2-D layout"
                       f" {(layout.in_features, layout.out_features)} of {einsum_str!r}")
    axes2d = None if axes is None else layout.axis_names(tuple(axes))
    self.kernel = Melded(kernel, **({} if axes2d is None else {"kernel_axes": axes2d}))
    self.bias = None if bias is None else nnx.Param(bias)
    self.einsum_str = einsum_str
    self.shape = self.kernel_shape = tuple(kernel_shape)
    self.dtype = dtype

  def __call__(self, x: jax.Array, einsum_str: Optional[str] = None,
               out_sharding=None) -> jax.Array:
    if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str.replace(" ", ""):
      raise ValueError(f"MeldedEinsum was melded for {self.einsum_str!r}; it cannot run"
                       f" {einsum_str!r}")
    del out_sharding  # the melded GEMM's output follows its input's sharding
    if self.dtype is not None:
      x = x.astype(self.dtype)
    bias = None if self.bias is None else self.bias[...]
    layout = einsum_layout(self.einsum_str, self.kernel_shape)
    return melded_einsum(x, self.kernel.get_value(), layout, bias)


def _kernel_spec(var: Melded) -> MeldedKernel:
  """The PartitionSpecs of a melded kernel's arrays from its ``kernel_axes`` (in, out)."""
  mk = var.get_value()
  in_ax, out_ax = var.get_metadata().get("kernel_axes", (None, None))
  if in_ax is not None or out_ax is not None:
    rules = _spmd.get_logical_axis_rules()
    in_ax, out_ax = _spmd.from_sharding_rules((in_ax, out_ax), rules) if rules else (in_ax, out_ax)
  P = jax.sharding.PartitionSpec
  scale = P(out_ax) if jnp.ndim(mk.scale) == 1 else P()
  return mk.replace(qweight=P(out_ax, in_ax), scale=scale, delta=P(out_ax, None))


def get_partition_spec(tree):
  """``nnx.get_partition_spec`` that also knows :class:`Melded` variables.

  Each melded kernel gets a ``MeldedKernel`` of specs from the axis names of the kernel it
  replaced: FP8 rows and delta rows along its ``out`` axis, FP8 columns along ``in``. Use
  under ``nnx.logical_axis_rules`` as with nnx's.
  """
  is_melded = lambda x: isinstance(x, Melded)
  melded = jax.tree.map(lambda x: x.replace(_kernel_spec(x)) if is_melded(x) else None, tree,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  plain = nnx.get_partition_spec(tree)
  return jax.tree.map(lambda m, p: p if m is None else m, melded, plain,
                      is_leaf=lambda x: x is None or isinstance(x, nnx.Variable))


def get_named_sharding(tree, mesh: jax.sharding.Mesh):
  """:func:`get_partition_spec` as ``NamedSharding`` s on ``mesh``."""
  specs = get_partition_spec(tree)
  return jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


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


def _einsum_weight(module) -> Optional[tuple[str, nnx.Variable]]:
  """``(name, weight)`` of an einsum projection: ``nnx.Einsum``, or any module with an
  ``einsum_str`` and one ``nnx.Param`` weight ``kernel`` or ``w`` (tunix's ``Einsum``)."""
  if isinstance(module, (MeldedLinear, MeldedEinsum)):
    return None
  attrs = vars(module)
  if not isinstance(attrs.get("einsum_str"), str):
    return None
  for name in ("kernel", "w"):
    if isinstance(attrs.get(name), nnx.Param):
      return name, attrs[name]
  return None


def _einsum_layout(path, module) -> tuple[Optional[EinsumLayout], Optional[SkippedLeaf]]:
  """An einsum layer's 2-D layout, or why it has none."""
  name, weight = _einsum_weight(module)
  shape = tuple(weight.get_value().shape)
  skip = lambda reason: (None, SkippedLeaf(f"{_path_str(path)}/{name}", shape, reason))
  others = [k for k, v in vars(module).items()
            if isinstance(v, nnx.Variable) and k not in (name, "bias")]
  if others:
    return skip(f"einsum layer with other variables ({', '.join(others)}), not a projection")
  try:
    return einsum_layout(module.einsum_str, shape), None
  except EinsumLayoutError as e:
    return skip(str(e))


def _dense_layers(model) -> tuple[list, list]:
  """``[(path, layer, layout)]`` for every ``nnx.Linear`` (layout None) and einsum layer
  with a 2-D layout, and the :class:`SkippedLeaf` of each einsum layer without one."""
  layers, unmappable = [], []
  for path, node in _layers(model, nnx.Module):
    if isinstance(node, nnx.Linear):
      layers.append((path, node, None))
    elif _einsum_weight(node) is not None:
      layout, skip = _einsum_layout(path, node)
      if skip is None:
        layers.append((path, node, layout))
      else:
        unmappable.append((path, skip))
  return layers, unmappable


def _kernel_2d(layer, layout: Optional[EinsumLayout], *, abstract: bool = False):
  """The layer's kernel as the 2-D ``(in, out)`` kernel melding sees (its shape and dtype
  alone for an einsum layer with ``abstract``)."""
  if layout is None:
    return layer.kernel.get_value()
  w = _einsum_weight(layer)[1].get_value()
  return to_2d(jax.ShapeDtypeStruct(w.shape, w.dtype) if abstract else w, layout)


def meld(model: nnx.Module, rank: Optional[int] = None, *,
         options: FalqonOptions = RECOMMENDED, targets=None, key: Optional[jax.Array] = None,
         **overrides) -> MeldReport:
  """Melds the ``nnx.Linear`` and einsum layers of ``model`` in place; returns the report.

  Targets follow :func:`falqon_jax.meld` over the paths ``layers/0/kernel`` (regex or
  predicate); every layer's path ends in ``/kernel``, the melded variable's name, also
  for einsum layers whose weight is called ``w``. A predicate gets the 2-D ``(in, out)``
  kernel, for einsum layers the layout of :func:`~falqon_jax._melded_einsum.einsum_layout`
  (while fused groups are planned, only as a ``jax.ShapeDtypeStruct``). The default melds
  every layer with dims that are multiples of 16, except embeddings and the LM head
  (``lm_head``, ``embed*``...). Einsum layers that are not one GEMM (batched over a kernel
  axis...) are listed in ``report.skipped`` with the reason, or refused when targeted.
  ``rank``, ``options`` (default :data:`~falqon_jax.RECOMMENDED`), ``key`` and option
  overrides (``init``, ``scaling``...) are :func:`falqon_jax.meld`'s.

  With ``options.fused_groups`` (:data:`~falqon_jax.RECOMMENDED`), sibling layers that
  vLLM fuses (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``) are melded
  with one shared scale, and targets that meld part of such a group are refused.
  """
  if rank is not None:
    overrides["rank"] = rank
  options = resolve(options, overrides)
  match = None if targets is None else _matcher(targets)
  layers, unmappable = _dense_layers(model)
  melded, skipped, done = {}, [], {}
  for path, skip in unmappable:
    if match is None:
      skipped.append(skip)
    elif match(_path_str(path) + "/kernel", _einsum_weight(_node(model, path))[1].get_value()):
      raise UserInputError(f"targeted einsum layer {_path_str(path)!r} cannot be melded:"
                           f" {skip.reason}; narrow `targets` to exclude it")
  plan = meld_plan(model, match, targets)
  layouts = {p: layout for p, _, layout in layers}
  # Einsum kernels become 2-D copies only while their own group melds; the groups need
  # shapes alone.
  kernel_2d = lambda p: _kernel_2d(by_path[p][0], layouts[p])
  groups = fused_groups({p: _kernel_2d(l, layout, abstract=True)
                         for p, l, layout in layers}, match, options)
  by_path = {path: (layer, index) for path, layer, index in plan}
  for path, layer, index in plan:
    entry = meld_check(_path_str(path) + "/kernel", kernel_2d(path), options, match)
    if isinstance(entry, MeldedLayer):
      melded[path] = entry
    elif entry is not None:
      skipped.append(entry)
  for path in melded:
    if path in done:
      continue
    members = groups[path]
    items = [(_path_str(p) + "/kernel", kernel_2d(p), by_path[p][1]) for p in members]
    for p, (mk, _) in zip(members, meld_members(items, options, key=key)):
      done[p] = mk
  for path, mk in done.items():
    swap_in(model, path, by_path[path][0], mk)
  melded = list(melded.values())
  if targets is not None and not melded:
    raise UserInputError(f"targets {targets!r} matched no nnx.Linear or einsum kernel")
  return MeldReport(tuple(melded), tuple(skipped))


def _node(model, path):
  for k in path:
    model = model[k] if isinstance(k, int) else getattr(model, k)
  return model


def meld_plan(model: nnx.Module, match, targets=None) -> list[tuple[tuple, nnx.Module, int]]:
  """``(path, layer, index)`` for each ``nnx.Linear`` or einsum layer that :func:`meld`
  considers.

  ``index`` is the layer's place in the tree of those kernels, the one
  :func:`falqon_jax.meld` would fold into a random-init key, so every layer gets its own
  A, and a loader that melds layer by layer gets the same A as melding afterwards.
  Works on an abstract model (``nnx.eval_shape``): only paths and shapes are read.
  """
  found = []
  for path, layer, layout in _dense_layers(model)[0]:
    if match is not None and not match(_path_str(path) + "/kernel", _kernel_2d(layer, layout)):
      continue
    found.append((path, layer))
  if not found:
    if targets is not None:
      raise UserInputError(f"targets {targets!r} matched no nnx.Linear or einsum kernel")
    raise UserInputError("model has no nnx.Linear or einsum layer to meld")
  tree: dict = {}
  for i, (path, _) in enumerate(found):
    node = tree
    for k in path:
      node = node.setdefault(str(k), {})
    node["kernel"] = i
  order = jax.tree_util.tree_leaves(tree)  # dict keys sorted, as jax flattens a params tree
  index = {i: n for n, i in enumerate(order)}
  return [(path, layer, index[i]) for i, (path, layer) in enumerate(found)]


def swap_in(model: nnx.Module, path: tuple, layer: nnx.Module, mk: MeldedKernel) -> None:
  """Replaces the ``nnx.Linear`` (einsum layer) at ``path`` by a :class:`MeldedLinear`
  (:class:`MeldedEinsum`) of ``mk``, keeping its bias, dtype and axis names."""
  if isinstance(layer, nnx.Linear):
    bias = layer.bias[...] if layer.bias is not None else None
    axes = layer.kernel.get_metadata().get("out_sharding")
    _set(model, path, MeldedLinear(mk, bias, dtype=layer.dtype, axes=axes))
    return
  _, weight = _einsum_weight(layer)
  bias = vars(layer).get("bias")
  bias = bias[...] if isinstance(bias, nnx.Variable) else None
  axes = weight.get_metadata().get("out_sharding")
  _set(model, path, MeldedEinsum(mk, layer.einsum_str, tuple(weight.get_value().shape), bias,
                                 dtype=getattr(layer, "dtype", None), axes=axes))


def _melded_layers(model) -> list[tuple[tuple, Any]]:
  return _layers(model, (MeldedLinear, MeldedEinsum))


def kernels(model: nnx.Module) -> dict[str, MeldedKernel]:
  """``{path: MeldedKernel}`` for every :class:`MeldedLinear` and :class:`MeldedEinsum`."""
  return {_path_str(p): m.kernel.get_value() for p, m in _melded_layers(model)}


class OptState(nnx.Variable):
  """The proxy-update optimizer state."""


class Optimizer(nnx.Object):
  """FALQON's optimizer for NNX models: :func:`falqon_jax.proxy_update` on the deltas.

  ``update(model, grads)`` takes the ``nnx.State`` that
  ``nnx.grad(loss, argnums=nnx.DiffState(0, Melded))`` returns, runs the inner optax
  optimizer on the deltas, merges the top-k rows of every layer into its FP8 weight and
  resets the ΔBuffers, all in place. Works inside ``nnx.jit``.

  Args:
    model: a melded model (see :func:`meld`).
    inner: the optax optimizer for the deltas.
    options: a :class:`~falqon_jax.FalqonOptions` (default
      :data:`~falqon_jax.RECOMMENDED`), as for :func:`falqon_jax.proxy_update`.
    **proxy_kwargs: ``key``, ``accumulation_steps`` and option overrides (``top_k``,
      ``topk_warmup_steps``, ``reset``, ``rounding``, ``implementation``).
  """

  def __init__(self, model: nnx.Module, inner: optax.GradientTransformation,
               options: FalqonOptions = RECOMMENDED, **proxy_kwargs):
    self.tx = proxy_update(inner, options, **proxy_kwargs)
    ks = kernels(model)
    if not ks:
      raise UserInputError("model has no MeldedLinear or MeldedEinsum: call"
                           " falqon_jax.nnx.meld(model, rank) first")
    self.opt_state = OptState(self.tx.init(ks))
    self.step = OptState(jnp.zeros([], jnp.int32))

  def update(self, model: nnx.Module, grads) -> None:
    ks = kernels(model)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(grads)}
    gks = {}
    for path, mk in ks.items():
      g = flat.get(f"{path}/kernel")
      g = g.get_value() if isinstance(g, nnx.Variable) else g
      if not isinstance(g, MeldedKernel):
        raise UserInputError(
            f"grads hold no gradient for the melded layer {path!r}; take them with"
            " nnx.grad(loss, argnums=nnx.DiffState(0, falqon_jax.nnx.Melded))"
        )
      gks[path] = g
    updates, state = self.tx.update(gks, self.opt_state.get_value(), ks)
    new = apply_updates(ks, updates)
    for path, layer in _melded_layers(model):
      layer.kernel.set_value(new[_path_str(path)])
    self.opt_state.set_value(state)
    self.step[...] = self.step[...] + 1
