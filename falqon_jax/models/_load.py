"""Loads a local HF folder (config.json + safetensors, single or sharded) into a CausalLM."""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from falqon_jax import nnx as fnnx
from falqon_jax._meld import (
    MeldedLayer, MeldReport, _matcher, fused_groups, meld_check, meld_members,
)
from falqon_jax._options import RECOMMENDED, FalqonOptions, resolve
from falqon_jax._melded_kernel import MeldedKernel
from falqon_jax.errors import UserInputError
from falqon_jax import _safetensors as st
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
    other = [f for f in ("flax_model.msgpack", "pytorch_model.bin", "model.pt", "tf_model.h5")
             if os.path.isfile(os.path.join(folder, f))]
    found = f" (found {other[0]}, which is not read)" if other else ""
    raise UserInputError(f"{folder}: no *.safetensors weights{found}; save the model with"
                         " safetensors (save_pretrained does by default)")
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
  # nnx.Linear keeps (in, out); torch Linear stores (out, in), GPT-2's Conv1D (in, out)
  # (its untied lm_head is a torch Linear).
  transposed = leaf == "kernel" and (not gpt2 or mods == ["lm_head"])
  name = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join([*mods, name]), transposed


class Loaded(NamedTuple):
  """What :func:`load` returns.

  Attributes:
    model: the :class:`CausalLM`; melded layers are ``falqon_jax.nnx.MeldedLinear`` s.
    config: its :class:`ModelConfig`.
    report: the :class:`~falqon_jax.MeldReport` when ``rank`` was given, else None.
  """

  model: CausalLM
  config: ModelConfig
  report: Optional[MeldReport]


def _dequant_scale(weight_scale) -> np.float32:
  """The scale ``s`` (raw = value * s) whose f32 reciprocal is exactly ``weight_scale``, so
  a reloaded FP8 export computes what the exported model computed."""
  ws = np.float32(np.asarray(weight_scale, np.float32).reshape(-1)[0])
  s = np.float32(1.0) / ws
  cands = [s]
  for _ in range(2):
    cands += [np.nextafter(cands[-2 if len(cands) > 1 else 0], np.float32(d))
              for d in (np.inf, -np.inf)]
  for cand in cands:
    if np.float32(1.0) / cand == ws:
      return cand
  return s


def _fp8_kernel(q: np.ndarray, weight_scale, transposed: bool) -> MeldedKernel:
  """A rank-0 melded kernel from an FP8 export's ``weight`` and ``weight_scale``."""
  q = np.ascontiguousarray(q.T) if transposed else np.asarray(q)  # to (out, in)
  out_f, in_f = q.shape
  return MeldedKernel(qweight=jnp.asarray(q), scale=jnp.asarray(_dequant_scale(weight_scale)),
                      delta=jnp.zeros((out_f, 0), jnp.float32), in_features=in_f,
                      out_features=out_f, rank=0)


def load(folder: str, dtype=jnp.float32, *, rank: Optional[int] = None,
         options: FalqonOptions = RECOMMENDED, targets=None, attention: str = "xla",
         key: Optional[jax.Array] = None, **overrides) -> Loaded:
  """Loads a local HF causal-LM folder without torch or transformers' model classes.

  Weights come from ``model.safetensors`` or the shards a ``model.safetensors.index.json``
  lists, read one tensor at a time and cast to ``dtype``. A tensor whose shape does not
  match config.json, a missing tensor or an unexpected one is a one-line error. Values are
  set into the model's variables, so their logical axis names (``out_sharding``) stay.

  With ``rank``, each targeted projection is melded as soon as its tensor is read, so the
  full-precision model never sits in memory whole; the result equals loading and then
  :func:`falqon_jax.nnx.meld` with the same ``rank`` / ``options`` (default
  :data:`~falqon_jax.RECOMMENDED`) / ``targets`` / ``key`` and option overrides such as
  ``init`` (each layer folds its own index into ``key``, default
  ``jax.random.key(options.seed)``). The members of a fused group (q/k/v, gate/up; see
  ``FalqonOptions.fused_groups``) are buffered until all are read and melded together with
  one shared scale, so at most one group of one layer waits in full precision. Without
  ``rank`` nothing is melded. A folder written by
  :func:`falqon_jax.export.save_fp8` loads its FP8 weights as rank-0 melded layers (the A
  rows were dropped: for inference and export). ``attention`` is :class:`CausalLM`'s.

  Example:
    >>> from falqon_jax import models
    >>> model, config, report = models.load("path/to/Llama-3.2-1B", rank=64)  # doctest: +SKIP
  """
  cfg = read_config(folder)
  hf = cfg.to_hf()
  quant = hf.get("quantization_config") or {}
  fp8 = quant.get("quant_method") == "fp8"
  if quant and (not fp8 or quant.get("weight_block_size")):
    raise UserInputError(
        f"{folder}: quantization_config {json.dumps(quant, sort_keys=True)[:120]} is not"
        " supported; load the unquantized (bf16) checkpoint, or a per-tensor FP8 export"
        " (falqon_jax.export.save_fp8)")
  model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, attention=attention,
                                          rngs=nnx.Rngs(0)))
  match = None if targets is None else _matcher(targets)
  plan, groups, pending = {}, {}, {}
  if rank is not None:
    if fp8:
      raise UserInputError(f"{folder} is an FP8 export (its A rows were dropped); fine-tune"
                           " the base model or a bf16 export, or load this one without rank")
    options = resolve(options, {**overrides, "rank": rank})
    plan = {tuple(path): (linear, index)
            for path, linear, index in fnnx.meld_plan(model, match, targets)}
    groups = fused_groups({tuple(p): l.kernel.get_value() for p, l in nnx.iter_graph(model)
                           if isinstance(l, nnx.Linear)}, match, options)
  elif overrides:
    raise UserInputError(f"models.load: {sorted(overrides)[0]}= melds; pass rank= too, or"
                         " drop it to load without melding")
  want = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      name, transposed = hf_name(cfg, path)
      want[name] = (tuple(path), var, transposed)
  filled, melded, skipped, scales, fp8_weights = set(), {}, {}, {}, {}
  for file in _weight_files(folder):
    for name, arr in st.iter_tensors(file):
      tensor = name.removeprefix("transformer.") if cfg.model_type == "gpt2" else name
      if fp8 and tensor.endswith((".weight_scale", ".input_scale")):
        if tensor.endswith(".weight_scale"):
          scales[tensor.removesuffix("_scale")] = np.array(arr)
        continue
      if tensor not in want:
        if tensor.endswith(_IGNORED) or (cfg.tie_embeddings and tensor == "lm_head.weight"):
          continue
        raise UserInputError(
            f"{file}: unexpected tensor {name!r} for this config.json; the checkpoint and"
            " config do not match"
        )
      path, var, transposed = want[tensor]
      shape = tuple(var.get_value().shape)
      hf_shape = shape[::-1] if transposed else shape
      if tuple(arr.shape) != hf_shape:
        raise UserInputError(
            f"{file}: tensor {name!r} has shape {tuple(arr.shape)}, config.json implies"
            f" {hf_shape}; the checkpoint and config do not match"
        )
      filled.add(tensor)
      if arr.dtype == st.DTYPES["F8_E4M3"]:
        fp8_weights[tensor] = (path, np.array(arr), transposed)
        continue
      value = np.asarray(arr)
      value = jnp.asarray(value.T if transposed else value, dtype=dtype)
      linear_path = path[:-1]
      if path[-1] == "kernel" and linear_path in plan:
        entry = meld_check("/".join(map(str, path)), value, options, match)
        if isinstance(entry, MeldedLayer):
          members = groups[linear_path]
          pending[linear_path] = ("/".join(map(str, path)), value, plan[linear_path][1])
          if all(m in pending for m in members):
            for m, done in zip(members, meld_members([pending.pop(m) for m in members],
                                                     options, key=key)):
              melded[m] = done
          continue
        if entry is not None:
          skipped[linear_path] = entry
      var.set_value(value)
  missing = sorted(set(want) - filled)
  if missing:
    raise UserInputError(
        f"{folder}: checkpoint has no tensor {missing[0]!r} ({len(missing)} missing); the"
        " checkpoint and config do not match"
    )
  for tensor, (path, q, transposed) in fp8_weights.items():
    if tensor not in scales:
      raise UserInputError(f"{folder}: FP8 tensor {tensor!r} has no {tensor}_scale; re-export it")
    # GPT-2's Conv1D weights are stored (in, out): the transpose of torch's Linear layout.
    linear = _module(model, path[:-1])
    fnnx.swap_in(model, path[:-1], linear, _fp8_kernel(q, scales[tensor], not transposed))
  for linear_path, (mk, _) in melded.items():
    fnnx.swap_in(model, linear_path, plan[linear_path][0], mk)
  report = None
  if rank is not None:  # in the order falqon_jax.nnx.meld reports
    layers = tuple(melded[p][1] for p in plan if p in melded)
    if targets is not None and not layers:
      raise UserInputError(f"targets {targets!r} matched no projection of {folder}")
    report = MeldReport(layers, tuple(skipped[p] for p in plan if p in skipped))
  return Loaded(model, cfg, report)


def _module(model, path):
  node = model
  for k in path:
    node = node[k] if isinstance(k, int) else getattr(node, k)
  return node
