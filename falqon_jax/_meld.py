"""``meld`` / ``unmeld`` over a whole parameter tree, and the report of what was melded."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from falqon_jax._melded_kernel import (
    MeldedKernel,
    check_kernel,
    check_rank,
    is_melded,
    meld_group,
    meld_kernel,
)
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax.errors import UserInputError

Targets = Union[None, str, "re.Pattern[str]", Callable[[str, Any], bool]]

DEFAULT_EXCLUDE = re.compile(
    r"(^|/)(lm_head|embed\w*|wte|wpe|unembed\w*|tok_embeddings|output_embed\w*)(/|$)"
)
"""Path components the default targets never meld: embeddings and the LM head."""

_GEMM_MULTIPLE = 16  # FP8 GEMMs need both kernel dims to be multiples of 16

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that vLLM fuses into one GEMM (``qkv_proj``, ``gate_up_proj``)."""


def path_str(path) -> str:
  """``('model', 'layers', '0', 'kernel')`` style key paths as ``model/layers/0/kernel``."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class MeldedLayer:
  path: str
  shape: tuple[int, int]  # the Flax kernel shape (in, out)
  rank: int

  @property
  def num_trainable(self) -> int:
    return self.shape[1] * self.rank


@dataclasses.dataclass(frozen=True)
class SkippedLeaf:
  path: str
  shape: tuple[int, ...]
  reason: str


@dataclasses.dataclass(frozen=True)
class MeldReport:
  """What :func:`meld` melded and what it skipped, and why."""

  melded: tuple[MeldedLayer, ...]
  skipped: tuple[SkippedLeaf, ...]

  @property
  def num_trainable(self) -> int:
    """Trainable parameters: sum of ``out * rank`` over melded layers."""
    return sum(layer.num_trainable for layer in self.melded)

  @property
  def num_melded_weights(self) -> int:
    """Backbone parameters now stored in FP8."""
    return sum(layer.shape[0] * layer.shape[1] for layer in self.melded)

  def __str__(self) -> str:
    lines = [
        f"melded {len(self.melded)} kernels ({self.num_melded_weights:,} weights in FP8),"
        f" {self.num_trainable:,} trainable delta parameters;"
        f" skipped {len(self.skipped)} leaves"
    ]
    lines += [f"  + {m.path} {m.shape} rank {m.rank}" for m in self.melded]
    lines += [f"  - {s.path} {s.shape}: {s.reason}" for s in self.skipped]
    return "\n".join(lines)


def _default_reason(path: str, leaf) -> Optional[str]:
  """Why the default targets skip a leaf, or None if they meld it."""
  if not path.split("/")[-1] == "kernel":
    return "not a dense kernel"
  if DEFAULT_EXCLUDE.search(path):
    return "embedding or LM head (excluded by default)"
  if getattr(leaf, "ndim", None) != 2:
    return f"not 2-D ({getattr(leaf, 'ndim', '?')}-D)"
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return f"not floating ({leaf.dtype})"
  if any(d % _GEMM_MULTIPLE for d in leaf.shape):
    return f"dims not multiples of {_GEMM_MULTIPLE}"
  return None


def _matcher(targets: Targets) -> Callable[[str, Any], bool]:
  if callable(targets) and not isinstance(targets, (str, re.Pattern)):
    return targets
  if isinstance(targets, (str, re.Pattern)):
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise UserInputError(f"targets is not a valid regex ({e}): {targets!r}") from None
    return lambda path, leaf: pattern.search(path) is not None
  raise TypeError(
      "targets must be None, a regex over the param path (e.g. r'(q|k|v)_proj/kernel$')"
      f" or a predicate (path, leaf) -> bool, got {type(targets).__name__}"
  )


def meld_leaf(path: str, leaf, index: int, options: FalqonOptions, match=None, *,
              key: Optional[jax.Array] = None):
  """Melds one leaf as :func:`meld` does at flat ``index``: ``(new leaf, report entry)``.

  ``options`` are checked :class:`~falqon_jax.FalqonOptions`; ``key`` (default
  ``jax.random.key(options.seed)``) gets ``index`` folded in. ``match`` is the targets'
  matcher (None: the default targets); the entry is a :class:`MeldedLayer`, a
  :class:`SkippedLeaf`, or None for a leaf explicit targets leave out. Loaders call it per
  tensor, so a model melds while it loads, with the same per-layer keys as melding the
  loaded tree.
  """
  entry = meld_check(path, leaf, options, match)
  if not isinstance(entry, MeldedLayer):
    return leaf, entry
  key = jax.random.key(options.seed) if key is None else key
  new = meld_kernel(leaf, options=options, key=jax.random.fold_in(key, index), name=path)
  return new, entry


def meld_check(path: str, leaf, options: FalqonOptions, match=None):
  """What :func:`meld_leaf` would do with ``leaf``: a :class:`MeldedLayer` to meld it, a
  :class:`SkippedLeaf`, or None for a leaf explicit targets leave out."""
  shape = tuple(getattr(leaf, "shape", ()))
  if isinstance(leaf, MeldedKernel):
    return SkippedLeaf(path, leaf.shape, "already melded")
  if match is not None:
    if not match(path, leaf):
      return None
    kernel = check_kernel(leaf, f"targeted leaf {path!r}")
    if any(d % _GEMM_MULTIPLE for d in kernel.shape):
      raise UserInputError(
          f"targeted kernel {path!r} has shape {shape}; FP8 GEMMs need both dims to be"
          f" multiples of {_GEMM_MULTIPLE}: narrow `targets` to exclude it"
      )
  else:
    reason = _default_reason(path, leaf)
    if reason is not None:
      return SkippedLeaf(path, shape, reason)
  rank = check_rank(options.rank, shape[0], shape[1], f"kernel {path!r}")  # a Python int
  return MeldedLayer(path, shape, rank)


def _targeted(path: str, leaf, match) -> bool:
  """Whether :func:`meld_check` melds ``leaf``, from its shape and dtype alone."""
  if isinstance(leaf, MeldedKernel):
    return False
  if match is not None:
    return bool(match(path, leaf))
  return _default_reason(path, leaf) is None


def fused_groups(linears: dict, match, options: FalqonOptions) -> dict:
  """``{module path: its fused group's member paths}`` for each targeted group member.

  ``linears`` maps every dense layer's module path (a tuple, e.g. ``('layers', 0,
  'self_attn', 'q_proj')``) to its kernel (arrays or abstract shapes). With
  ``options.fused_groups`` (and per-tensor scaling), targets that meld some but not all
  members of a group (:data:`FUSED_GROUPS`) are refused here, before anything is melded;
  without it, every layer is its own group.
  """
  kpath = lambda p: "/".join(map(str, p)) + "/kernel"
  targeted = [p for p, leaf in linears.items() if _targeted(kpath(p), leaf, match)]
  if not options.fused_groups or options.scaling != "tensor":
    return {p: (p,) for p in targeted}
  groups = {}
  for p in targeted:
    group = next((g for g in FUSED_GROUPS if p and str(p[-1]) in g), None)
    members = (p,) if group is None else tuple(
        p[:-1] + (m,) for m in group if p[:-1] + (m,) in linears)
    missing = [m for m in members if m not in targeted]
    if missing:
      names = [str(m[-1]) for m in members]
      regex = "(" + "|".join(n.removesuffix("_proj") for n in names) + ")_proj"
      raise UserInputError(
          f"targets meld {p[-1]} but not {', '.join(str(m[-1]) for m in missing)} of"
          f" {'/'.join(map(str, p[:-1]))}; vLLM fuses {'/'.join(names)} into one FP8 GEMM:"
          f" target the whole group (e.g. r\"{regex}\") or none of it")
    groups[p] = members
  return groups


def meld_members(items, options: FalqonOptions, *, key: Optional[jax.Array] = None):
  """Melds one fused group, ``[(path, leaf, index), ...]``, with one shared scale
  (:func:`~falqon_jax._melded_kernel.meld_group`); ``[(new leaf, MeldedLayer), ...]``.

  Each member's ``A`` is what :func:`meld_leaf` gives it at its ``index``.
  """
  entries = [meld_check(path, leaf, options, lambda *_: True) for path, leaf, _ in items]
  key = jax.random.key(options.seed) if key is None else key
  new = meld_group([leaf for _, leaf, _ in items], options=options,
                   keys=[jax.random.fold_in(key, index) for _, _, index in items],
                   names=[path for path, _, _ in items])
  return list(zip(new, entries))


def meld(
    params,
    rank: Optional[int] = None,
    *,
    options: FalqonOptions = RECOMMENDED,
    targets: Targets = None,
    key: Optional[jax.Array] = None,
    **overrides,
):
  """Replaces the targeted dense kernels of a params tree by :class:`MeldedKernel` s.

  Args:
    params: a Flax params tree (nested dicts / FrozenDicts of arrays).
    rank: the LoRA rank r; None: ``options.rank``.
    options: a :class:`~falqon_jax.FalqonOptions`; the default
      :data:`~falqon_jax.RECOMMENDED` and :data:`~falqon_jax.REFERENCE` both meld with
      the SVD init and a per-tensor scale. Its ``rank``, ``init``, ``scaling`` and
      ``seed`` apply here; keyword ``overrides`` (``init="random"``) replace its fields.
    targets: ``None`` (default) melds every 2-D ``kernel`` leaf whose dims are multiples
      of 16, except embeddings and the LM head. A regex is searched in the slash-joined
      param path (``"model/layers/0/self_attn/q_proj/kernel"``); a predicate gets
      ``(path, leaf)``. Explicitly targeted leaves must be valid kernels, or meld raises.
    key: PRNG key for ``init="random"`` (default ``jax.random.key(options.seed)``);
      each layer folds in its own index.

  With ``options.fused_groups`` (:data:`~falqon_jax.RECOMMENDED`), sibling kernels that
  vLLM fuses (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj`` under one
  parent) are melded with one shared scale, and targets that meld part of such a group
  are refused.

  Returns:
    ``(melded_params, report)``, where ``report`` is a :class:`MeldReport`.

  Example:
    >>> import jax, falqon_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 64)),
    ...                     "bias": jax.numpy.zeros(64)}}
    >>> melded, report = falqon_jax.meld(params, rank=16)
    >>> type(melded["dense"]["kernel"]).__name__, report.num_trainable
    ('MeldedKernel', 1024)
  """
  if rank is not None:
    overrides["rank"] = rank
  options = resolve(options, overrides)
  explicit = targets is not None
  match = _matcher(targets) if explicit else None
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, MeldedKernel)
  )
  paths = [path_str(kpath) for kpath, _ in leaves]
  kernels = {tuple(p.split("/")[:-1]): i for i, p in enumerate(paths)
             if p.split("/")[-1] == "kernel"}  # module path -> flat index
  groups = fused_groups({m: leaves[i][1] for m, i in kernels.items()}, match, options)
  done = {}  # flat index -> (new leaf, entry) of fused groups melded ahead of their turn
  new_leaves, melded, skipped = [], [], []
  for index, (path, (_, leaf)) in enumerate(zip(paths, leaves)):
    members = groups.get(tuple(path.split("/")[:-1]), ())
    if index not in done and len(members) > 1:
      items = [(paths[kernels[m]], leaves[kernels[m]][1], kernels[m]) for m in members]
      done.update(zip((kernels[m] for m in members), meld_members(items, options, key=key)))
    new, entry = done.pop(index) if index in done else meld_leaf(
        path, leaf, index, options, match, key=key)
    new_leaves.append(new)
    if isinstance(entry, MeldedLayer):
      melded.append(entry)
    elif entry is not None:
      skipped.append(entry)
  if explicit and not melded:
    raise UserInputError(
        f"targets {targets!r} matched no parameter; paths look like"
        f" {path_str(leaves[0][0])!r}" if leaves else "params is empty"
    )
  report = MeldReport(tuple(melded), tuple(skipped))
  return jax.tree_util.tree_unflatten(treedef, new_leaves), report


def unmeld(params, dtype=jnp.float32):
  """Replaces every :class:`MeldedKernel` by its dequantized backbone ``(in, out)``.

  A pending (unmerged) ``delta`` is not folded in: the forward ignores it too.
  """
  return jax.tree_util.tree_map(
      lambda x: x.backbone(dtype) if isinstance(x, MeldedKernel) else x,
      params,
      is_leaf=is_melded,
  )
