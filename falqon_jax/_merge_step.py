"""FALQON's merge as a step of its own, for trainers that apply ordinary increments.

Trainers built on ``optax.apply_updates`` (hand-written loops, ``nnx.Optimizer``) add
updates to params. :func:`delta_only` turns any optax optimizer into
one whose updates do just that for FALQON: the deltas get the inner optimizer's
increments, every other leaf (FP8 bytes, scales, frozen weights) a ``-0.0`` that leaves
its bits as they were. A plain optimizer would not: Adam's update for a zero FP8
gradient is NaN in float8, and a ``+0.0`` turns ``-0.0`` bytes into ``+0.0``.
:func:`merge` then merges the top-k rows of every ΔBuffer into its FP8 rows and resets
them, as :func:`falqon_jax.proxy_update` does after its inner optimizer (which calls the
same code, so the two give the same bytes).

The merge's step count (for ``topk_warmup_steps``) and PRNG key (stochastic rounding)
live in a :class:`MergeState` from :func:`merge_init`, passed and returned like an optax
state, so ``jax.jit`` and checkpoints carry it.

Example:
  >>> import jax, jax.numpy as jnp, optax, falqon_jax
  >>> params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}
  >>> params, _ = falqon_jax.meld(params, rank=16)
  >>> tx = falqon_jax.delta_only(optax.adam(2e-3))
  >>> opt_state, merge_state = tx.init(params), falqon_jax.merge_init(params)
  >>> x = jax.random.normal(jax.random.key(1), (32, 64))
  >>> loss = lambda p: jnp.mean(falqon_jax.melded_dense(x, p["w"]["kernel"]) ** 2)
  >>> updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> params, merge_state = falqon_jax.merge(params, merge_state)
  >>> int(merge_state.count), float(jnp.abs(params["w"]["kernel"].delta).max())
  (1, 0.0)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from falqon_jax._melded_kernel import MeldedKernel, is_melded
from falqon_jax._merge import merge_rows
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax.errors import UserInputError


class MergeState(NamedTuple):
  """State of :func:`merge`.

  Attributes:
    count: int32, steps taken (calls with ``when`` false not counted); drives
      ``merge_every``, ``topk_warmup_steps`` and the per-step key.
    key: PRNG key for stochastic rounding (``None`` with nearest rounding).
  """

  count: jax.Array
  key: Optional[jax.Array]


def delta_tree(tree):
  """The tree with each melded kernel replaced by its delta, other leaves masked out.

  This is the tree the inner optimizer sees. Works on params and on the gradients that
  ``jax.grad`` returns for them (which have the same ``MeldedKernel`` nodes).
  """
  return jax.tree_util.tree_map(
      lambda x: x.delta if is_melded(x) else optax.MaskedNode(), tree, is_leaf=is_melded
  )


def melded_kernels(params) -> list[MeldedKernel]:
  return [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_melded) if is_melded(x)]


def plan(mk: MeldedKernel, count: jax.Array, options: FalqonOptions):
  """Static k for the top-k, and the traced number of rows that really merge (or None)."""
  top_k, warmup_steps = options.top_k, options.topk_warmup_steps
  if top_k is None:
    return mk.rank, None
  k = mk.out_features if top_k == "all" else top_k
  if k > mk.out_features:
    raise UserInputError(
        f"top_k={top_k} exceeds the {mk.out_features} rows of a melded kernel of"
        f' shape {mk.shape}; use top_k <= {mk.out_features}, or top_k="all"'
    )
  if warmup_steps == 0:
    return k, None
  k_static = min(max(k, mk.rank), mk.out_features)
  return k_static, jnp.where(count < warmup_steps, mk.rank, k)


def check_params(params, options: FalqonOptions) -> None:
  """``params`` holds a melded kernel, and ``options.top_k`` fits every one."""
  kernels = melded_kernels(params)
  if not kernels:
    raise UserInputError(
        "params holds no MeldedKernel: meld it first, e.g."
        " params, report = falqon_jax.meld(params, rank=64)"
    )
  for mk in kernels:
    plan(mk, jnp.zeros([], jnp.int32), options)


def default_key(options: FalqonOptions, key: Optional[jax.Array]) -> Optional[jax.Array]:
  """``key``, or ``jax.random.key(options.seed)`` where stochastic rounding needs one."""
  if key is None and options.rounding == "stochastic":
    return jax.random.key(options.seed)
  return key


def merge_kernels(params, options: FalqonOptions, count: jax.Array,
                  key: Optional[jax.Array], applied: jax.Array):
  """Merges every melded kernel of ``params``: the one merge path of :func:`merge` and
  :func:`falqon_jax.proxy_update`.

  Step ``count`` folds into ``key``, then each kernel's index in tree order, so
  data-parallel replicas with the same state make the same choices. Where ``applied``
  is false, or ``count + 1`` is not a multiple of ``options.merge_every``, nothing merges
  and nothing resets.
  """
  if options.merge_every > 1:
    applied = applied & ((count + 1) % options.merge_every == 0)
  step_key = None if key is None else jax.random.fold_in(key, count)
  counter = iter(range(1 << 30))

  def one(p):
    if not is_melded(p):
      return p
    index = next(counter)
    k, active = plan(p, count, options)
    active = jnp.where(applied, k if active is None else active, 0)
    layer_key = None if step_key is None else jax.random.fold_in(step_key, index)
    return merge_rows(
        p, k, reset=options.reset, rounding=options.rounding, key=layer_key, active=active,
        implementation=options.implementation,
    )

  return jax.tree_util.tree_map(one, params, is_leaf=is_melded)


def delta_only(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` on the deltas only, as increments that ``optax.apply_updates`` adds.

  The update of each melded kernel is a :class:`~falqon_jax.MeldedKernel` whose ``delta``
  is ``inner``'s update and whose ``qweight`` and ``scale`` are ``-0.0``; every other
  leaf gets ``-0.0`` too. ``x + (-0.0)`` is ``x`` bit for bit in every float format
  (``+0.0`` would flip ``-0.0`` to ``+0.0``), so only the deltas move: follow it with
  :func:`merge`. The state is ``inner``'s own, on :func:`falqon_jax.delta_tree` (so
  ``optax.MultiSteps.has_updated(state)`` works on it).

  Args:
    inner: any optax transformation for the deltas (clipping, schedules, weight decay).
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return inner.init(delta_tree(params))

  def update(grads, state, params=None, **extra_args):
    delta_updates, state = inner.update(
        delta_tree(grads), state, None if params is None else delta_tree(params), **extra_args)

    def neg_zero(x):
      return jnp.full(jnp.shape(x), -0.0, jnp.asarray(x).dtype)

    def one(g, u):
      if is_melded(g):
        return g.replace(qweight=neg_zero(g.qweight), scale=neg_zero(g.scale),
                         delta=u.astype(g.delta.dtype))
      return neg_zero(g)

    return jax.tree_util.tree_map(one, grads, delta_updates, is_leaf=is_melded), state

  return optax.GradientTransformationExtraArgs(init, update)


def merge_init(params, options: FalqonOptions = RECOMMENDED, *,
               key: Optional[jax.Array] = None, **overrides) -> MergeState:
  """The :class:`MergeState` for :func:`merge`: count 0 and the rounding key.

  Args:
    params: the melded params (or an ``nnx.State`` of them); checks that they hold a
      melded kernel and that ``top_k`` fits each.
    options: a :class:`~falqon_jax.FalqonOptions` (default
      :data:`~falqon_jax.RECOMMENDED`); pass the same to :func:`merge`.
    key: PRNG key for stochastic rounding (default ``jax.random.key(options.seed)``).
    **overrides: fields of ``options`` to replace.
  """
  options = resolve(options, overrides)
  check_params(params, options)
  return MergeState(count=jnp.zeros([], jnp.int32), key=default_key(options, key))


def merge(params, state: MergeState, options: FalqonOptions = RECOMMENDED, *,
          when: Union[bool, jax.Array] = True, **overrides) -> tuple[Any, MergeState]:
  """Merges the top-k rows of every melded kernel's delta into its FP8 rows, then resets
  the delta: the step :func:`falqon_jax.proxy_update` takes after its inner optimizer.

  Call it after ``optax.apply_updates`` with :func:`delta_only`'s updates; it works
  under ``jax.jit`` and on any pytree holding ``MeldedKernel`` leaves (a params tree,
  ``nnx.state(model, falqon_jax.nnx.Melded)``). ``options`` (default
  :data:`~falqon_jax.RECOMMENDED`) and keyword overrides give ``top_k``,
  ``topk_warmup_steps``, ``reset``, ``rounding`` and ``implementation``, as for
  ``proxy_update``.

  Args:
    params: the params after the delta update.
    state: from :func:`merge_init`.
    options: the FALQON options.
    when: a bool or traced scalar: where false, nothing merges, nothing resets and
      ``state.count`` stays, e.g. ``optax.MultiSteps.has_updated(opt_state)`` for
      gradient accumulation, or whether the step's updates were finite.
    **overrides: fields of ``options`` to replace.

  Returns:
    ``(params, state)``: the merged params and the advanced state.
  """
  options = resolve(options, overrides)
  if not isinstance(state, MergeState):
    raise TypeError(f"state must be a falqon_jax.MergeState from falqon_jax.merge_init(params),"
                    f" got {type(state).__name__}")
  if options.rounding == "stochastic" and state.key is None:
    raise UserInputError('rounding="stochastic" needs a key: build the state with'
                         " falqon_jax.merge_init(params, options) using these options")
  check_params(params, options)
  applied = jnp.asarray(when)
  if applied.shape != () or applied.dtype != jnp.bool_:
    raise UserInputError(f"when must be a bool scalar, got {applied.dtype}{applied.shape}")
  merged = merge_kernels(params, options, state.count, state.key, applied)
  return merged, MergeState(count=state.count + applied.astype(jnp.int32), key=state.key)
