"""Load local Hugging Face model folders into transformers Flax models, without torch."""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from falqon_jax import linen as _linen
from falqon_jax._meld import MeldReport, _matcher
from falqon_jax._melded_kernel import MeldedKernel
from falqon_jax.errors import UserInputError
from falqon_jax.hf import _arch
from falqon_jax import _safetensors as st

INDEX = st.INDEX
MSGPACK = "flax_model.msgpack"


class LoadedModel(NamedTuple):
  """What :func:`load` returns.

  Attributes:
    model: the transformers Flax model (built with ``_do_init=False``; pass params).
    params: the params tree; melded kernels are :class:`~falqon_jax.MeldedKernel` s.
    report: the :class:`~falqon_jax.MeldReport` when ``rank`` was given, else None.
  """

  model: Any
  params: Any
  report: Optional[MeldReport]


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: not a directory; pass a local HF model folder")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{folder}: no config.json; a HF model folder needs config.json and weights"
    )
  config = st.read_json(path)
  _arch.check_model_type(config.get("model_type"), path)
  return config


def _dequant_scale(weight_scale: np.ndarray) -> np.float32:
  """The scale ``s`` (raw = value * s) whose f32 reciprocal is exactly ``weight_scale``.

  ``melded_dense`` multiplies by ``1 / s``; picking ``s`` this way makes a reloaded FP8
  checkpoint compute bit-identical logits.
  """
  ws = np.float32(np.asarray(weight_scale, np.float32).reshape(-1)[0])
  s = np.float32(1.0) / ws
  for cand in (s, *(np.nextafter(s, np.float32(d)) for d in (np.inf, -np.inf))):
    if np.float32(1.0) / cand == ws:
      return cand
  up, down = np.nextafter(s, np.float32(np.inf)), np.nextafter(s, np.float32(-np.inf))
  for cand in (np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))):
    if np.float32(1.0) / cand == ws:
      return cand
  return s


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def build_model(config, dtype=jnp.float32):
  """The transformers Flax model for a config (dict or PretrainedConfig), params absent."""
  import transformers

  if isinstance(config, dict):
    config = transformers.AutoConfig.for_model(**config)
  cls = _arch.flax_class(config.model_type)
  return cls(config, dtype=dtype, _do_init=False)


def meld_params(model, params, rank: int = 64, **meld_kwargs):
  """Melds a HF Flax model's params, with GPT-2's ``(out, in)`` Conv1D kernels handled.

  Example:
    >>> import falqon_jax.hf as fh
    >>> model = fh.build_model(fh.tiny_config("gpt2"))
    >>> params = model.init_weights(jax.random.key(0), (1, 8))
    >>> params, report = fh.meld_params(model, params, rank=16)
    >>> len(report.melded)
    8
  """
  transposed = _arch.transposed_pattern(model.config.model_type)
  return _linen.meld(params, rank, transposed=transposed, **meld_kwargs)


class _Melder:
  """Melds tensors one at a time as they are loaded, and builds the combined report."""

  def __init__(self, model_type, rank, targets, **kwargs):
    self.rank, self.targets, self.kwargs = rank, targets, kwargs
    self.match = None if targets is None else _matcher(targets)
    self.transposed = _arch.transposed_pattern(model_type)
    self.melded, self.skipped = [], []

  def __call__(self, path, leaf):
    if self.rank is None or isinstance(leaf, MeldedKernel):
      return leaf
    spath = "/".join(path)
    if self.match is not None and not self.match(spath, leaf):
      return leaf
    tree = _unflatten({path: leaf})
    tree, report = _linen.meld(
        tree, self.rank, transposed=self.transposed, targets=self.targets, **self.kwargs
    )
    self.melded += report.melded
    self.skipped += report.skipped
    for k in path:
      tree = tree[k]
    return tree

  def report(self):
    if self.rank is None:
      return None
    if self.targets is not None and not self.melded:
      raise UserInputError(f"targets {self.targets!r} matched no kernel")
    return MeldReport(tuple(self.melded), tuple(self.skipped))


def load(
    folder: str,
    *,
    rank: Optional[int] = None,
    dtype=jnp.float32,
    param_dtype=None,
    targets=None,
    **meld_kwargs,
) -> LoadedModel:
  """Loads a local HF folder (safetensors, sharded or not, or Flax msgpack) without torch.

  Tensor names are mapped to the Flax tree (``model.layers.0.self_attn.q_proj.weight`` ->
  ``model/layers/0/self_attn/q_proj/kernel``), 2-D kernels are transposed to Flax layout,
  and shards are read one at a time through memory maps. With ``rank``, each targeted
  kernel is melded to FP8 as soon as it is read, so the full-precision model never has to
  sit in memory at once. FP8 folders written by :func:`falqon_jax.export.save_fp8` load
  as rank-0 melded kernels (inference only: their ``A`` rows were dropped).

  Args:
    folder: the model folder (``config.json`` plus ``*.safetensors`` or msgpack).
    rank: meld with this LoRA rank while loading; None keeps full precision.
    dtype: the model's compute dtype.
    param_dtype: cast loaded float tensors to this dtype; None keeps the stored one.
    targets, **meld_kwargs: as for :func:`falqon_jax.meld` (``init``, ``key``, ``scaling``).

  Example:
    >>> import falqon_jax.hf as fh
    >>> loaded = fh.load("path/to/Llama-3.2-1B", rank=64)  # doctest: +SKIP
  """
  config = read_config(folder)
  model = build_model(config, dtype)
  model_type = config["model_type"]
  melder = _Melder(model_type, rank, targets, **meld_kwargs)
  files = st.weight_files(folder)
  if not files:
    if os.path.isfile(os.path.join(folder, MSGPACK)):
      return _load_msgpack(folder, model, melder, param_dtype)
    raise FileNotFoundError(
        f"{folder}: no weights (*.safetensors, {INDEX} or {MSGPACK}) next to config.json"
    )
  shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
  expected = _arch.param_paths(shapes)
  by_name = {_arch.pt_name(p): p for p in expected}
  prefix = model.base_model_prefix
  fp8_ckpt = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
  flat, scales, fp8_weights = {}, {}, {}
  for file in files:
    fname = os.path.basename(file)
    for name, arr in st.iter_tensors(file):
      if fp8_ckpt and name.endswith(".weight_scale"):
        scales[name[: -len("_scale")]] = np.array(arr)
        continue
      if fp8_ckpt and name.endswith(".input_scale"):
        continue
      key = name if name in by_name else f"{prefix}.{name}"
      if key not in by_name:
        if _arch.IGNORED.search(name):
          continue
        raise UserInputError(
            f"{fname}: unexpected tensor {name!r}, not in {type(model).__name__}; is the"
            " config.json model_type right?"
        )
      path = by_name[key]
      want = tuple(expected[path].shape)
      if arr.dtype == st.DTYPES["F8_E4M3"]:
        if arr.shape != (want[1], want[0]):
          raise UserInputError(
              f"{fname}: FP8 tensor {name!r} has shape {arr.shape}, expected {(want[1], want[0])}"
          )
        fp8_weights[key] = (path, np.array(arr), fname)
        continue
      value = arr.T if _arch.needs_transpose(path, arr.ndim) else arr
      if value.shape != want:
        raise UserInputError(
            f"{fname}: tensor {name!r} has shape {arr.shape}, expected"
            f" {want[::-1] if _arch.needs_transpose(path, arr.ndim) else want}"
            f" for {'/'.join(path)}; the checkpoint does not match config.json"
        )
      value = jnp.asarray(value, param_dtype) if param_dtype is not None else jnp.asarray(value)
      flat[path] = melder(path, value)
  for key, (path, q, fname) in fp8_weights.items():
    if key not in scales and key.split(".", 1)[-1] not in scales:
      raise UserInputError(f"{fname}: FP8 tensor {key!r} has no {key}_scale; re-export the model")
    ws = scales.get(key, scales.get(key.split(".", 1)[-1]))
    kernel_type = MeldedKernel
    if _arch.stored_transposed(model_type, path):  # GPT-2 Conv1D: (in, out) on disk
      q = np.ascontiguousarray(q.T)
      kernel_type = _linen.TransposedMeldedKernel
    out_f, in_f = q.shape
    flat[path] = kernel_type(
        qweight=jnp.asarray(q),
        scale=jnp.asarray(_dequant_scale(ws)),
        delta=jnp.zeros((out_f, 0), jnp.float32),
        in_features=in_f, out_features=out_f, rank=0,
    )
  _fill_tied(flat, expected, config, prefix)
  missing = [p for p in expected if p not in flat]
  if missing:
    raise UserInputError(
        f"{folder}: tensor {_arch.pt_name(missing[0])!r} is missing from the checkpoint"
        f" ({len(missing)} missing in all); the weights do not match config.json"
    )
  return LoadedModel(model, _unflatten(flat), melder.report())


def _fill_tied(flat, expected, config, prefix):
  """Tied checkpoints omit ``lm_head.weight``; Flax Llama/Mistral still have the param."""
  head = ("lm_head", "kernel")
  if head in expected and head not in flat:
    embed = (prefix, "embed_tokens", "embedding")
    if config.get("tie_word_embeddings") and embed in flat:
      flat[head] = jnp.swapaxes(flat[embed], 0, 1)


def _load_msgpack(folder, model, melder, param_dtype):
  from flax import serialization
  from flax.traverse_util import flatten_dict

  path = os.path.join(folder, MSGPACK)
  with open(path, "rb") as f:
    state = serialization.msgpack_restore(f.read())
  shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
  expected = _arch.param_paths(shapes)
  got = flatten_dict(state)
  if set(got) != set(expected) and all(p[0] != model.base_model_prefix for p in got):
    got = {(model.base_model_prefix, *p): v for p, v in got.items()}
  flat = {}
  for p, want in expected.items():
    if p not in got:
      raise UserInputError(f"{path}: tensor {'/'.join(p)!r} is missing")
    if tuple(got[p].shape) != tuple(want.shape):
      raise UserInputError(
          f"{path}: tensor {'/'.join(p)!r} has shape {tuple(got[p].shape)}, expected"
          f" {tuple(want.shape)}"
      )
    value = jnp.asarray(got[p], param_dtype) if param_dtype else jnp.asarray(got[p])
    flat[p] = melder(p, value)
  return LoadedModel(model, _unflatten(flat), melder.report())
