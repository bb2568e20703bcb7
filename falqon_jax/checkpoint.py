"""Checkpoints of a whole melded training run, through orbax.

A checkpoint holds the :class:`~falqon_jax.train.TrainState` (the melded params, whose
FP8 backbone changes every step, and the optimizer state), the data position, and the
run's identity (model, rank, targets, ...). Saves are asynchronous and keep the last K;
orbax writes each step to a temporary folder and renames it when complete, so a killed
run never leaves a half-written checkpoint. Resuming from a folder written for another
model or rank is refused with a one-line error.

Each checkpoint also stores checksums of every state array and of the JSON items, since
orbax reads some damaged bytes back without an error. A restore without an explicit step
uses the newest checkpoint that restores intact, with a one-line warning naming any it had
to skip; the first save after such a fallback moves the skipped folders aside (renamed to
``<step>.corrupt``, not deleted) so the new checkpoints can take their steps.

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

import hashlib
import json
import os
import sys
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from falqon_jax.errors import UserInputError


class ResumeMismatchError(UserInputError):
  """The checkpoint folder belongs to a different run configuration."""


class CheckpointError(UserInputError):
  """A checkpoint's files are damaged: the one asked for, or every one in the folder."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as unsigned integers of its width (64-bit as pairs of uint32)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint8)
  width = min(x.dtype.itemsize, 4)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}"))


@jax.jit
def _leaf_sums(x: jax.Array) -> jax.Array:
  """Two position-weighted uint32 sums of ``x`` 's bits.

  Integer sums wrap exactly whatever the reduction order or sharding, so the save and the
  restore agree bit for bit; the weights are odd, so any single changed element changes
  the first sum.
  """
  u = _words(x).astype(jnp.uint32)
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(u.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * np.uint32(stride % 2**32)
    stride *= u.shape[axis]
  mix = index * np.uint32(0x9E3779B1)
  mix = (mix ^ (mix >> 15)) * np.uint32(0x85EBCA6B)
  return jnp.stack([jnp.sum(u * (2 * index + 1), dtype=jnp.uint32),
                    jnp.sum((u ^ mix) * (mix | 1), dtype=jnp.uint32)])


def _state_digest(state: Any) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  # One leaf at a time: on the CPU backend, collective programs in flight together can
  # deadlock (sharded leaves are summed with an all-reduce).
  sums = [np.asarray(_leaf_sums(x)) for _, x in leaves]
  return {jax.tree_util.keystr(path): "%08x%08x" % (int(s[0]), int(s[1]))
          for (path, _), s in zip(leaves, sums)}


def _json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _is_damage(e: BaseException) -> bool:
  """Whether ``e``, raised by a restore, means that checkpoint's files are unreadable.

  Orbax, tensorstore and json report bad bytes as many types (ValueError, OSError,
  KeyError, UnicodeDecodeError, a bare Exception wrapping a tensorstore error), so any
  Exception counts, except a run mismatch, running out of memory, and an interrupt that
  orbax wrapped into an Exception.
  """
  if isinstance(e, ResumeMismatchError):
    return False
  seen = set()
  while e is not None and id(e) not in seen:
    if not isinstance(e, Exception) or isinstance(e, MemoryError):
      return False
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return True


def _drop_orbax_leftovers() -> None:
  """Silences what a failed orbax restore leaves behind (the damage itself is reported).

  When one array read fails, orbax abandons the reads still in flight: their tensorstore
  callbacks later hit a closed event loop, and their coroutines complain when collected.
  Both reach ``sys.unraisablehook``, often hundreds of tracebacks for a real model, long
  after the one-line report; anything else still reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_orbax_leftovers", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed") or (
        type(e) is Exception and str(e).startswith("Encountered error while reading array")):
      return
    previous(unraisable)

  hook._drops_orbax_leftovers = True
  sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
  """The root cause of ``e`` in one short line (tensorstore's own message, not orbax's)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = (str(e).strip().splitlines() or [""])[0]
  text = text if len(text) <= 200 else text[:197] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
    self.restored_step: Optional[int] = None  # the step the last restore used
    self._skipped: list[int] = []  # damaged steps the last restore fell back past
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, data_state: dict, wait: bool = False) -> None:
    self._set_skipped_aside()
    digest = {"state": _state_digest(state), "data": _json_digest(data_state),
              "identity": _json_digest(self.identity)}
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            identity=ocp.args.JsonSave(self.identity),
            digest=ocp.args.JsonSave(digest),
        ),
        force=True,
    )
    if wait:
      self._manager.wait_until_finished()

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _set_skipped_aside(self) -> None:
    """Renames the damaged steps the last restore skipped, so new saves can reuse them."""
    if not self._skipped:
      return
    if jax.process_index() == 0:
      for step in self._skipped:
        src = dst = self._step_path(step)
        n = 0
        while os.path.exists(dst):
          dst, n = f"{src}.corrupt" + (str(n) if n else ""), n + 1
        os.rename(src, dst)
        warnings.warn(f"moved the damaged checkpoint {src} aside to {dst}", RuntimeWarning,
                      stacklevel=3)
    ocp.multihost.sync_global_processes("falqon_jax_checkpoint_set_aside")
    self._manager.reload()
    self._skipped = []

  def check_identity(self, step: Optional[int] = None) -> None:
    """Raises :class:`ResumeMismatchError` if the saved run differs from this one."""
    self._check_identity(self.latest_step() if step is None else step)

  def _check_identity(self, step: int) -> Optional[dict]:
    """Checks the identity of ``step``; returns its checksums (None if it has none)."""
    items = {"identity": ocp.args.JsonRestore()}
    has_digest = os.path.isdir(os.path.join(self._step_path(step), "digest"))
    if has_digest:
      items["digest"] = ocp.args.JsonRestore()
    read = self._manager.restore(step, args=ocp.args.Composite(**items))
    saved, digest = read.identity, (read.digest if has_digest else None)
    if digest is not None and _json_digest(saved) != digest["identity"]:
      raise ValueError("the saved run identity does not match its checksum")
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {v!r}"
        for k, v in self.identity.items() if saved.get(k) != v
    ]
    if diffs:
      raise ResumeMismatchError(
          f"cannot resume from {self.directory}: it was written by a different run ("
          + "; ".join(diffs) + "); use a new output folder or the original settings"
      )
    return digest

  def restore(self, template: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores the state (with ``template`` 's structure, dtypes and shardings) and the
    data position.

    Without ``step``, uses the newest checkpoint that restores intact: damaged ones are
    skipped with a one-line warning, and if none restores a :class:`CheckpointError` says
    so. A damaged explicit ``step`` raises :class:`CheckpointError`. A run mismatch raises
    :class:`ResumeMismatchError` at once. ``restored_step`` tells the step used.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
      steps = [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
    damaged = []
    # Before the reads: a failing read's leftovers can surface while it still unwinds.
    _drop_orbax_leftovers()
    for s in steps:
      try:
        state, data = self._restore_step(template, s)
      except Exception as e:
        if not _is_damage(e):
          raise
        damaged.append((s, e))
        continue
      if damaged:
        warnings.warn(
            "skipped damaged checkpoint(s) " + "; ".join(
                f"step {b} ({self._step_path(b)}): {_reason(e)}" for b, e in damaged)
            + f"; restored step {s} ({self._step_path(s)}) instead", RuntimeWarning,
            stacklevel=2)
      self.restored_step, self._skipped = s, [b for b, _ in damaged]
      return state, data
    s, e = damaged[0]
    if step is not None:
      raise CheckpointError(
          f"checkpoint {self._step_path(s)} (step {s}) is damaged ({_reason(e)}); restore"
          " another step, or none to use the newest that restores") from e
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores (newest, step {s}: {_reason(e)});"
        " start a fresh run in another --output_dir") from e

  def _restore_step(self, template: Any, step: int) -> tuple[Any, dict]:
    """Restores ``step`` and checks it against its checksums; raises if it is damaged."""
    digest = self._check_identity(step)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
        ),
    )
    state, data = jax.block_until_ready(restored.state), restored.data
    if digest is not None:
      if _json_digest(data) != digest["data"]:
        raise ValueError("the data position does not match its checksum")
      sums = _state_digest(state)
      bad = sorted(k for k in sums.keys() | digest["state"].keys()
                   if sums.get(k) != digest["state"].get(k))
      if bad:
        raise ValueError(f"state{bad[0]} does not match its checksum")
    return state, data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
