"""Checkpoints of a whole melded training run, through orbax.

A checkpoint holds the :class:`~falqon_jax.train.TrainState` (the melded params, whose
FP8 backbone changes every step, and the optimizer state), the data position, and the
run's identity (model, rank, targets, ...). Saves are asynchronous and keep the last K;
orbax writes each step to a temporary folder and renames it when complete, so a killed
run never leaves a half-written checkpoint. Resuming from a folder written for another
model or rank is refused with a one-line error.

Example:
  >>> import jax, optax, tempfile, falqon_jax
  >>> from falqon_jax import checkpoint, train
  >>> params, _ = falqon_jax.meld({"w": {"kernel": jax.numpy.ones((32, 32))}}, rank=16)
  >>> tx = falqon_jax.proxy_update(optax.adam(1e-3))
  >>> state = train.TrainState.create(params, tx)
  >>> ckpt = checkpoint.Checkpointer(tempfile.mkdtemp(), identity={"model": "demo", "rank": 16})
  >>> ckpt.save(7, state, data_state={"position": 7}, wait=True)
  >>> restored, data_state = ckpt.restore(state)
  >>> int(ckpt.latest_step()), data_state
  (7, {'position': 7})
  >>> ckpt.close()
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class ResumeMismatchError(ValueError):
  """The checkpoint folder belongs to a different run configuration."""


class Checkpointer:
  """Saves and restores ``(state, data_state)`` under ``directory`` with an identity.

  Args:
    directory: the checkpoint folder (created on first save).
    identity: JSON-able facts that must match to resume (model, rank, targets, ...).
    keep: how many of the latest checkpoints to keep.
    async_save: save in the background (the step loop goes on; ``wait`` or ``close``
      blocks until the files are complete).
  """

  def __init__(self, directory: str, *, identity: dict, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.identity = dict(identity)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, data_state: dict, wait: bool = False) -> None:
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            identity=ocp.args.JsonSave(self.identity),
        ),
        force=True,
    )
    if wait:
      self._manager.wait_until_finished()

  def check_identity(self, step: Optional[int] = None) -> None:
    """Raises :class:`ResumeMismatchError` if the saved run differs from this one."""
    step = self.latest_step() if step is None else step
    saved = self._manager.restore(
        step, args=ocp.args.Composite(identity=ocp.args.JsonRestore())
    ).identity
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {v!r}"
        for k, v in self.identity.items() if saved.get(k) != v
    ]
    if diffs:
      raise ResumeMismatchError(
          f"cannot resume from {self.directory}: it was written by a different run ("
          + "; ".join(diffs) + "); use a new output folder or the original settings"
      )

  def restore(self, template: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores the state (with ``template`` 's structure, dtypes and shardings) and the
    data position from ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
    self.check_identity(step)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
