"""Quick start: meld a small network into FP8 and fine-tune it with FALQON.

A "pretrained" MLP (teacher A) must adapt to a new task (teacher B: the same network
with a low-rank change in every layer, the kind of shift LoRA is for). We meld A's
dense kernels into FP8 ``[W; A]`` weights, then train only the ΔBuffers with
``proxy_update(adam)``: each step merges the top-k rows into the FP8 backbone.

It trains twice at the reference's learning rate (2e-3):
  * reference semantics (k = rank, ΔBuffer cleared every step, nearest rounding): a
    per-step update below half an e4m3 ULP is rounded away, so little is learned;
  * reset="merged" + rounding="stochastic": unmerged rows keep accumulating and small
    updates survive in expectation, so the loss falls.

  python examples/quickstart.py            # ~40 s on 2 CPU cores (FP8 is emulated on CPU)
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import falqon_jax


def init_mlp(key, sizes, scale=1.0):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k1, k2 = jax.random.split(key, 3)
    params[f"dense_{i}"] = {
        "kernel": scale * jax.random.normal(k1, (fan_in, fan_out)) / jnp.sqrt(fan_in),
        "bias": 0.1 * jax.random.normal(k2, (fan_out,)),
    }
  return params


def mlp(params, x):
  """Runs on plain or melded params alike (falqon_jax.dense dispatches)."""
  names = sorted(params)
  for i, name in enumerate(names):
    x = falqon_jax.dense(x, params[name]["kernel"], params[name]["bias"])
    if i < len(names) - 1:
      x = jax.nn.gelu(x)
  return x


def low_rank_shift(key, params, rank, strength):
  """Teacher B: every kernel gets a random rank-`rank` change of relative size `strength`."""
  out = {}
  for i, (name, layer) in enumerate(sorted(params.items())):
    k = layer["kernel"]
    ku, kv = jax.random.split(jax.random.fold_in(key, i))
    u = jax.random.normal(ku, (k.shape[0], rank))
    v = jax.random.normal(kv, (rank, k.shape[1]))
    change = u @ v
    change *= strength * jnp.linalg.norm(k) / jnp.linalg.norm(change)
    out[name] = {"kernel": k + change, "bias": layer["bias"]}
  return out


def run(steps=300, width=256, rank=16, batch=256, lr=2e-3, seed=0, log_every=100,
        verbose=True, **proxy_options):
  """Fine-tunes once; returns (held-out loss before, after). ``proxy_options`` go to
  :func:`falqon_jax.proxy_update` (top_k, reset, rounding, key, ...)."""
  say = print if verbose else (lambda *a, **k: None)
  key_a, key_b, key_data = jax.random.split(jax.random.key(seed), 3)
  sizes = [64, width, width, 64]
  teacher_a = init_mlp(key_a, sizes)
  teacher_b = low_rank_shift(key_b, teacher_a, rank=4, strength=0.3)

  def batch_at(step):
    x = jax.random.normal(jax.random.fold_in(key_data, step), (batch, sizes[0]))
    return x.astype(jnp.bfloat16), mlp(teacher_b, x)  # bf16 compute, f32 targets

  params, report = falqon_jax.meld(teacher_a, rank=rank)
  say(str(report).splitlines()[0])
  tx = falqon_jax.proxy_update(
      optax.chain(optax.clip_by_global_norm(3.0), optax.adam(lr)), falqon_jax.REFERENCE, **proxy_options)
  state = tx.init(params)

  def loss_fn(params, x, y):
    return jnp.mean((mlp(params, x).astype(jnp.float32) - y) ** 2)

  @jax.jit
  def eval_loss(params):
    return jnp.mean(jnp.stack([loss_fn(params, *batch_at(10**6 + i)) for i in range(4)]))

  @jax.jit
  def train_step(params, state, step):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch_at(step))
    updates, state = tx.update(grads, state, params)
    return falqon_jax.apply_updates(params, updates), state, loss

  before = float(eval_loss(params))
  shown = {k: v for k, v in proxy_options.items() if k != "key"}
  say(f"held-out loss before fine-tuning: {before:.5f}  ({shown or 'reference semantics'})")
  start = time.perf_counter()
  for step in range(steps):
    params, state, loss = train_step(params, state, step)
    if log_every and (step + 1) % log_every == 0:
      say(f"step {step + 1:4d}  train loss {float(loss):.5f}")
  after = float(eval_loss(params))
  seconds = time.perf_counter() - start
  say(f"held-out loss after {steps} FALQON steps: {after:.5f}"
      f" ({100 * (1 - after / before):.1f}% lower; {seconds:.1f} s,"
      f" skipped steps: {int(state.skipped)})")
  return before, after


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  common = dict(steps=args.steps, rank=args.rank, lr=args.lr, seed=args.seed)
  ref = run(**common)
  print()
  fixed = run(**common, reset="merged", rounding="stochastic", key=jax.random.key(args.seed))
  print(f"\nreference semantics: {ref[0]:.5f} -> {ref[1]:.5f};"
        f" reset='merged' + stochastic rounding: {fixed[0]:.5f} -> {fixed[1]:.5f}")


if __name__ == "__main__":
  main()
