"""``ModelConfig``: the few switches the shared decoder needs, parsed from HF config.json.

Both config styles load: transformers 5's ``rope_parameters`` (nested per layer type for
Gemma 3) and the Hub's 4.x top-level ``rope_theta`` / ``rope_scaling`` (Gemma 3:
``rope_local_base_freq``, ``sliding_window_pattern``), with ``layer_types`` derived the
way 4.x derived it when the config has none.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import numpy as np

from falqon_jax.errors import UserInputError

FULL, SLIDING = "full_attention", "sliding_attention"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ACTS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclasses.dataclass(frozen=True)
class Rope:
  """One RoPE setting (transformers' ``rope_parameters`` for one layer type)."""

  rope_type: str = "default"
  theta: float = 10000.0
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: Optional[int] = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: Optional[float] = None
  mscale_all_dim: Optional[float] = None
  attention_factor: Optional[float] = None
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of a causal LM, as the shared decoder reads it.

  Build it with :meth:`from_hf` from a HF ``config.json`` dict. Every field is a plain,
  hashable value, so a config can key a jit cache.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm_eps: float
  act: str  # "silu" | "gelu_tanh" | "gelu"
  layer_types: tuple[str, ...]
  rope: tuple[tuple[str, Optional[Rope]], ...]  # (layer type, Rope); None: learned positions
  max_position_embeddings: int
  attn_scale: float
  tie_embeddings: bool
  layer_norm: bool = False  # LayerNorm with bias (GPT-2) instead of RMSNorm
  norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w)
  gated_mlp: bool = True  # gate/up/down; GPT-2: c_fc/c_proj
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sandwich_norm: bool = False  # Gemma 2/3: norms after attention and MLP too
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  sliding_window: Optional[int] = None
  attn_softcap: Optional[float] = None
  final_softcap: Optional[float] = None
  # The config.json it was parsed from (as JSON text: hashable), for exports to write back.
  # Not compared: two configs that build the same model are equal.
  hf_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def to_hf(self) -> dict:
    """The HF config.json dict this config was parsed from."""
    return json.loads(self.hf_json)

  def rope_for(self, layer_type: str) -> Optional[Rope]:
    return dict(self.rope)[layer_type]

  @classmethod
  def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
    """Parses a HF ``config.json`` dict; a bad or unsupported one is a one-line error."""
    if not isinstance(hf, dict):
      raise UserInputError(f"{where}: not a JSON object; pass the model's config.json")
    return dataclasses.replace(_parse(hf, where), hf_json=json.dumps(hf, sort_keys=True))


def tiny_config(model_type: str = "llama", **overrides) -> ModelConfig:
  """A tiny config (hidden 64, 2 layers, 4 heads, vocab 256) for tests and examples;
  ``overrides`` are HF config.json keys.

  Example:
    >>> tiny_config("qwen3", num_hidden_layers=1).num_layers
    1
  """
  base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, num_key_value_heads=2, max_position_embeddings=128)
  if model_type == "gpt2":
    base = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
  if model_type in ("mistral", "gemma2", "gemma3_text"):
    base["sliding_window"] = 32
  return ModelConfig.from_hf({"model_type": model_type, **base, **overrides}, "tiny_config")


def _need(hf: dict, where: str, *keys: str) -> Any:
  for k in keys:
    if hf.get(k) is not None:
      return hf[k]
  raise UserInputError(f"{where}: missing {keys[0]!r}; use the config.json saved with the weights")


def _act(hf: dict, where: str, model_type: str) -> str:
  if model_type == "gpt2":
    name = hf.get("activation_function", "gelu_new")
  elif model_type.startswith("gemma"):
    # Gemma is trained with the tanh GELU; 4.x configs say hidden_act "gelu" and 4.x
    # used the tanh form unless hidden_activation says otherwise.
    name = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  else:
    name = hf.get("hidden_act", "silu")
  if name not in _ACTS:
    raise UserInputError(
        f"{where}: unsupported activation {name!r}; supported: {', '.join(_ACTS)}"
    )
  return _ACTS[name]


def _rope(params: Optional[dict], theta: Optional[float], hf: dict, where: str) -> Rope:
  params = dict(params or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise UserInputError(
        f"{where}: unsupported RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
    )
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise UserInputError(
        f"{where}: partial_rotary_factor is not supported; use a full-rotary model"
    )
  theta = params.get("rope_theta", theta)
  if theta is None:
    theta = 10000.0
  factor = params.get("factor")
  orig = params.get("original_max_position_embeddings")
  if rope_type == "yarn":
    orig = orig or hf.get("max_position_embeddings")
    if factor is None:  # DeepSeek-style: the ratio of the context lengths
      factor = hf["max_position_embeddings"] / orig
  if rope_type in ("linear", "dynamic", "llama3", "yarn") and factor is None:
    raise UserInputError(f"{where}: RoPE type {rope_type!r} needs a 'factor'")
  if rope_type == "llama3":
    for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if params.get(k) is None:
        raise UserInputError(f"{where}: RoPE type 'llama3' needs {k!r}")
  return Rope(
      rope_type=rope_type,
      theta=float(theta),
      factor=float(1.0 if factor is None else factor),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=None if orig is None else int(orig),
      beta_fast=float(params.get("beta_fast") or 32),
      beta_slow=float(params.get("beta_slow") or 1),
      mscale=params.get("mscale"),
      mscale_all_dim=params.get("mscale_all_dim"),
      attention_factor=params.get("attention_factor"),
      truncate=bool(params.get("truncate", True)),
  )


def _layer_types(hf: dict, model_type: str, n: int, window: Optional[int], where: str):
  types = hf.get("layer_types")
  if types is not None:
    if len(types) != n or any(t not in (FULL, SLIDING) for t in types):
      raise UserInputError(
          f"{where}: layer_types must list {n} entries of {FULL!r} / {SLIDING!r}"
      )
    return tuple(types)
  if window is None:
    return (FULL,) * n
  if model_type == "gemma2":  # 4.x: alternate, starting with a local layer 0
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))
  if model_type == "gemma3_text":  # 4.x: every pattern-th layer is global
    pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
  if model_type in ("qwen2", "qwen3"):
    first = int(hf.get("max_window_layers", n))
    return tuple(SLIDING if i >= first else FULL for i in range(n))
  return (SLIDING,) * n


def _parse(hf: dict, where: str) -> ModelConfig:
  mt = hf.get("model_type")
  if mt not in FAMILIES:
    raise UserInputError(
        f"{where}: unsupported model_type {mt!r}; supported: {', '.join(FAMILIES)}"
    )
  if mt == "gpt2":
    hidden = int(_need(hf, where, "n_embd", "hidden_size"))
    heads = int(_need(hf, where, "n_head", "num_attention_heads"))
    n = int(_need(hf, where, "n_layer", "num_hidden_layers"))
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
      raise UserInputError(f"{where}: GPT-2 attention scaling variants are not supported")
    return ModelConfig(
        model_type=mt, vocab_size=int(_need(hf, where, "vocab_size")), hidden_size=hidden,
        num_layers=n, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), act=_act(hf, where, mt),
        layer_types=(FULL,) * n, rope=((FULL, None),),
        max_position_embeddings=int(_need(hf, where, "n_positions", "max_position_embeddings")),
        attn_scale=(hidden // heads) ** -0.5,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), layer_norm=True,
        gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
    )

  hidden = int(_need(hf, where, "hidden_size"))
  heads = int(_need(hf, where, "num_attention_heads"))
  kv_heads = int(hf.get("num_key_value_heads") or heads)
  if heads % kv_heads:
    raise UserInputError(
        f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads"
        f" {kv_heads}"
    )
  head_dim = int(hf.get("head_dim") or hidden // heads)
  n = int(_need(hf, where, "num_hidden_layers"))
  gemma = mt.startswith("gemma")
  window = hf.get("sliding_window")
  if mt in ("llama", "gemma") or (
      mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False)
  ):  # the key is ignored by these models (or switched off)
    window = None
  window = None if window is None else int(window)
  types = _layer_types(hf, mt, n, window, where)
  if SLIDING in types and window is None:
    raise UserInputError(f"{where}: layer_types has sliding layers but sliding_window is null")

  # Per layer type RoPE: transformers 5 nests rope_parameters by layer type (Gemma 3);
  # 4.x has rope_theta / rope_scaling, and Gemma 3's local layers use rope_local_base_freq.
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and set(params) & {FULL, SLIDING}:
    rope = {t: _rope(params.get(t), None, hf, where) for t in set(types)}
  elif params is not None:
    r = _rope(params, hf.get("rope_theta"), hf, where)
    rope = {t: r for t in set(types)}
  else:
    r = _rope(hf.get("rope_scaling"), hf.get("rope_theta"), hf, where)
    rope = {t: r for t in set(types)}
    if mt == "gemma3_text" and SLIDING in types:
      rope[SLIDING] = _rope(None, hf.get("rope_local_base_freq", 10000.0), hf, where)

  qpas = hf.get("query_pre_attn_scalar") if mt in ("gemma2", "gemma3_text") else None
  attn_bias = bool(hf.get("attention_bias", False))
  return ModelConfig(
      model_type=mt, vocab_size=int(_need(hf, where, "vocab_size")), hidden_size=hidden,
      num_layers=n, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      intermediate_size=int(_need(hf, where, "intermediate_size")),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), act=_act(hf, where, mt),
      layer_types=types, rope=tuple(sorted(rope.items())),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      attn_scale=float(qpas if qpas is not None else head_dim) ** -0.5,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      norm_offset=gemma, qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=mt in ("qwen3", "gemma3_text"),
      sandwich_norm=mt in ("gemma2", "gemma3_text"), embed_scale=gemma,
      sliding_window=window if SLIDING in types else None,
      attn_softcap=_opt_float(hf.get("attn_logit_softcapping")) if gemma else None,
      final_softcap=_opt_float(hf.get("final_logit_softcapping")) if gemma else None,
  )


def _opt_float(x) -> Optional[float]:
  return None if x is None else float(x)


def inv_freq(rope: Rope, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  """(inverse frequencies (dim/2,) float32, attention factor) of a static RoPE type.

  Follows transformers' ``modeling_rope_utils`` formulas, in float32 as it computes them.
  ``dynamic`` depends on the sequence length; :func:`dynamic_inv_freq` handles it.
  """
  f32 = np.float32
  exponents = np.arange(0, dim, 2).astype(f32) / f32(dim)
  base = f32(rope.theta) ** exponents
  inv = f32(1.0) / base
  t = rope.rope_type
  if t in ("default", "dynamic"):
    return inv, 1.0
  if t == "linear":
    return inv / f32(rope.factor), 1.0
  if t == "llama3":
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / f32(rope.factor), inv)
    smooth = (f32(old) / wavelen - f32(rope.low_freq_factor)) / f32(
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / f32(rope.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32), 1.0
  if t == "yarn":
    factor = rope.factor

    def mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = rope.attention_factor
    if att is None:
      if rope.mscale and rope.mscale_all_dim:
        att = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
      else:
        att = mscale(factor)
    orig = rope.original_max_position_embeddings or max_position_embeddings

    def correction_dim(rotations):
      # The dimension whose wavelength makes `rotations` turns over the original context.
      return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001  # avoids a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
    extrapolation = f32(1) - ramp  # 1: keep the original frequency, 0: interpolate
    interp = f32(1.0) / (f32(factor) * base)
    return (interp * (1 - extrapolation) + inv * extrapolation).astype(f32), float(att)
  raise AssertionError(t)
