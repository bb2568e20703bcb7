"""Flax NNX causal LMs that load HF checkpoints: Llama, Mistral, Qwen 2/3, Gemma 1/2/3, GPT-2.

``load(folder, rank=None)`` reads a local HF folder (config.json and safetensors,
single-file or sharded) into a :class:`CausalLM`, with neither torch nor transformers'
model classes, melding each projection as it is read when ``rank`` is given;
``model(input_ids, attention_mask=None, positions=None)`` gives float32 logits.
``split(model)`` turns it into a hashable :class:`Functional` and a params tree (melded
layers as ``MeldedKernel`` leaves): what ``falqon_jax.train``, ``falqon_jax.eval``,
``falqon_jax.export`` and checkpoints take.

One decoder serves every family: :class:`ModelConfig`, parsed from config.json in
transformers 5's style (``rope_parameters``) or the Hub's 4.x style (``rope_theta``,
``rope_scaling``, ``rope_local_base_freq``, ``sliding_window_pattern``), switches biases,
q/k norms, (1 + w) norms, embedding scaling, sandwich norms, soft-capping, sliding
windows per layer type and the RoPE variant (default, linear, dynamic, llama3, yarn; a
base per layer type for Gemma 3). Every projection is an ``nnx.Linear`` so that
:func:`falqon_jax.nnx.meld` melds it; attention is ``jax.nn.dot_product_attention``
except where Gemma 2 soft-caps the scores.

``CausalLM(cfg, remat=True)`` recomputes each decoder layer in the backward pass and keeps
only its output, named :data:`LAYER_OUTPUT` (the name ``falqon_jax.train``'s remat policy
saves too). Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``) as ``out_sharding`` metadata, kept by ``load``; under
``nnx.logical_axis_rules`` they give ``nnx.get_partition_spec`` / ``nnx.get_named_sharding``
for an FSDP or tensor-parallel mesh; after :func:`falqon_jax.nnx.meld`, use
``falqon_jax.nnx.get_partition_spec``, which shards each melded kernel's FP8 rows and delta
as the kernel it replaced.

Why a compact decoder rather than a maintained package's models: google-tunix (0.1.7,
the NNX model zoo closest to this need) has no Mistral, Gemma 2 or GPT-2 model, ignores
Llama 3's RoPE scaling, and builds its projections from its own einsum modules rather
than ``nnx.Linear``, so FALQON's melded layers cannot replace them without forking each
model. It also requires safetensors<0.8, transformers, tensorflow_datasets, grain, qwix
and more at install time, far beyond this library's pins. The decoder here is a few
hundred lines, checked against PyTorch reference logits for every family.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from falqon_jax import models
  >>> cfg = models.ModelConfig.from_hf({"model_type": "qwen3", "vocab_size": 32,
  ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
  ...     "num_attention_heads": 2, "head_dim": 16})
  >>> model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 5))).dtype
  dtype('float32')
"""

from falqon_jax.models._config import FAMILIES, ROPE_TYPES, ModelConfig, Rope, tiny_config
from falqon_jax.models._decoder import LAYER_OUTPUT, CausalLM, KVCache
from falqon_jax.models._functional import Functional, split
from falqon_jax.models._load import Loaded, hf_name, load, read_config

__all__ = [
    "CausalLM", "FAMILIES", "Functional", "KVCache", "LAYER_OUTPUT", "Loaded", "ModelConfig",
    "ROPE_TYPES", "Rope", "hf_name", "load", "read_config", "split", "tiny_config",
]
