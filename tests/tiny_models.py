"""Tiny random models for tests: ``(Functional, params)`` of a falqon_jax.models.CausalLM."""

from flax import nnx

from falqon_jax import models
from falqon_jax import nnx as fnnx


def functional(model_type="llama", *, rank=None, seed=0, **hf_overrides):
  """A tiny ``model_type`` model (see ``models.tiny_config``), melded with ``rank`` if
  given: ``(model, params)``."""
  lm = models.CausalLM(models.tiny_config(model_type, **hf_overrides), rngs=nnx.Rngs(seed))
  if rank is not None:
    fnnx.meld(lm, rank=rank)
  return models.split(lm)
