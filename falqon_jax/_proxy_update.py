"""``proxy_update``: the optax-style FALQON optimizer step, and ``apply_updates``.

Spec: falqon-reference.md section 5. One step is: the inner optax optimizer turns the
delta gradients into delta updates (clipping and schedules live inside it and see only
the deltas, as the reference's clipping sees only B); then every melded kernel merges
its top-k rows into the FP8 backbone and resets its ΔBuffer.

Because the merge rewrites FP8 bytes, the updates this transformation emits for a melded
kernel are *new values* (a :class:`MeldedUpdate`), not increments. Apply them with
:func:`falqon_jax.apply_updates`; ``optax.apply_updates`` refuses them with a tree
structure error instead of silently adding FP8 bytes. The merge is
:func:`falqon_jax.merge`'s; trainers that apply updates with ``optax.apply_updates`` use
:func:`falqon_jax.delta_only` and :func:`falqon_jax.merge` instead of this wrapper.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import optax

from falqon_jax._melded_kernel import is_int, is_melded
from falqon_jax._merge_step import check_params, default_key, delta_tree, merge_kernels
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class MeldedUpdate:
  """New values for one melded kernel, produced by :func:`proxy_update`."""

  qweight: jax.Array
  scale: jax.Array
  delta: jax.Array


jax.tree_util.register_dataclass(MeldedUpdate)


class ProxyUpdateState(NamedTuple):
  """State of :func:`proxy_update`.

  Attributes:
    inner_state: ``optax.ApplyIfFiniteState`` around the inner optimizer's state.
    count: int32, optimizer updates applied (skipped steps and accumulation
      micro-steps not counted).
    key: PRNG key for stochastic rounding (``None`` with nearest rounding).
  """

  inner_state: Any
  count: jax.Array
  key: Optional[jax.Array]

  @property
  def skipped(self) -> jax.Array:
    """How many steps were skipped because their gradients or updates were not finite."""
    return self.inner_state.total_notfinite


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _apply_if_finite(inner: optax.GradientTransformation,
                     emits=None) -> optax.GradientTransformationExtraArgs:
  """``optax.apply_if_finite`` that never gives up and also checks the inner *updates*.

  Finite gradients can still give non-finite updates (a NaN learning rate, an overflowing
  moment), which the gradients alone do not show. Such a step is rejected like one with
  non-finite gradients: zero updates, the inner state as it was, and counted. The state
  is an ``optax.ApplyIfFiniteState``, as ``apply_if_finite`` keeps it.

  ``emits(old_inner_state, new_inner_state)``, if given, says whether the call emitted
  an update (``optax.MultiSteps`` emits only on its last micro-step). Other calls give
  zero updates and are judged by their gradients alone: what MultiSteps computes but
  does not emit is not an update (on some jax versions it is the NaN of a NaN rate).
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
    )

  def update(grads, state, params=None, **extra_args):
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    finite_updates = _all_finite(updates)
    if emits is not None:
      emitted = emits(state.inner_state, inner_state)
      updates = jax.tree_util.tree_map(lambda u: jnp.where(emitted, u, 0).astype(u.dtype),
                                       updates)
      finite_updates = finite_updates | ~emitted
    finite = jnp.logical_and(_all_finite(grads), finite_updates)
    # lax.cond, not a select per leaf: it also carries non-array state (PRNG keys).
    updates, inner_state = lax.cond(
        finite,
        lambda: (updates, inner_state),
        lambda: (optax.tree.zeros_like(updates), state.inner_state),
    )
    return updates, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(
            finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count)),
        last_finite=finite,
        total_notfinite=jnp.where(
            finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init, update)


def proxy_update(
    inner: optax.GradientTransformation,
    options: FalqonOptions = RECOMMENDED,
    *,
    key: Optional[jax.Array] = None,
    accumulation_steps: int = 1,
    **overrides,
) -> optax.GradientTransformationExtraArgs:
  """FALQON's row-wise proxy update around an inner optax optimizer.

  ``options`` (a :class:`~falqon_jax.FalqonOptions`, :data:`~falqon_jax.RECOMMENDED` by
  default; :data:`~falqon_jax.REFERENCE` for the official code's semantics) gives
  ``top_k``, ``topk_warmup_steps``, ``reset``, ``rounding``, ``implementation`` and
  ``seed``; keyword ``overrides`` (``reset="all"``) replace its fields:

    top_k: rows merged per kernel per step. ``None`` merges ``rank`` rows, which is what
      the reference code really does (its ``num_topk`` is never used); ``"all"`` merges
      every row of every kernel each step.
    topk_warmup_steps: for this many steps ``k = rank``, then ``k = top_k``.
    reset: ``"all"`` zeroes the whole ΔBuffer after each merge (the reference);
      ``"merged"`` zeroes only the merged rows, so the rest keep accumulating;
      ``"residual"`` is ``"merged"`` plus error feedback: a merged row keeps the part of
      its update that the e4m3 grid could not hold (projected on A's rows, see
      :func:`falqon_jax.rounding_residual`), so sub-ULP updates land over later steps.
    rounding: ``"nearest"`` (the reference) or ``"stochastic"``.
    implementation: merge implementation, see :func:`falqon_jax.merge_top_k`.

  Args:
    inner: any optax transformation for the deltas, e.g.
      ``optax.chain(optax.clip_by_global_norm(3.0), optax.adamw(schedule))``.
    options: the FALQON options.
    key: PRNG key for stochastic rounding (default ``jax.random.key(options.seed)``);
      each step and kernel folds in its own index, so data-parallel replicas with the
      same state make the same choices.
    accumulation_steps: gradient accumulation. The inner optimizer runs under
      ``optax.MultiSteps`` on the mean of this many micro-batch gradients, and the merge
      happens only on that update step; the other calls change nothing.
    **overrides: fields of ``options`` to replace.

  A step whose delta gradients or inner updates are not finite (``optax.apply_if_finite``,
  extended to the updates, which a NaN learning rate spoils) is skipped: deltas, FP8
  weights and the inner state are left unchanged, and ``state.skipped`` counts it.

  Example:
    >>> import jax, jax.numpy as jnp, optax, falqon_jax
    >>> params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}
    >>> params, _ = falqon_jax.meld(params, rank=16)
    >>> tx = falqon_jax.proxy_update(optax.adam(2e-3))
    >>> state = tx.init(params)
    >>> x = jax.random.normal(jax.random.key(1), (32, 64))
    >>> loss = lambda p: jnp.mean(falqon_jax.melded_dense(x, p["w"]["kernel"]) ** 2)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = falqon_jax.apply_updates(params, updates)
    >>> int(state.count)
    1
  """
  options = resolve(options, overrides)
  key = default_key(options, key)
  if not is_int(accumulation_steps) or accumulation_steps < 1:
    raise UserInputError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
  accumulation_steps = int(accumulation_steps)  # a Python int for optax
  emits = None
  if accumulation_steps > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accumulation_steps).gradient_transformation()
    emits = lambda old, new: new.gradient_step > old.gradient_step  # a sync step
  guarded = _apply_if_finite(inner, emits)

  def stepped(old_inner, new_inner):
    """Whether this call really updated the deltas: finite, and a sync step."""
    finite = new_inner.last_finite
    if emits is None:
      return finite
    return finite & emits(old_inner.inner_state, new_inner.inner_state)

  def init(params):
    check_params(params, options)
    return ProxyUpdateState(
        inner_state=guarded.init(delta_tree(params)),
        count=jnp.zeros([], jnp.int32),
        key=key,
    )

  def update(grads, state, params=None, **extra_args):
    if params is None:
      raise UserInputError(
          "proxy_update needs params: call tx.update(grads, state, params)"
      )
    delta_updates, inner_state = guarded.update(
        delta_tree(grads), state.inner_state, delta_tree(params), **extra_args
    )
    applied = stepped(state.inner_state, inner_state)
    stepped_params = jax.tree_util.tree_map(
        lambda p, u: p.replace(delta=p.delta + u.astype(p.delta.dtype)) if is_melded(p) else p,
        params, delta_updates, is_leaf=is_melded,
    )
    # Gated on `applied`: a skipped step merges nothing and resets nothing.
    merged = merge_kernels(stepped_params, options, state.count, state.key, applied)
    updates = jax.tree_util.tree_map(
        lambda m: MeldedUpdate(m.qweight, m.scale, m.delta) if is_melded(m) else jnp.zeros_like(m),
        merged, is_leaf=is_melded,
    )
    new_state = ProxyUpdateState(
        inner_state=inner_state,
        count=state.count + applied.astype(jnp.int32),
        key=state.key,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


def apply_updates(params, updates):
  """Applies :func:`proxy_update`'s updates: new values for melded kernels, ``p + u``
  (dtype kept, as ``optax.apply_updates`` does) for every other leaf."""

  def apply(p, u):
    if is_melded(p):
      if not isinstance(u, MeldedUpdate):
        raise TypeError(
            "updates for a MeldedKernel must come from falqon_jax.proxy_update, got"
            f" {type(u).__name__}; wrap your optax optimizer: proxy_update(optimizer)"
        )
      return p.replace(qweight=u.qweight, scale=u.scale, delta=u.delta)
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

  return jax.tree_util.tree_map(apply, params, updates, is_leaf=is_melded)
