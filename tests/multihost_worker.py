"""One process of the multi-host test (tests/test_multihost.py); not a test module.

  python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_FILE

Each process owns 4 / NUM_PROCESSES CPU devices, loads only its rows of each global batch
(falqon_jax.data.Batches with process_index), and trains with the jit data-parallel step
over the global mesh. It writes a hash of every FP8 weight and the losses, and the FP8
weights themselves to OUT_FILE.npz.
"""

import hashlib
import json
import os
import sys


def main():
  process_id, num_processes, port, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"

  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)

  import jax.numpy as jnp
  import numpy as np
  import optax

  from flax import nnx

  import falqon_jax
  from falqon_jax import data, models, train
  from falqon_jax import nnx as fnnx

  assert jax.device_count() == 4 and jax.process_count() == num_processes
  lm = models.CausalLM(models.tiny_config("llama", num_hidden_layers=1, vocab_size=272),
                       rngs=nnx.Rngs(0))
  fnnx.meld(lm, rank=16)
  model, params = models.split(lm)
  # SGD: after Adam's first step every |B_ij| is about lr, so row norms tie and the top-k
  # choice would follow the last bits in which one and two processes differ.
  tx = falqon_jax.proxy_update(optax.sgd(0.5), falqon_jax.REFERENCE, reset="merged", rounding="stochastic",
                               key=jax.random.key(1))
  dp = train.DataParallel()
  state = train.TrainState.create(params, tx)
  step = dp.compile(train.make_train_step(model, tx), state)
  state = dp.put_state(state)
  batches = data.Batches(data.synthetic_task(64, seed=0), batch_size=8, seed=0,
                         process_index=jax.process_index(), process_count=jax.process_count())
  losses = []
  for _ in range(3):
    local = {k: v for k, v in next(batches).items() if k != "segment_ids"}
    state, metrics = step(state, dp.put_batch(local))
    losses.append(float(metrics["loss"]))

  digest, weights = hashlib.sha256(), []
  for leaf in jax.tree_util.tree_leaves(state.params, is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel)):
    if isinstance(leaf, falqon_jax.MeldedKernel):
      shard = leaf.qweight.addressable_shards[0].data  # replicated: any shard is the whole
      weights.append(np.asarray(shard).view(np.uint8))
      digest.update(weights[-1].tobytes())
  np.savez(out_file + ".npz", *weights)
  with open(out_file, "w") as f:
    json.dump({"process": jax.process_index(), "qweight_sha256": digest.hexdigest(),
               "losses": losses}, f)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
