import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import falqon_jax
from falqon_jax import checkpoint, train

# A failed orbax read leaves abandoned reads that print tracebacks later, unless silenced.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def _state(seed=0):
  params = {"w": {"kernel": jax.random.normal(jax.random.key(seed), (32, 48))}, "b": jnp.ones(3)}
  params, _ = falqon_jax.meld(params, rank=16)
  tx = falqon_jax.proxy_update(optax.adam(1e-2), falqon_jax.REFERENCE, rounding="stochastic", key=jax.random.key(1))
  state = train.TrainState.create(params, tx)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  return train.TrainState(state.step + 1, falqon_jax.apply_updates(params, updates), opt_state)


def _bytes(tree):
  return [np.asarray(x).tobytes() if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
          else np.asarray(jax.random.key_data(x)).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def test_round_trip_is_bit_exact_and_keeps_last_k(tmp_path):
  state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), identity={"model": "m", "rank": 16}, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, data_state={"step": step})
  ckpt.wait()
  assert ckpt._manager.all_steps() == [2, 3]
  template = _state(seed=5)  # same structure, other values
  restored, data_state = ckpt.restore(template)
  assert data_state == {"step": 3}
  assert _bytes(restored) == _bytes(state)
  mk = restored.params["w"]["kernel"]
  assert isinstance(mk, falqon_jax.MeldedKernel) and mk.qweight.dtype == jnp.float8_e4m3fn
  ckpt.close()


def test_resume_from_another_model_or_rank_is_refused(tmp_path):
  state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), identity={"model": "m", "rank": 16})
  ckpt.save(1, state, data_state={}, wait=True)
  ckpt.close()
  other = checkpoint.Checkpointer(str(tmp_path), identity={"model": "m", "rank": 32})
  with pytest.raises(checkpoint.ResumeMismatchError, match="rank: saved 16, now 32"):
    other.restore(state)
  other.close()


def test_restore_without_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), identity={})
  with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
    ckpt.restore(_state())
  ckpt.close()


# --------------------------------------------------------------- damaged checkpoints

_IDENTITY = {"model": "m", "rank": 16}


def _step_state(step):
  """A state whose ``.step`` is the checkpoint step and whose values differ per step."""
  return _state(seed=step)._replace(step=jnp.asarray(step, jnp.int32))


@pytest.fixture(scope="module")
def _written(tmp_path_factory):
  folder = tmp_path_factory.mktemp("written")
  ckpt = checkpoint.Checkpointer(str(folder), identity=_IDENTITY)
  for step in (1, 2):
    ckpt.save(step, _step_state(step), data_state={"step": step}, wait=True)
  ckpt.close()
  return folder


@pytest.fixture
def run(_written, tmp_path):
  """A fresh copy of a folder of real checkpoints of steps 1 and 2."""
  return shutil.copytree(_written, tmp_path / "run")


def _array_data(step_dir):
  """The largest of orbax's ocdbt data files: it holds the array chunks."""
  return max((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _array_data(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(step_dir):
  # Mid-chunk bytes of the zstd stream: orbax decodes them without an error.
  f = _array_data(step_dir)
  b = bytearray(f.read_bytes())
  for i in range(len(b) // 2, len(b) // 2 + 4):
    b[i] ^= 0xFF
  f.write_bytes(bytes(b))


def _empty(*parts):
  return lambda step_dir: step_dir.joinpath(*parts).write_bytes(b"")


def _bump_data_position(step_dir):
  f = step_dir / "data" / "metadata"
  f.write_bytes(f.read_bytes().replace(b"2", b"3"))  # still valid JSON, wrong position


_DAMAGE = {
    "truncated array data": _truncate,
    "flipped bytes in array data": _flip,
    "emptied state metadata": _empty("state", "_METADATA"),
    "emptied data position": _empty("data", "metadata"),
    "emptied identity": _empty("identity", "metadata"),
    "changed data position": _bump_data_position,
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_that_restores(run, damage):
  _DAMAGE[damage](run / "2")
  ckpt = checkpoint.Checkpointer(str(run), identity=_IDENTITY)
  assert ckpt.latest_step() == 2
  with pytest.warns(RuntimeWarning) as caught:
    restored, data_state = ckpt.restore(_state(seed=5))
  [msg] = [str(w.message) for w in caught if str(run / "2") in str(w.message)]
  assert "step 2" in msg and "step 1" in msg and "\n" not in msg
  assert int(restored.step) == 1 and ckpt.restored_step == 1 and data_state == {"step": 1}
  assert _bytes(restored) == _bytes(_step_state(1))
  ckpt.close()


def test_no_restorable_checkpoint_is_a_one_line_error(run):
  _truncate(run / "2")
  _flip(run / "1")
  ckpt = checkpoint.Checkpointer(str(run), identity=_IDENTITY)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore(_state(seed=5))
  msg = str(e.value)
  assert "\n" not in msg and str(run) in msg and "--output_dir" in msg
  ckpt.close()


def test_damaged_explicit_step_is_a_one_line_error_without_fallback(run, recwarn):
  _truncate(run / "2")
  ckpt = checkpoint.Checkpointer(str(run), identity=_IDENTITY)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore(_state(seed=5), step=2)
  assert "\n" not in str(e.value) and str(run / "2") in str(e.value)
  assert not [w for w in recwarn if "instead" in str(w.message)]
  restored, _ = ckpt.restore(_state(seed=5), step=1)
  assert _bytes(restored) == _bytes(_step_state(1))
  ckpt.close()


def test_run_mismatch_is_not_taken_for_damage(run):
  # Guard: with a damaged latest, a run mismatch must still stop at once, not fall back.
  _truncate(run / "2")
  other = checkpoint.Checkpointer(str(run), identity={**_IDENTITY, "rank": 32})
  with pytest.raises(checkpoint.ResumeMismatchError, match="rank: saved 16, now 32"):
    other.restore(_state(seed=5))
  other.close()


def test_saving_after_a_fallback_sets_the_damaged_step_aside(run):
  _truncate(run / "2")
  ckpt = checkpoint.Checkpointer(str(run), identity=_IDENTITY)
  with pytest.warns(RuntimeWarning):
    state, _ = ckpt.restore(_state(seed=5))
  with pytest.warns(RuntimeWarning, match="aside"):
    ckpt.save(2, _step_state(2), data_state={"step": 2}, wait=True)
  assert (run / "2.corrupt" / "state").is_dir()  # kept for the user, not deleted
  restored, data_state = ckpt.restore(_state(seed=5))
  assert ckpt.restored_step == 2 and data_state == {"step": 2}
  assert _bytes(restored) == _bytes(_step_state(2))
  ckpt.close()


def test_checkpoints_without_checksums_still_restore(tmp_path):
  # Guard: a folder written before checksums were saved (the same three orbax items).
  state = _step_state(4)
  manager = ocp.CheckpointManager(str(tmp_path))
  manager.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": 4}),
      identity=ocp.args.JsonSave(_IDENTITY)))
  manager.wait_until_finished()
  manager.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), identity=_IDENTITY)
  restored, data_state = ckpt.restore(_state(seed=5))
  assert data_state == {"step": 4} and _bytes(restored) == _bytes(state)
  ckpt.close()


def test_sharded_state_round_trips(tmp_path):
  # Each sharded leaf is checksummed with an all-reduce: many of those in flight together
  # deadlock the CPU backend, so this also guards that they run one at a time.
  rows = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)),
                                    jax.sharding.PartitionSpec("d"))
  tree = lambda seed: jax.device_put(
      {f"w{i}": jax.random.normal(jax.random.key(100 * seed + i), (64, 16)) for i in range(64)},
      rows)
  ckpt = checkpoint.Checkpointer(str(tmp_path), identity={})
  ckpt.save(1, tree(1), data_state={}, wait=True)
  restored, _ = ckpt.restore(tree(0))
  assert _bytes(restored) == _bytes(tree(1)) and restored["w0"].sharding == rows
  ckpt.close()
