"""Supported HF Flax architectures and the PyTorch <-> Flax tensor-name mapping."""

from __future__ import annotations

import re
from typing import Any, Optional

import jax

from falqon_jax.errors import UserInputError

ARCHITECTURES = {
    "llama": "FlaxLlamaForCausalLM",
    "mistral": "FlaxMistralForCausalLM",
    "gemma": "FlaxGemmaForCausalLM",
    "gpt2": "FlaxGPT2LMHeadModel",
}
"""``config.json`` ``model_type`` -> transformers Flax class (transformers 4.57.6)."""

SUPPORTED = tuple(sorted(ARCHITECTURES))

# Checkpoint tensors that are buffers, not parameters: skipped without complaint.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")

_LEAF_TO_PT = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def check_model_type(model_type: Optional[str], where: str) -> str:
  if model_type not in ARCHITECTURES:
    raise UserInputError(
        f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
    )
  return model_type


def flax_class(model_type: str):
  import transformers  # deferred: transformers is the optional [hf] extra

  return getattr(transformers, ARCHITECTURES[check_model_type(model_type, "config")])


def transposed_pattern(model_type: str) -> Optional[str]:
  """Kernels stored ``(out, in)`` in the Flax model (GPT-2's FlaxConv1D), else None."""
  if model_type == "gpt2":
    from falqon_jax.linen import GPT2_CONV1D

    return GPT2_CONV1D
  return None


def stored_transposed(model_type: str, path: tuple[str, ...]) -> bool:
  """Whether the kernel at ``path`` is a GPT-2 ``Conv1D`` one: HF stores it ``(in, out)``."""
  pattern = transposed_pattern(model_type)
  return pattern is not None and re.search(pattern, "/".join(path)) is not None


def pt_name(path: tuple[str, ...]) -> str:
  """Flax param path -> HF PyTorch tensor name (``model/x/kernel`` -> ``model.x.weight``)."""
  *mods, leaf = path
  return ".".join([*mods, _LEAF_TO_PT.get(leaf, leaf)])


def needs_transpose(path: tuple[str, ...], ndim: int) -> bool:
  """PyTorch Linear stores (out, in), Flax Dense (in, out); GPT-2 Conv1D the reverse."""
  return path[-1] == "kernel" and ndim == 2


def param_paths(shapes) -> dict[tuple[str, ...], Any]:
  """``{path tuple: ShapeDtypeStruct}`` for a nested params tree."""
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(str(k.key) for k in kp): leaf for kp, leaf in flat}


def tiny_config(model_type: str, **overrides):
  """A tiny random-init config (hidden 64, 2 layers, vocab 256) for tests and examples."""
  import transformers

  check_model_type(model_type, "tiny_config")
  base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, num_key_value_heads=2, max_position_embeddings=128)
  if model_type == "gpt2":
    base = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
  if model_type == "gemma":
    base.update(head_dim=16, hidden_activation="gelu_pytorch_tanh")
  base.update(overrides)
  return transformers.AutoConfig.for_model(model_type, **base)
