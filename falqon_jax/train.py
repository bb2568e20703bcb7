"""Training steps for melded causal LMs: one pure step, data-parallel two ways.

The main path is ``jax.jit`` over a device mesh: the batch is sharded on the ``data`` axis,
the state replicated, and XLA inserts the gradient all-reduce (:class:`DataParallel`).
The same step also runs under ``jax.pmap`` (:func:`pmap_train_step`), with explicit
``psum`` s. Either way every replica sees the same averaged delta gradients, so every
replica makes the same top-k choice and the FP8 weights stay bit-identical.

The loss is the token-weighted mean next-token NLL over ``loss_mask`` (response tokens;
pads are masked, unlike the reference). Only the ΔBuffers are trained; clipping, schedule
and gradient accumulation live in the :func:`falqon_jax.proxy_update` optimizer.

The model is a :class:`falqon_jax.models.Functional` with its params (from
:func:`falqon_jax.models.split`), or any object with the same
``apply(params, input_ids, attention_mask, positions, remat=...) -> logits``.

Example:
  >>> import jax, optax, falqon_jax
  >>> from flax import nnx
  >>> from falqon_jax import models, train
  >>> from falqon_jax import nnx as fnnx
  >>> cfg = models.ModelConfig.from_hf({"model_type": "llama", "vocab_size": 256,
  ...     "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  ...     "num_attention_heads": 4})
  >>> lm = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  >>> report = fnnx.meld(lm, rank=16)
  >>> model, params = models.split(lm)
  >>> tx = falqon_jax.proxy_update(optax.adam(2e-3))
  >>> state = train.TrainState.create(params, tx)
  >>> batch = train.example_batch(jax.random.key(1), batch_size=4, seq_len=16, vocab=256)
  >>> state, metrics = jax.jit(train.make_train_step(model, tx))(state, batch)
  >>> int(state.step), sorted(metrics)
  (1, ['loss', 'skipped', 'tokens'])
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import falqon_jax
from falqon_jax._melded_kernel import is_melded
from falqon_jax.errors import UserInputError
from falqon_jax.models import LAYER_OUTPUT

Batch = dict  # {"input_ids", "loss_mask", "attention_mask", "position_ids"[, "segment_ids"]}: [B, T]


class TrainState(NamedTuple):
  """Everything a step changes. A pytree: checkpoint it whole."""

  step: jax.Array  # int32 micro-steps taken
  params: Any  # the melded params tree (the FP8 backbone changes every update)
  opt_state: Any  # the proxy_update state

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    return cls(jnp.zeros([], jnp.int32), params, tx.init(params))


def next_token_nll(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Sum of next-token NLL over masked targets, and the number of targets.

  ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, counted where ``loss_mask[:, t + 1]``.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = batch["input_ids"][:, 1:]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weight), jnp.sum(weight)


def forward(model, params, batch: Batch, *, remat: bool = False) -> jax.Array:
  """Logits of a (possibly melded) causal LM on a batch (``segment_ids``, when the batch
  has them, keep packed examples apart)."""
  return model.apply(params, batch["input_ids"], batch.get("attention_mask"),
                     batch.get("position_ids"), segment_ids=batch.get("segment_ids"),
                     remat=remat)


def make_loss_fn(model, *, remat: bool = False) -> Callable:
  """``loss_sum(params, batch) -> (nll_sum, n_targets)``.

  With ``remat``, only each decoder layer's output (the residual stream, named
  :data:`LAYER_OUTPUT`) is saved for the backward pass: the model recomputes each layer,
  melded layers included, and the rest of the loss (embedding, final norm, logits) is
  recomputed too.
  """

  def loss_sum(params, batch):
    return next_token_nll(forward(model, params, batch, remat=remat), batch)

  if remat:
    policy = jax.checkpoint_policies.save_only_these_names(LAYER_OUTPUT)
    return jax.checkpoint(loss_sum, policy=policy)
  return loss_sum


def _metrics(loss_sum, n, opt_state):
  return {
      "loss": loss_sum / jnp.maximum(n, 1.0),
      "tokens": n,
      "skipped": opt_state.skipped,
  }


def make_train_step(model, tx: optax.GradientTransformation, *, remat: bool = False) -> Callable:
  """A pure ``(state, batch) -> (state, metrics)`` step, for ``jax.jit``.

  Differentiates the token-mean loss over the whole (global) batch; under ``jax.jit``
  with a sharded batch, XLA all-reduces the gradients.
  """
  loss_sum = make_loss_fn(model, remat=remat)

  def step(state: TrainState, batch: Batch):
    def mean_loss(params):
      total, n = loss_sum(params, batch)
      return total / jnp.maximum(n, 1.0), (total, n)

    (_, (total, n)), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = falqon_jax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), _metrics(total, n, opt_state)

  return step


def pmap_train_step(model, tx: optax.GradientTransformation, axis_name: str = "data", *,
                    remat: bool = False) -> Callable:
  """The same step for ``jax.pmap(..., axis_name=axis_name)``.

  Each device holds a slice of the batch; NLL sums, target counts and gradients are
  ``psum`` med, so the update is the token-mean over the global batch, as under jit. One
  difference: each device quantizes its own activations with its own per-tensor scale
  (as one GPU per replica does in the reference), while under jit the amax is taken over
  the global batch. The replicas still agree bit for bit with each other.
  """
  loss_sum = make_loss_fn(model, remat=remat)

  def step(state: TrainState, batch: Batch):
    n = jax.lax.psum(jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32)), axis_name)
    scale = 1.0 / jnp.maximum(n, 1.0)

    def local_loss(params):
      total, _ = loss_sum(params, batch)
      return total * scale, total

    (_, total), grads = jax.value_and_grad(local_loss, has_aux=True)(state.params)
    grads = jax.lax.psum(grads, axis_name)
    total = jax.lax.psum(total, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = falqon_jax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), _metrics(total, n, opt_state)

  return step


def fsdp_spec(axis: str) -> Callable:
  """Partition specs that shard each melded kernel's rows (qweight and delta) on ``axis``.

  Everything else is replicated. The merge stays exact: top-k, the row gather and the
  scatter are global operations that the SPMD partitioner keeps equivalent.
  """

  def spec(x):
    if is_melded(x):
      row = P(axis, None)
      scale = P(axis) if x.scaling == "row" else P()
      return x.replace(qweight=row, scale=scale, delta=row)
    return P()

  return spec


class DataParallel:
  """``jax.jit`` data parallelism over a 1-D mesh (the main path).

  Args:
    devices: the devices to use (default: all). The global batch is split over them.
    fsdp: also shard melded kernels' rows over the same axis (for models too big to
      replicate); the numbers are the same up to floating-point summation order.
  """

  def __init__(self, devices=None, *, fsdp: bool = False, axis: str = "data"):
    devices = list(jax.devices() if devices is None else devices)
    self.axis = axis
    self.mesh = jax.sharding.Mesh(np.array(devices), (axis,),
                                  axis_types=(jax.sharding.AxisType.Auto,))
    self.fsdp = fsdp
    self.batch_sharding = NamedSharding(self.mesh, P(axis))
    self.replicated = NamedSharding(self.mesh, P())

  @property
  def size(self) -> int:
    return self.mesh.size

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.size:
      raise UserInputError(
          f"batch size {batch_size} is not divisible by the {self.size} devices;"
          f" use a multiple of {self.size}"
      )

  def state_sharding(self, state: TrainState):
    if not self.fsdp:
      return jax.tree_util.tree_map(lambda _: self.replicated, state)
    specs = jax.tree_util.tree_map(fsdp_spec(self.axis), state, is_leaf=is_melded)
    to_sharding = lambda s: NamedSharding(self.mesh, s)
    return jax.tree_util.tree_map(to_sharding, specs, is_leaf=lambda x: isinstance(x, P))

  def put_state(self, state: TrainState) -> TrainState:
    """Places a state that every process holds identically onto the (global) mesh."""
    shardings = self.state_sharding(state)
    if jax.process_count() == 1:
      return jax.device_put(state, shardings)
    return jax.tree_util.tree_map(_to_global, state, shardings)

  def put_batch(self, batch: Batch) -> Batch:
    """Places a host batch (the global batch on one process, or this process's slice
    under multi-host) as one global array sharded on the batch axis."""
    if jax.process_count() == 1:
      return jax.device_put(batch, self.batch_sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        batch,
    )

  def compile(self, step: Callable, state: TrainState, *, donate: bool = True) -> Callable:
    """Jits ``step`` with this mesh's shardings; donating the state updates in place."""
    state_sharding = self.state_sharding(state)
    return jax.jit(
        step,
        in_shardings=(state_sharding, self.batch_sharding),
        out_shardings=(state_sharding, self.replicated),
        donate_argnums=(0,) if donate else (),
    )


def _to_global(x, sharding):
  """A global array from this process's full copy of ``x`` (multi-host)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _to_global(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, devices=None):
  """Stacks a tree for ``jax.pmap``: one copy per local device on a leading axis."""
  n = len(devices or jax.local_devices())
  return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def unreplicate(tree):
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_batch(batch: Batch, n: int) -> Batch:
  """``[B, ...]`` -> ``[n, B // n, ...]`` for ``jax.pmap``."""
  return jax.tree_util.tree_map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def example_batch(key, *, batch_size: int, seq_len: int, vocab: int) -> Batch:
  """A random causal-LM batch (for examples, benchmarks and tests): the second half of
  each row is the target."""
  ids = jax.random.randint(key, (batch_size, seq_len), 0, vocab, jnp.int32)
  mask = jnp.broadcast_to(jnp.arange(seq_len) >= seq_len // 2, ids.shape)
  return {
      "input_ids": ids,
      "loss_mask": mask,
      "attention_mask": jnp.ones_like(ids),
      "position_ids": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ids.shape),
  }
