"""A causal LM as a pure function of its params: what training, eval and export take.

``split(model)`` separates a :class:`CausalLM` (melded or not) into a hashable
:class:`Functional` (its graph and config) and ``params``: a plain nested dict of arrays in
which every melded layer is one :class:`~falqon_jax.MeldedKernel` leaf, so
:func:`falqon_jax.proxy_update`, :func:`falqon_jax.apply_updates`, ``jax.jit`` shardings,
orbax checkpoints and the exporters all work on it as on any params tree.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from flax import nnx

from falqon_jax.models._config import ModelConfig
from falqon_jax.models._decoder import CausalLM, KVCache


@dataclasses.dataclass(frozen=True)
class Functional:
  """A :class:`CausalLM`'s graph without its values; hashable, so a jit static argument.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from falqon_jax import models
    >>> cfg = models.ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32,
    ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2})
    >>> model, params = models.split(models.CausalLM(cfg, rngs=nnx.Rngs(0)))
    >>> model.apply(params, jnp.zeros((1, 4), jnp.int32)).shape
    (1, 4, 32)
  """

  graphdef: nnx.GraphDef
  config: ModelConfig

  def merge(self, params) -> CausalLM:
    """The :class:`CausalLM` holding ``params`` (works under ``jax.jit``)."""
    return nnx.merge(self.graphdef, params)

  def apply(self, params, input_ids, attention_mask=None, positions=None, *,
            cache: Optional[KVCache] = None, segment_ids=None, remat: bool = False):
    """Float32 logits (and the new cache, when ``cache`` is given); see :class:`CausalLM`.

    ``remat=True`` recomputes each decoder layer in the backward pass, keeping only its
    output.
    """
    model = self.merge(params)
    model.remat = remat
    return model(input_ids, attention_mask=attention_mask, positions=positions, cache=cache,
                 segment_ids=segment_ids)

  def init_cache(self, params, batch: int, max_len: int) -> KVCache:
    """An empty :class:`KVCache` in the model's dtype."""
    return self.merge(params).init_cache(batch, max_len)


def split(model: CausalLM) -> tuple[Functional, dict]:
  """``(Functional, params)`` of a :class:`CausalLM`; melded layers are ``MeldedKernel``
  leaves of ``params``."""
  if not isinstance(model, CausalLM):
    raise TypeError(f"split needs a falqon_jax.models.CausalLM, got {type(model).__name__}")
  graphdef, state = nnx.split(model)
  return Functional(graphdef, model.config), nnx.to_pure_dict(state)
