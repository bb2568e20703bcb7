"""Hugging Face integration: load local HF folders into transformers Flax models, meld.

Needs the ``[hf]`` extra (plain ``transformers==4.57.6``, the last release with Flax
models); torch is never imported. Supported ``model_type`` s: ``gemma``, ``gpt2``,
``llama``, ``mistral``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import falqon_jax.hf as fh
  >>> from falqon_jax import linen as fl
  >>> model = fh.build_model(fh.tiny_config("llama"))
  >>> params = model.init_weights(jax.random.key(0), (1, 8))
  >>> params, report = fh.meld_params(model, params, rank=16)
  >>> with fl.melded():
  ...   logits = model(jnp.zeros((1, 8), jnp.int32), params=params).logits
  >>> logits.shape
  (1, 8, 256)
"""

from falqon_jax.hf._arch import ARCHITECTURES, SUPPORTED, tiny_config
from falqon_jax.hf._load import LoadedModel, build_model, load, meld_params, read_config

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED",
    "LoadedModel",
    "build_model",
    "load",
    "meld_params",
    "read_config",
    "tiny_config",
]
