"""Loads a local HF folder (config.json + safetensors, single or sharded) into a CausalLM."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from falqon_jax.errors import UserInputError
from falqon_jax.hf import _safetensors as st
from falqon_jax.models._config import ModelConfig
from falqon_jax.models._decoder import CausalLM

# Buffers some checkpoints carry that hold no weights (causal masks, RoPE tables).
_IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
_GPT2_NAMES = {
    "embed_tokens": "wte", "embed_positions": "wpe", "layers": "h", "self_attn": "attn",
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "norm": "ln_f",
}


def read_config(folder: str) -> ModelConfig:
  """The :class:`ModelConfig` of a local HF folder's config.json."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise UserInputError(f"{folder}: no config.json; pass a local HF model folder")
  return ModelConfig.from_hf(st.read_json(path), path)


def _weight_files(folder: str) -> list[str]:
  files = st.weight_files(folder)
  if not files:
    raise UserInputError(f"{folder}: no *.safetensors weights; save the model with safetensors")
  return files


def hf_name(cfg: ModelConfig, path: tuple) -> tuple[str, bool]:
  """(HF tensor name, stored transposed) of the model variable at ``path``.

  GPT-2 names are given without the ``transformer.`` prefix (both forms are on the Hub).
  """
  *mods, leaf = (str(p) for p in path)
  gpt2 = cfg.model_type == "gpt2"
  if gpt2:
    mods = [_GPT2_NAMES.get(m, m) for m in mods]
  elif mods != ["lm_head"]:
    mods = ["model", *mods]
  # nnx.Linear keeps (in, out); torch Linear stores (out, in), GPT-2's Conv1D (in, out).
  transposed = leaf == "kernel" and not gpt2
  name = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join([*mods, name]), transposed


def load(folder: str, dtype=jnp.float32) -> tuple[CausalLM, ModelConfig]:
  """Loads a local HF causal-LM folder: ``(model, config)``, without torch or transformers.

  Weights come from ``model.safetensors`` or the shards a ``model.safetensors.index.json``
  lists, read one tensor at a time and cast to ``dtype``. A tensor whose shape does not
  match config.json, a missing tensor or an unexpected one is a one-line error. Values are
  set into the model's variables, so their logical axis names (``out_sharding``) stay.
  """
  cfg = read_config(folder)
  model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  want = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      name, transposed = hf_name(cfg, path)
      want[name] = (var, transposed)
  filled = set()
  for file in _weight_files(folder):
    for name, arr in st.iter_tensors(file):
      key = name.removeprefix("transformer.") if cfg.model_type == "gpt2" else name
      if key not in want:
        if key.endswith(_IGNORED) or (cfg.tie_embeddings and key == "lm_head.weight"):
          continue
        raise UserInputError(
            f"{file}: unexpected tensor {name!r} for this config.json; the checkpoint and"
            " config do not match"
        )
      var, transposed = want[key]
      shape = tuple(var.get_value().shape)
      hf_shape = shape[::-1] if transposed else shape
      if tuple(arr.shape) != hf_shape:
        raise UserInputError(
            f"{file}: tensor {name!r} has shape {tuple(arr.shape)}, config.json implies"
            f" {hf_shape}; the checkpoint and config do not match"
        )
      value = np.asarray(arr)
      var.set_value(jnp.asarray(value.T if transposed else value, dtype=dtype))
      filled.add(key)
  missing = sorted(set(want) - filled)
  if missing:
    raise UserInputError(
        f"{folder}: checkpoint has no tensor {missing[0]!r} ({len(missing)} missing); the"
        " checkpoint and config do not match"
    )
  return model, cfg
