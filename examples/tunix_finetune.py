"""Fine-tune a tunix Llama 3 with FALQON, through tunix's own PeftTrainer.

Builds a tiny Llama 3 from tunix's model code, melds its attention einsums and MLP
Linears into FP8 ``[W; A]`` weights (``falqon_jax.nnx.meld``), and trains the ΔBuffers with
``falqon_jax.tunix.PeftTrainer``: tunix's trainer, whose jitted step also merges the top-k
delta rows into the FP8 weights. The task is synthetic: each sequence counts up from a
random token by a random stride (mod the vocabulary), so the next token follows from the
two before it, and the loss falls well below log(vocab) (a uniform guess) in the default
steps.

Random weights stand in for a checkpoint here; for a real one, build the model with
tunix's loader (``tunix.models.llama3.params.create_model_from_safe_tensors(folder,
config)``) and meld it the same way.

  pip install "falqon-jax[tunix]"
  python examples/tunix_finetune.py                # under a minute on 2 CPU cores
  python examples/tunix_finetune.py --checkpoint_dir /tmp/ckpt   # resumable, FP8 rows kept
"""

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

import falqon_jax
from falqon_jax import nnx as fnnx
from falqon_jax.tunix import PeftTrainer

TINY = dict(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=2,
            head_dim=16, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-5)


def tiny_llama3(seed: int = 0, **overrides):
  """A tunix ``Llama3`` with random weights (tunix zero-initialises the MLP, for a checkpoint
  to fill)."""
  from tunix.models.llama3 import model as llama3

  model = llama3.Llama3(llama3.ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))
  for n, (path, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, nnx.Param) and var.get_value().ndim >= 2:
      std = 1.0 if path[-1] == "input_embedding" else 0.2
      var.set_value(std * jax.random.normal(jax.random.key(seed * 7919 + n), var.shape))
  return model


def counting_batches(num_batches: int, batch_size: int, seq_len: int, vocab: int, seed: int):
  """tunix ``TrainingInput`` s of sequences ``start, start + s, start + 2s, ...`` (mod
  ``vocab``), strides ``s`` in 1..3; token 0 is left for padding."""
  from tunix.sft import peft_trainer

  rng = np.random.default_rng(seed)
  for _ in range(num_batches):
    start = rng.integers(1, vocab, (batch_size, 1))
    stride = rng.integers(1, 4, (batch_size, 1))
    tokens = 1 + (start - 1 + stride * np.arange(seq_len)) % (vocab - 1)
    yield peft_trainer.TrainingInput(input_tokens=tokens.astype(np.int32),
                                     input_mask=np.ones(tokens.shape, bool))


def model_inputs(x):
  """tunix's default loss wants positions and a causal mask next to the tokens."""
  from tunix.sft import utils

  pad_mask = x.input_tokens != 0
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": utils.build_positions_from_mask(pad_mask),
          "attention_mask": utils.make_causal_attn_mask(pad_mask)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--lr", type=float, default=5e-2)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=16)
  p.add_argument("--grad_accum", type=int, default=None, help="gradient accumulation steps")
  p.add_argument("--checkpoint_dir", default=None, help="tunix checkpoints (and resume) here")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  from tunix.sft import peft_trainer

  model = tiny_llama3(args.seed)
  report = fnnx.meld(model, rank=args.rank)
  print(report)
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=max(1, args.steps // 4), max_steps=args.steps,
      gradient_accumulation_steps=args.grad_accum,
      checkpoint_root_directory=args.checkpoint_dir, pbar_description=None)
  trainer = PeftTrainer(model, optax.adam(args.lr), config, options=falqon_jax.RECOMMENDED)
  trainer.with_gen_model_input_fn(model_inputs)
  micro = args.steps * (args.grad_accum or 1)
  train = counting_batches(micro, args.batch_size, args.seq_len, TINY["vocab_size"], args.seed)
  evals = list(counting_batches(2, args.batch_size, args.seq_len, TINY["vocab_size"], 10**6))
  start = time.perf_counter()
  trainer.train(train, evals)
  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  eval_losses = trainer.metrics_logger.get_metric_history("", "loss", "eval")
  summary = {
      "melded_layers": len(report.melded), "steps": trainer.train_steps,
      "merges": int(trainer.merge_state.count),
      "first_loss": float(losses[0]), "last_loss": float(losses[-1]),
      "first_eval_loss": float(eval_losses[0]), "last_eval_loss": float(eval_losses[-1]),
      "seconds": round(time.perf_counter() - start, 1),
  }
  print(summary)
  return summary


if __name__ == "__main__":
  main()
