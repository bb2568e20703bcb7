"""Training steps: loss convention, data parallelism (jit over a mesh, pmap, FSDP)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

import falqon_jax
from falqon_jax import models, train
from falqon_jax import nnx as fnnx
import oracle

STEPS, BATCH, SEQ = 2, 8, 16


@pytest.fixture(scope="module")
def setup():
  lm = models.CausalLM(models.tiny_config("llama", num_hidden_layers=1), rngs=nnx.Rngs(0))
  fnnx.meld(lm, rank=16, options=falqon_jax.REFERENCE)
  model, params = models.split(lm)
  # SGD: after Adam's first step every |B_ij| is about lr, so row norms tie and the
  # top-k choice would follow last-bit summation differences between the paths.
  tx = falqon_jax.proxy_update(optax.sgd(0.5), falqon_jax.REFERENCE, top_k=4, reset="merged")
  batches = [train.example_batch(jax.random.key(10 + i), batch_size=BATCH, seq_len=SEQ,
                                 vocab=256) for i in range(STEPS)]
  return model, params, tx, batches


def _fresh_state(params, tx):
  return train.TrainState.create(jax.tree_util.tree_map(jnp.copy, params), tx)


def _run_jit(setup, devices, fsdp=False):
  model, params, tx, batches = setup
  dp = train.DataParallel(devices, fsdp=fsdp)
  state = _fresh_state(params, tx)
  step = dp.compile(train.make_train_step(model, tx), state)
  state = dp.put_state(state)
  metrics = []
  for b in batches:
    state, m = step(state, dp.put_batch(b))
    metrics.append(m)
  return state, metrics


def _qweights(params):
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel))
  return [np.asarray(x.qweight).view(np.uint8) for x in leaves if isinstance(x, falqon_jax.MeldedKernel)]


@pytest.fixture(scope="module")
def one_device(setup):
  return _run_jit(setup, jax.devices()[:1])


def test_loss_is_token_mean_next_token_nll_over_the_mask():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  batch = {"input_ids": jnp.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]]) % 7,
           "loss_mask": jnp.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], bool)}
  total, n = train.next_token_nll(logits, batch)
  logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
  want = sum(-logp[b, t - 1, int(batch["input_ids"][b, t])]
             for b in range(2) for t in range(1, 5) if batch["loss_mask"][b, t])
  assert float(n) == 6.0
  np.testing.assert_allclose(float(total), want, rtol=1e-6)


def test_jit_over_four_devices_matches_one(setup, one_device):
  assert len(jax.devices()) == 4
  state4, m4 = _run_jit(setup, None)
  state1, m1 = one_device
  # Four devices split the gradient sums another way: a last-bit difference can move a
  # merged element across an e4m3 rounding boundary, one step.
  for a, b in zip(_qweights(state4.params), _qweights(state1.params)):
    oracle.assert_fp8_close(a.view(jnp.float8_e4m3fn), b.view(jnp.float8_e4m3fn), 0.01)
  # The second step's loss: rounding, plus the few weights a flip moved.
  for a, b in zip(m4, m1):
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
  q = jax.tree_util.tree_leaves(state4.params, is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel))
  mk = next(x for x in q if isinstance(x, falqon_jax.MeldedKernel))
  assert mk.qweight.sharding.is_fully_replicated
  # Every device holds the same bytes.
  shards = [np.asarray(s.data).view(np.uint8) for s in mk.qweight.addressable_shards]
  assert all(np.array_equal(shards[0], s) for s in shards[1:])


def test_pmap_replicas_identical_and_close_to_one_device(setup, one_device):
  model, params, tx, batches = setup
  state = train.replicate(_fresh_state(params, tx))
  step = jax.pmap(train.pmap_train_step(model, tx), axis_name="data")
  first = None
  for b in batches:
    state, metrics = step(state, train.split_batch(b, 4))
    first = metrics if first is None else first
  state1, m1 = one_device
  changed = total = 0
  for stacked, single in zip(_qweights(state.params), _qweights(state1.params)):
    assert all(np.array_equal(stacked[0], stacked[i]) for i in range(1, 4))
    changed += int(np.sum(stacked[0] != single))
    total += single.size
    # Close in value: psum-ordered sums can flip a near-tie, nothing more.
    a = stacked[0].view(jnp.float8_e4m3fn).astype(np.float64)
    b = single.view(jnp.float8_e4m3fn).astype(np.float64)
    assert np.linalg.norm(a - b) <= 0.01 * np.linalg.norm(b)
  assert changed <= 0.01 * total
  # Under pmap each device scales its own activations (per-device amax), so the first
  # step's loss (same weights) is close to, not equal to, the global-amax jit run: every
  # activation re-rounds on another e4m3 grid (~4% RMS per element), which reaches each
  # logit averaged over the hidden dim (~0.5%) and the mean loss averaged again over the
  # targets: a few 1e-3 at most. A wrong psum or scale would be off by O(1).
  np.testing.assert_allclose(np.asarray(first["loss"]), float(m1[0]["loss"]), rtol=5e-3)


def test_fsdp_shards_rows_and_matches_replicated(setup, one_device):
  state, _ = _run_jit(setup, None, fsdp=True)
  q = [x for x in jax.tree_util.tree_leaves(state.params, is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel))
       if isinstance(x, falqon_jax.MeldedKernel)]
  assert q[0].qweight.sharding.spec == jax.sharding.PartitionSpec("data", None)
  assert not q[0].qweight.sharding.is_fully_replicated
  changed = sum(int(np.sum(a != b)) for a, b in zip(_qweights(state.params), _qweights(one_device[0].params)))
  assert changed <= 0.01 * sum(a.size for a in _qweights(state.params))


def test_batch_not_divisible_by_devices():
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 devices"):
    train.DataParallel().check_batch_size(6)


def test_remat_saves_only_block_outputs_and_gives_the_same_step(setup):
  from jax._src.ad_checkpoint import saved_residuals

  model, params, tx, batches = setup
  outs = []
  for remat in (False, True):
    step = jax.jit(train.make_train_step(model, tx, remat=remat))
    state, metrics = step(_fresh_state(params, tx), batches[0])
    outs.append((_qweights(state.params), float(metrics["loss"])))
  assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)
  # Remat recomputes in another program: a gradient's last bits can flip an e4m3 rounding.
  for a, b in zip(outs[0][0], outs[1][0]):
    oracle.assert_fp8_close(b.view(jnp.float8_e4m3fn), a.view(jnp.float8_e4m3fn))
  # With remat, the only activations kept are the blocks' outputs: (B, T, hidden).
  loss = train.make_loss_fn(model, remat=True)
  saved = [aval for aval, src in saved_residuals(lambda p: loss(p, batches[0])[0], params)
           if "argument" not in src]
  activations = [a.shape for a in saved if a.shape[:2] == (BATCH, SEQ) and a.ndim == 3]
  assert activations == [(BATCH, SEQ, 64)]  # one block output for the one layer
  # The rest is small: integer masks/positions and the RoPE table.
  assert all(a.size <= 128 * 32 for a in saved if a.shape[:2] != (BATCH, SEQ) or a.ndim != 3)
