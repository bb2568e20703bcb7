"""falqon_jax.tunix: a melded tunix Llama 3 trained by tunix's PeftTrainer (skipped without
google-tunix), and the example that does it."""

import importlib.util
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from falqon_jax import nnx as fnnx

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "tunix_finetune.py"
STEPS = 6


def test_missing_tunix_is_a_one_line_error(monkeypatch):
  import falqon_jax.tunix as ftunix

  monkeypatch.setitem(sys.modules, "tunix", None)  # what an environment without it sees
  ftunix._trainer_class.cache_clear()
  try:
    with pytest.raises(ImportError, match=r'pip install "falqon-jax\[tunix\]"'):
      ftunix.PeftTrainer  # noqa: B018
  finally:
    ftunix._trainer_class.cache_clear()


@pytest.fixture(scope="module")
def example():
  # tunix's model modules switch flax's eager variable sharding off when imported.
  shard = flax.config.flax_always_shard_variable
  pytest.importorskip("tunix", reason='needs google-tunix: pip install "falqon-jax[tunix]"')
  spec = importlib.util.spec_from_file_location("tunix_finetune", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  yield module
  flax.config.update("flax_always_shard_variable", shard)


def _bytes(tree) -> list:
  key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return [np.asarray(jax.random.key_data(x) if key(x) else x).tobytes()
          for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
  """A melded tiny Llama 3 trained ``STEPS`` steps with checkpoints."""
  from tunix.sft import peft_trainer

  from falqon_jax.tunix import PeftTrainer

  model = example.tiny_llama3(seed=0)
  report = fnnx.meld(model, rank=8)
  frozen = nnx.All(nnx.Param, nnx.Not(fnnx.Melded))
  before = {"frozen": _bytes(nnx.state(model, frozen)),
            "kernels": {p: np.asarray(k.qweight).copy() for p, k in fnnx.kernels(model).items()}}
  folder = str(tmp_path_factory.mktemp("ckpt"))
  config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=STEPS,
                                       checkpoint_root_directory=folder, pbar_description=None)
  trainer = PeftTrainer(model, optax.adam(5e-2), config).with_gen_model_input_fn(
      example.model_inputs)
  # One batch again and again: its loss must fall.
  batch = next(example.counting_batches(1, 8, 16, example.TINY["vocab_size"], 0))
  trainer.train([batch] * STEPS)
  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  return dict(model=model, report=report, before=before, folder=folder, config=config,
              trainer=trainer, losses=np.asarray(losses), frozen=frozen)


@pytest.mark.slow
def test_meld_covers_every_attention_and_mlp_projection(run):
  model, report = run["model"], run["report"]
  layers = model.layers
  assert len(report.melded) == 7 * len(layers)
  for layer in layers:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      assert isinstance(getattr(layer.attn, name), fnnx.MeldedEinsum), name
    for name in ("gate_proj", "up_proj", "down_proj"):
      assert isinstance(getattr(layer.mlp, name), fnnx.MeldedLinear), name
  assert [s.path for s in report.skipped] == ["lm_head/kernel"]  # excluded by default
  # q/k/v and gate/up keep the shared scale vLLM's fused GEMMs need (RECOMMENDED).
  ks = fnnx.kernels(model)
  assert len({float(ks[f"layers/0/attn/{n}_proj"].scale) for n in "qkv"}) == 1
  assert len({float(ks[f"layers/0/mlp/{n}_proj"].scale) for n in ("gate", "up")}) == 1
  # tunix's attention reads head counts from the projection's kernel shape.
  assert layers[0].attn.head_dim == 16 and layers[0].attn.num_kv_heads == 1


@pytest.mark.slow
def test_peft_trainer_trains_the_deltas_and_merges_every_step(run):
  model, trainer, losses = run["model"], run["trainer"], run["losses"]
  assert trainer.train_steps == STEPS and len(losses) == STEPS
  assert losses[-1] < losses[0] - 0.1, losses
  assert int(trainer.merge_state.count) == STEPS
  kernels = fnnx.kernels(model)
  for path in ("layers/0/attn/q_proj", "layers/1/mlp/down_proj"):
    assert not np.array_equal(np.asarray(kernels[path].qweight), run["before"]["kernels"][path])
    # RECOMMENDED merges every row (top_k="all") and resets what it merged.
    assert not np.any(np.asarray(kernels[path].delta))
  assert _bytes(nnx.state(model, run["frozen"])) == run["before"]["frozen"]


@pytest.mark.slow
def test_checkpoint_restores_the_fp8_rows_and_the_merge_state(run, example):
  from falqon_jax.tunix import PeftTrainer

  fresh = example.tiny_llama3(seed=0)
  fnnx.meld(fresh, rank=8)
  restored = PeftTrainer(fresh, optax.adam(5e-2), run["config"])
  assert restored.train_steps == STEPS
  assert _bytes(fnnx.kernels(fresh)) == _bytes(fnnx.kernels(run["model"]))
  assert _bytes(restored.merge_state) == _bytes(run["trainer"].merge_state)
  restored.close()


def test_unmelded_model_is_refused(example):
  from tunix.sft import peft_trainer

  from falqon_jax.tunix import PeftTrainer

  config = peft_trainer.TrainingConfig(eval_every_n_steps=1, max_steps=1)
  model = example.tiny_llama3()
  with pytest.raises(ValueError, match=r"call falqon_jax.nnx.meld\(model, rank\)"):
    PeftTrainer(model, optax.adam(1e-3), config)
  # A LoRA param FALQON does not train (qwix's LoRA applied too) would silently stay frozen.
  fnnx.meld(model, rank=8, targets=r"mlp")
  model.layers[0].mlp.extra = nnx.LoRAParam(jnp.zeros((4,)))
  with pytest.raises(ValueError, match=r"LoRA params besides melded layers \(layers/0/mlp"):
    PeftTrainer(model, optax.adam(1e-3), config)


@pytest.mark.slow
def test_example_with_gradient_accumulation_merges_once_per_optimizer_step(example):
  summary = example.main(["--steps", "3", "--grad_accum", "2", "--batch_size", "4"])
  assert summary["melded_layers"] == 14
  assert summary["steps"] == 3 and summary["merges"] == 3
  assert summary["last_eval_loss"] < summary["first_eval_loss"]
