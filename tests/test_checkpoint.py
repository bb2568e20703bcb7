import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import falqon_jax
from falqon_jax import checkpoint, train


def _state(seed=0):
  params = {"w": {"kernel": jax.random.normal(jax.random.key(seed), (32, 48))}, "b": jnp.ones(3)}
  params, _ = falqon_jax.meld(params, rank=16)
  tx = falqon_jax.proxy_update(optax.adam(1e-2), rounding="stochastic", key=jax.random.key(1))
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
