"""The shared decoder: one NNX causal LM whose ``ModelConfig`` switches cover every family.

Module and attribute names follow the HF checkpoints' parameter names (``q_proj``,
``input_layernorm``, GPT-2's ``c_attn``...), so loading maps names mechanically and
:func:`falqon_jax.nnx.meld` paths read like the HF ones. Every projection is an
``nnx.Linear``, so ``meld`` swaps each for a ``MeldedLinear``.

Every parameter carries logical axis names as ``out_sharding`` metadata (not eagerly
applied, so a model builds without a mesh): ``vocab``, ``embed`` (the hidden size),
``heads`` (query heads x head_dim), ``kv_heads`` (key/value heads x head_dim), ``mlp``
(the intermediate size) and ``None`` for axes no mesh should split (positions, a q/k
norm's head_dim). Under ``nnx.logical_axis_rules(rules)``, ``nnx.get_partition_spec``
maps them to mesh axes for FSDP or tensor parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
from flax import nnx

from falqon_jax.errors import UserInputError
from falqon_jax.models._config import FULL, SLIDING, ModelConfig, Rope, inv_freq

_F32 = jnp.float32
# Name of each decoder layer's output (the residual stream): the only activation a remat
# policy needs to keep, since everything inside a layer, melded dense included, can be
# recomputed from it. Same name as falqon_jax.train's, so one policy serves both.
LAYER_OUTPUT = "falqon_layer_output"


def _axes(*names) -> dict:
  # Logical names only; applying them needs a mesh, so no eager sharding at creation.
  return {"out_sharding": names, "eager_sharding": False}


def _linear(d_in: int, d_out: int, axes: tuple, use_bias: bool, dtype, rngs: nnx.Rngs):
  """An ``nnx.Linear`` whose kernel is named ``axes`` (in, out) and its bias ``axes[1]``."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=dtype,
                    kernel_metadata=_axes(*axes), bias_metadata=_axes(axes[1]), rngs=rngs)


def _neg(dtype) -> float:
  # Finite, so a query whose keys are all masked (a pad query in a sliding-window layer)
  # gets a uniform row instead of NaN; matches jax.nn.dot_product_attention's own value.
  return -0.7 * float(jnp.finfo(dtype).max)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis; ``offset`` scales by ``(1 + w)`` as Gemma does."""

  def __init__(self, dim: int, eps: float, offset: bool, dtype, axis: Optional[str] = "embed"):
    self.weight = nnx.Param(jnp.zeros(dim, dtype) if offset else jnp.ones(dim, dtype),
                            **_axes(axis))
    self.eps = eps
    self.offset = offset

  def __call__(self, x):
    xf = x.astype(_F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    w = self.weight[...]
    if self.offset:  # Gemma multiplies in float32, then casts
      return (y * (1.0 + w.astype(_F32))).astype(x.dtype)
    return w * y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias (GPT-2), statistics in float32."""

  def __init__(self, dim: int, eps: float, dtype, axis: Optional[str] = "embed"):
    self.weight = nnx.Param(jnp.ones(dim, dtype), **_axes(axis))
    self.bias = nnx.Param(jnp.zeros(dim, dtype), **_axes(axis))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(_F32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(_F32) + self.bias[...].astype(_F32)).astype(x.dtype)


def _norm(cfg: ModelConfig, dim: int, dtype, axis: Optional[str] = "embed"):
  if cfg.layer_norm:
    return LayerNorm(dim, cfg.norm_eps, dtype, axis)
  return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset, dtype, axis)


def _act(name: str, x):
  if name == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=name == "gelu_tanh")


def _rotate(x, cos, sin):
  """RoPE on (B, T, N, H) with the two-halves layout HF uses (``rotate_half``)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_tables(rope: Rope, head_dim: int, max_pos: int, positions):
  """(cos, sin), each (B, T, head_dim/2) float32, for integer ``positions`` (B, T)."""
  if rope.rope_type == "dynamic":
    # NTK-aware base from the current length (transformers grows it statefully across
    # calls; here it depends on this call's positions only).
    seq = jnp.maximum(jnp.max(positions).astype(_F32) + 1, max_pos)
    base = rope.theta * ((rope.factor * seq / max_pos) - (rope.factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    exps = jnp.arange(0, head_dim, 2, dtype=_F32) / head_dim
    inv, att = 1.0 / (base**exps), 1.0
  else:
    inv, att = inv_freq(rope, head_dim, max_pos)
    inv = jnp.asarray(inv)
  freqs = positions.astype(_F32)[..., None] * inv
  return jnp.cos(freqs) * att, jnp.sin(freqs) * att


ATTENTION = ("xla", "cudnn")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["lengths"],
                   meta_fields=["window", "implementation"])
@dataclasses.dataclass(frozen=True)
class CausalSpec:
  """A causal mask given by its structure instead of as a (B, 1, T, S) array: right-padded
  rows of ``lengths`` valid tokens, an optional sliding ``window``. The form cuDNN's flash
  attention takes (it builds no mask in memory)."""

  lengths: jax.Array  # (B,) int32
  window: Optional[int]
  implementation: str


def attend(q, k, v, mask, scale: float, softcap: Optional[float] = None):
  """Attention on (B, T, N, H) queries and (B, S, K, H) keys/values (GQA).

  ``mask`` is a boolean array broadcasting to (B, 1, T, S), or a :class:`CausalSpec`.
  Without soft-capping this is ``jax.nn.dot_product_attention``: with an array mask on
  its XLA implementation, with a spec as ``is_causal`` plus sequence lengths and a local
  window on the spec's implementation (``"cudnn"``: flash attention on NVIDIA GPUs). Its
  signature has no soft-cap, so Gemma 2's capped scores take an explicit einsum path.
  """
  if isinstance(mask, CausalSpec):
    if softcap is None:
      window = None if mask.window is None else (mask.window - 1, 0)
      return jax.nn.dot_product_attention(
          q, k, v, scale=scale, is_causal=True, query_seq_lengths=mask.lengths,
          key_value_seq_lengths=mask.lengths, local_window_size=window,
          implementation=mask.implementation)
    mask = _spec_mask(mask, q.shape[1])
  if softcap is None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=_F32) * scale
  logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, :, None], logits, _neg(_F32))
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


def _spec_mask(spec: CausalSpec, t: int):
  """The (B, 1, T, T) boolean mask a :class:`CausalSpec` stands for."""
  idx = jnp.arange(t)
  mask = (idx[None, :] <= idx[:, None])[None] & (idx < spec.lengths[:, None])[:, None, :]
  if spec.window is not None:
    mask &= (idx[None, :] > idx[:, None] - spec.window)[None]
  return mask[:, None]


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, for generation (a pytree).

  ``k`` and ``v`` hold one (B, max_len, K, H) array per layer; ``valid`` (B, max_len)
  marks filled, non-pad slots; ``index`` is the next free slot. Make one with
  :meth:`CausalLM.init_cache`.
  """

  k: tuple
  v: tuple
  valid: jax.Array
  index: jax.Array


class Attention(nnx.Module):
  """Self-attention with separate q/k/v/o projections (GPT-2: fused ``c_attn``)."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    lin = functools.partial(_linear, dtype=dtype, rngs=rngs)
    d, h = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
    self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
    self.fused = cfg.model_type == "gpt2"
    if self.fused:
      self.c_attn = lin(d, 3 * d, ("embed", "heads"), True)
      self.c_proj = lin(d, d, ("heads", "embed"), True)
    else:
      self.q_proj = lin(d, cfg.num_heads * h, ("embed", "heads"), cfg.qkv_bias)
      self.k_proj = lin(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), cfg.qkv_bias)
      self.v_proj = lin(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), cfg.qkv_bias)
      self.o_proj = lin(cfg.num_heads * h, d, ("heads", "embed"), cfg.o_bias)
    self.q_norm = _norm(cfg, h, dtype, None) if cfg.qk_norm else None
    self.k_norm = _norm(cfg, h, dtype, None) if cfg.qk_norm else None

  def __call__(self, x, rope, mask, kv=None, index=None):
    """Returns the output and, with a layer cache ``kv``, the updated cache."""
    b, t, _ = x.shape
    if self.fused:
      q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    else:  # one input for q, k and v: a melded model quantizes it once (XLA CSE)
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = _rotate(q, *rope), _rotate(k, *rope)
    if kv is not None:
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
      kv = (k, v)
    out = attend(q, k, v, mask, self.scale, self.softcap).reshape(b, t, -1)
    return (self.c_proj(out) if self.fused else self.o_proj(out)), kv


class MLP(nnx.Module):
  """Gated MLP (gate/up/down) or GPT-2's plain one (c_fc/c_proj)."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    lin = functools.partial(_linear, dtype=dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.act, self.gated = cfg.act, cfg.gated_mlp
    if self.gated:
      self.gate_proj = lin(d, f, ("embed", "mlp"), cfg.mlp_bias)
      self.up_proj = lin(d, f, ("embed", "mlp"), cfg.mlp_bias)
      self.down_proj = lin(f, d, ("mlp", "embed"), cfg.mlp_bias)
    else:
      self.c_fc = lin(d, f, ("embed", "mlp"), cfg.mlp_bias)
      self.c_proj = lin(f, d, ("mlp", "embed"), cfg.mlp_bias)

  def __call__(self, x):
    if self.gated:  # gate and up share their input, like q/k/v
      return self.down_proj(_act(self.act, self.gate_proj(x)) * self.up_proj(x))
    return self.c_proj(_act(self.act, self.c_fc(x)))


class DecoderLayer(nnx.Module):
  """Pre-norm block; Gemma 2/3 also norm the attention and MLP outputs (sandwich)."""

  def __init__(self, cfg: ModelConfig, layer_type: str, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.layer_type = layer_type
    self.sandwich = cfg.sandwich_norm
    self.input_layernorm = _norm(cfg, d, dtype)
    self.self_attn = Attention(cfg, dtype, rngs)
    # HF's name: the pre-MLP norm in Llama-style blocks, the post-attention one in Gemma 2/3.
    self.post_attention_layernorm = _norm(cfg, d, dtype)
    if self.sandwich:
      self.pre_feedforward_layernorm = _norm(cfg, d, dtype)
      self.post_feedforward_layernorm = _norm(cfg, d, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, rope, mask, kv=None, index=None):
    a, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, index)
    if self.sandwich:
      x = x + self.post_attention_layernorm(a)
      x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    else:
      x = x + a
      x = x + self.mlp(self.post_attention_layernorm(x))
    return jax.ad_checkpoint.checkpoint_name(x, LAYER_OUTPUT), kv


def _remat_call(layer: DecoderLayer, *args):
  """``layer(*args)`` under ``jax.checkpoint``, saving only :data:`LAYER_OUTPUT`.

  Functional (split, then merge inside) rather than ``nnx.remat``: a layer call changes no
  state, and this also works on a model merged inside a plain ``jax.jit``/``jax.grad``.
  """
  graphdef, state = nnx.split(layer)
  policy = jax.checkpoint_policies.save_only_these_names(LAYER_OUTPUT)
  fn = jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a), policy=policy)
  return fn(state, *args)


class CausalLM(nnx.Module):
  """A decoder-only causal LM for every family :class:`ModelConfig` parses.

  ``model(input_ids, attention_mask=None, positions=None)`` returns float32 logits
  (B, T, vocab). ``attention_mask`` (B, T) marks the valid tokens (1) and pads (0);
  ``positions`` (B, T) default to 0..T-1 in every row, as HF's do.

  ``segment_ids`` (B, T) number the examples packed into a row (pads 0): each token then
  attends only within its own example.

  For generation pass ``cache=model.init_cache(batch, max_len)``: the call then returns
  ``(logits, cache)``, attends to the cached tokens too, ``attention_mask`` covers the
  new tokens only and the positions default to the cache slots they fill.

  ``attention="cudnn"`` runs ``jax.nn.dot_product_attention`` as cuDNN flash attention
  (NVIDIA GPUs, bf16/fp16) with the causal mask, padding and sliding windows given as
  structure (sequence lengths, a local window), not as a mask array. It needs the rows
  right-padded (``attention_mask`` ones, then zeros), as training batches are; calls with
  a cache or ``segment_ids``, and Gemma 2's soft-capped layers, use the XLA path. The
  default ``"xla"`` runs anywhere.

  With ``remat=True`` each decoder layer runs under ``jax.checkpoint`` and keeps only its
  output (:data:`LAYER_OUTPUT`) for the backward pass; the rest of the layer, melded
  dense included, is recomputed there. Same gradients, less activation memory.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from falqon_jax.models import CausalLM, ModelConfig
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32,
    ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2})
    >>> CausalLM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 4), jnp.int32)).shape
    (1, 4, 32)
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, remat: bool = False,
               attention: str = "xla", rngs: nnx.Rngs):
    if attention not in ATTENTION:
      raise UserInputError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    self.config = cfg
    self.remat = remat
    self.attention = attention
    d = cfg.hidden_size
    self.embed_tokens = nnx.Embed(cfg.vocab_size, d, dtype=dtype, param_dtype=dtype,
                                  embedding_metadata=_axes("vocab", "embed"), rngs=rngs)
    self.embed_positions = (
        nnx.Embed(cfg.max_position_embeddings, d, dtype=dtype, param_dtype=dtype,
                  embedding_metadata=_axes(None, "embed"), rngs=rngs)
        if cfg.model_type == "gpt2" else None
    )
    self.layers = nnx.List([DecoderLayer(cfg, lt, dtype, rngs) for lt in cfg.layer_types])
    self.norm = _norm(cfg, d, dtype)
    self.lm_head = (
        None if cfg.tie_embeddings
        else _linear(d, cfg.vocab_size, ("embed", "vocab"), False, dtype, rngs)
    )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len`` tokens."""
    cfg = self.config
    dtype = dtype or self.embed_tokens.embedding[...].dtype
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

  def _masks(self, b, t, attention_mask, segment_ids, cache, start):
    """``{layer type: mask}`` and the cache's validity (None without a cache).

    Masks are over token indices (query i sees keys j <= i; RoPE is over positions).
    """
    cfg = self.config
    window = cfg.sliding_window
    if segment_ids is not None and cache is not None:
      raise UserInputError("segment_ids (packed rows) are for training and scoring; pass no"
                           " cache with them")
    if self.attention != "xla" and cache is None and segment_ids is None:
      # Right-padded rows (training batches, scoring) as lengths: no mask array.
      lengths = (jnp.full((b,), t, jnp.int32) if attention_mask is None
                 else jnp.sum(attention_mask != 0, axis=-1, dtype=jnp.int32))
      specs = {FULL: CausalSpec(lengths, None, self.attention)}
      if window is not None:
        specs[SLIDING] = CausalSpec(lengths, window, self.attention)
      return specs, None
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask != 0
    if cache is not None:
      valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, start))
    qidx = start + jnp.arange(t)
    kidx = jnp.arange(valid.shape[1])
    causal = (kidx[None, :] <= qidx[:, None])[None] & valid[:, None, :]
    if segment_ids is not None:  # packed rows: each example sees only itself
      causal &= segment_ids[:, :, None] == segment_ids[:, None, :]
    masks = {FULL: causal}
    if window is not None:
      masks[SLIDING] = causal & (kidx[None, :] > qidx[:, None] - window)
    return {k: m[:, None] for k, m in masks.items()}, (valid if cache is not None else None)

  def __call__(self, input_ids, attention_mask=None, positions=None,
               cache: Optional[KVCache] = None, segment_ids=None):
    cfg = self.config
    b, t = input_ids.shape
    start = 0 if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(input_ids)
    if cfg.embed_scale:  # sqrt(hidden) rounded to the embedding dtype, as HF does
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)
    if self.embed_positions is not None:
      x = x + self.embed_positions(positions)

    masks, valid = self._masks(b, t, attention_mask, segment_ids, cache, start)
    ropes = {}
    for lt, rope in cfg.rope:
      if rope is not None and lt in masks:
        ropes[lt] = rope_tables(rope, cfg.head_dim, cfg.max_position_embeddings, positions)

    call = _remat_call if self.remat else DecoderLayer.__call__
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = call(layer, x, ropes.get(layer.layer_type), masks[layer.layer_type], kv, start)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(_F32)
    if cfg.final_softcap is not None:
      logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    if cache is None:
      return logits
    return logits, KVCache(tuple(ks), tuple(vs), valid, start + t)

