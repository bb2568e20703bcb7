"""FALQON fine-tuning with google-tunix: melded tunix models trained by tunix's ``PeftTrainer``.

Meld a tunix model (Llama 3, Qwen3, Gemma...) with :func:`falqon_jax.nnx.meld`, then train
it with :class:`PeftTrainer`, a thin subclass of ``tunix.sft.peft_trainer.PeftTrainer``
that takes the same arguments plus FALQON's ``options``::

  from falqon_jax import nnx as fnnx
  from falqon_jax.tunix import PeftTrainer

  report = fnnx.meld(model, rank=64)  # attention einsums and MLP Linears
  trainer = PeftTrainer(model, optax.adamw(1e-4), training_config)
  trainer.with_gen_model_input_fn(gen_model_input_fn).train(train_ds)

What changes against tunix's trainer:

* :class:`falqon_jax.nnx.Melded` is an ``nnx.LoRAParam``, so tunix sees a LoRA model:
  its ``nnx.Optimizer(wrt=nnx.LoRAParam)``, ``nnx.DiffState(0, nnx.LoRAParam)`` gradients
  and LoRA-only checkpoints select the melded kernels. The optimizer is wrapped in
  :func:`falqon_jax.delta_only`, so its state covers only the deltas and its updates move
  only them (``-0.0`` everywhere else).
* The jitted train step runs tunix's own step (loss, gradients, optimizer update) and then
  :func:`falqon_jax.merge` in the same program, with the model and the optimizer donated.
* The merge's :class:`~falqon_jax.MergeState` (step count, rounding key) lives in the
  optimizer state, so tunix's checkpoints save and restore it; the saved LoRA params are
  whole ``MeldedKernel`` s, so the merged FP8 rows are kept.
* With ``gradient_accumulation_steps``, ``optax.MultiSteps`` runs inside
  :func:`~falqon_jax.delta_only` (accumulating deltas' gradients only, not zeros for the
  FP8 rows), and the merge runs on the steps where the optimizer updates.

Why module surgery, not interception: qwix's providers (its LoRA, MaxText's FP8) swap
``dot_general`` / ``einsum`` calls while a model runs and keep the weights the model
holds. FALQON needs the weight itself replaced: the FP8 ``[W; A]``, its scale and the
ΔBuffer are one :class:`~falqon_jax.MeldedKernel` in the model state, which the optimizer,
the merge and the checkpoints update. tunix's models touch the weight before the einsum
(Qwen3's ``Einsum`` casts it to the compute dtype), so an interceptor would see a cast
copy, and it would need the model's state replaced anyway. Tunix's models (and ours,
:mod:`falqon_jax.models`) use two layer kinds, ``nnx.Linear`` and an einsum module with
``einsum_str``, so swapping layers covers them whole, works on abstract models, and the
:class:`~falqon_jax.MeldReport` names every layer melded or skipped, with the reason.

Requires ``pip install "falqon-jax[tunix]"``; this module imports tunix on first use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import optax
from flax import nnx

from falqon_jax import nnx as fnnx
from falqon_jax._merge_step import MergeState, delta_only, delta_tree, merge, merge_init
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax.errors import UserInputError

__all__ = ["FalqonState", "PeftTrainer", "with_merge_state"]

_INSTALL = 'falqon_jax.tunix needs google-tunix: pip install "falqon-jax[tunix]"'


class FalqonState(NamedTuple):
  """The trainer's optimizer state: the optimizer's own and the merge's."""

  inner: Any
  merge: MergeState


def with_merge_state(tx: optax.GradientTransformation, options: FalqonOptions = RECOMMENDED,
                     *, key: Optional[jax.Array] = None) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose state also carries the :class:`~falqon_jax.MergeState` for ``params``.

  The updates are ``tx`` 's; the merge state rides along untouched, so whatever saves
  and restores optimizer state (tunix's checkpoints) keeps it too.
  """
  tx = optax.with_extra_args_support(tx)

  def init(params):
    return FalqonState(tx.init(params), merge_init(params, options, key=key))

  def update(updates, state, params=None, **extra_args):
    updates, inner = tx.update(updates, state.inner, params, **extra_args)
    return updates, state._replace(inner=inner)

  return optax.GradientTransformationExtraArgs(init, update)


def _set_values(variables, values) -> None:
  jax.tree.map(lambda var, v: var.set_value(v), variables, values,
               is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.cache
def _trainer_class():
  try:
    from jax.interpreters import pxla
    from tunix.sft import peft_trainer
  except ImportError:
    raise ImportError(_INSTALL) from None

  class PeftTrainer(peft_trainer.PeftTrainer):
    """tunix's ``PeftTrainer`` for a melded model: FALQON's delta updates and merge in one
    jitted step (see :mod:`falqon_jax.tunix`).

    Args:
      model: a tunix (or any NNX) model melded with :func:`falqon_jax.nnx.meld`.
      optimizer: the optax optimizer for the deltas (any schedule, clipping...).
      training_config: tunix's ``TrainingConfig``.
      options: a :class:`~falqon_jax.FalqonOptions` for the merge (default
        :data:`~falqon_jax.RECOMMENDED`); pass the one the model was melded with.
      key: PRNG key for stochastic rounding (default ``jax.random.key(options.seed)``).
      **kwargs: tunix's other arguments (``metrics_logger``, ``perf_tracer``...).
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation,
                 training_config, *, options: FalqonOptions = RECOMMENDED,
                 key: Optional[jax.Array] = None, **kwargs):
      options = resolve(options, {})
      if not fnnx.kernels(model):
        raise UserInputError("model has no melded layer: call falqon_jax.nnx.meld(model, rank)"
                             " before building falqon_jax.tunix.PeftTrainer")
      other = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.LoRAParam, nnx.Not(fnnx.Melded))))
      if other:
        raise UserInputError(
            f"model holds LoRA params besides melded layers ({'/'.join(map(str, other[0][0]))});"
            " meld a model without qwix LoRA applied: FALQON trains the melded deltas only")
      every = training_config.gradient_accumulation_steps
      self._falqon_multi = None if every is None else optax.MultiSteps(optimizer, every)
      inner = optimizer if every is None else self._falqon_multi.gradient_transformation()
      self._falqon_options = options
      # tunix would wrap MultiSteps around the whole LoRA state, FP8 rows included: hide
      # the accumulation from its constructor, which builds the optimizer, and restore
      # the config for its step counting.
      super().__init__(model, with_merge_state(delta_only(inner), options, key=key),
                       dataclasses.replace(training_config, gradient_accumulation_steps=None),
                       **kwargs)
      self.config = training_config
      self._iter_steps = self._train_steps * training_config.get_with_default(
          "gradient_accumulation_steps", 1)

    def _train_step(self, model, optimizer, inputs):
      """tunix's step (gradients of the LoRA params, optimizer update), then the merge."""
      inputs = self.gen_model_input_fn(inputs)
      grad_fn = nnx.value_and_grad(self.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam),
                                   has_aux=self._has_aux)
      out, grads = grad_fn(model, **inputs)
      # The deltas' norm: the FP8 rows' zero cotangents are float8, which optax cannot sum.
      grad_norm = optax.global_norm(delta_tree(grads))
      optimizer.update(model, grads)
      state = nnx.as_pure(optimizer.opt_state)
      multi = self._falqon_multi
      when = True if multi is None else multi.has_updated(state.inner)
      merged, merge_state = merge(nnx.state(model, fnnx.Melded), state.merge,
                                  self._falqon_options, when=when)
      nnx.update(model, merged)
      _set_values(optimizer.opt_state.merge, merge_state)
      loss, aux = out if self._has_aux else (out, None)
      return loss, aux, grad_norm

    def jit_train_and_eval_step(self, skip_jit: bool = False, cache_nnx_graph: bool = False):
      """tunix's, with the model donated too: the merge rewrites the FP8 rows in place."""
      if skip_jit or self._jitted_train_step_fn is not None:
        return super().jit_train_and_eval_step(skip_jit, cache_nnx_graph)
      self._shard_optimizer(pxla.thread_resources.env.physical_mesh)
      train = nnx.jit(self.create_train_step_fn(), donate_argnames=("model", "optimizer"))
      evaluate = nnx.jit(self.create_eval_step_fn())
      bind = functools.partial
      if cache_nnx_graph:  # a partial around it, as tunix reads .func.jitted_fn
        bind = lambda f, *args: functools.partial(nnx.cached_partial(f, *args))
      self._jitted_train_step_fn = bind(train, self.model, self.optimizer)
      self._jitted_eval_step_fn = bind(evaluate, self.model)
      return self._jitted_train_step_fn, self._jitted_eval_step_fn

    @property
    def merge_state(self) -> MergeState:
      """The merge's state: ``count`` merges done, the rounding ``key``."""
      return nnx.as_pure(self.optimizer.opt_state.merge)

  PeftTrainer.__module__ = __name__
  return PeftTrainer


def __getattr__(name: str):
  if name == "PeftTrainer":
    return _trainer_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
