"""Export melded ``falqon_jax.models`` causal LMs as Hugging Face folders: FP8 for vLLM, or
dequantized bf16.

FALQON trains straight into the FP8 backbone, so the FP8 export is the trained weights
themselves, with no post-training quantization.

:func:`save_fp8` writes vLLM's ``fp8`` serialized-checkpoint format (from vLLM 0.4.2 /
AutoFP8). Checked against ``vllm-project/vllm`` as stored, one commit per file:
``vllm/model_executor/layers/quantization/fp8.py`` (0071b24b, 1436674b),
``.../quantization/utils/quant_utils.py`` (01693a61), ``.../utils/w8a8_utils.py``
(646ad5a4), ``vllm/model_executor/parameter.py`` (0045689b),
``vllm/model_executor/layers/linear.py`` (0036d38d) and each family's
``vllm/model_executor/models/*.py`` ``load_weights``; ``tests/test_export_vllm_rules.py``
restates every rule with the file and commit it comes from:

* ``config.json`` ``quantization_config = {"quant_method": "fp8", "activation_scheme":
  "dynamic", "ignored_layers": [...]}``: ``Fp8Config.from_config`` reads
  ``quant_method`` (``"fp8" in quant_method`` means serialized FP8 weights),
  ``activation_scheme`` (``"static"`` or ``"dynamic"``; dynamic needs no
  ``input_scale``) and optional ``ignored_layers`` (module names loaded unquantized).
* per melded linear ``<module>.weight``: ``float8_e4m3fn``, shape ``(out, in)``
  (``Fp8LinearMethod.create_weights``: ``output_size_per_partition x
  input_size_per_partition``) -- the backbone rows only, the ``A`` rows dropped;
* ``<module>.weight_scale``: float32 scalar per-tensor scale (``PerTensorScaleParameter``
  has one slot per fused shard and takes a ``()`` or ``(1,)`` scale into its shard's),
  a *dequantization multiplier*: ``W = weight * weight_scale``. FALQON's scale multiplies
  the other way (``raw = W * scale``), so ``weight_scale = 1 / scale``. vLLM fuses
  q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: ``is_layer_skipped`` refuses
  a fused layer with some shards in ``ignored_layers`` and not others, and
  ``requantize_with_max_scale`` requantizes each layer's shards to the largest shard
  scale. Melding with ``fused_groups=True`` (the default) gives each group one scale, so
  that requantization is the identity and vLLM serves the trained bytes (tested by
  simulating it); a group melded in part, or with unshared scales, is refused.
* every other tensor (embeddings, norms, LM head, unmelded kernels) untouched, in its
  own dtype or ``dtype=``.

GPT-2 keeps HF's ``Conv1D`` layout: its melded ``c_attn``/``c_proj``/``c_fc`` weights are
written ``(in, out)`` like the original checkpoint, because vLLM's ``GPT2LMHeadModel.
load_weights`` (``vllm/model_executor/models/gpt2.py``, e7dffa68) transposes every
``.weight`` of those modules while loading and leaves ``.weight_scale`` alone; the fused
``c_attn`` loads as one qkv tensor with one scale, which ``QKVParallelLinear`` accepts
(shard id None: the weight split into q/k/v rows, the scale copied into every slot), so
its requantization is the identity too. Not yet run through a real vLLM here (no GPU
machine with vLLM was available): the tests check the folder against the restated rules
and reload it with our loader.

vLLM's fp8 format is per-tensor only, so kernels melded with ``scaling="row"`` are refused.

Tensor names and layouts are those transformers' ``save_pretrained`` writes for the
family (:func:`falqon_jax.models.hf_name`; GPT-2 under ``transformer.``, tied models
without ``lm_head.weight``), and ``config.json`` is the model's own
(``ModelConfig.to_hf``), so transformers, vLLM and :func:`falqon_jax.models.load` read
the folder. transformers 5 routes ``quant_method: "fp8"`` to its block-wise FP8 loader,
which names the scale ``weight_scale_inv`` and silently drops an unknown
``weight_scale``; load the FP8 folder there with ``key_mapping={r"\\.weight_scale$":
".weight_scale_inv"}`` (and ``FineGrainedFP8Config(dequantize=True)`` on CPU), as
``tests/test_export_torch.py`` does.

Example:
  >>> from flax import nnx
  >>> from falqon_jax import export, models, nnx as fnnx
  >>> lm = models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0))
  >>> report = fnnx.meld(lm, rank=16)
  >>> model, params = models.split(lm)
  >>> export.save_fp8("/tmp/falqon-doctest-fp8", model, params, overwrite=True)
  '/tmp/falqon-doctest-fp8'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from falqon_jax import models
from falqon_jax._meld import FUSED_GROUPS
from falqon_jax._melded_kernel import MeldedKernel, is_melded
from falqon_jax._merge import merge_rows
from falqon_jax.errors import UserInputError
from falqon_jax import _safetensors as st

__all__ = ["save_fp8", "save_bf16"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
)
_CONFIG = "config.json"
# Weight files of any HF loader, sharded or not: a stale one left beside a new export would
# be read with it (or instead of it), so overwriting replaces them too.
_WEIGHTS = re.compile(r"(model|pytorch_model|flax_model|tf_model)(-\d+-of-\d+)?"
                      r"\.(safetensors|bin|msgpack|h5)(\.index\.json)?")


def _flat(params) -> list[tuple[tuple, Any]]:
  """``(path, leaf)`` pairs; layer indices stay ints, as ``models.hf_name`` reads them."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_melded)[0]
  return [(tuple(getattr(k, "key", k) for k in kp), leaf) for kp, leaf in leaves]


def _check_model(model, fn: str) -> models.ModelConfig:
  if not isinstance(model, models.Functional):
    raise TypeError(f"{fn}: model must be a falqon_jax.models.Functional (from"
                    f" models.split), got {type(model).__name__}")
  return model.config


def _tensor_name(cfg: models.ModelConfig, path: tuple) -> tuple[str, bool]:
  """(name as transformers' save_pretrained writes it, stored transposed)."""
  name, transposed = models.hf_name(cfg, path)
  if cfg.model_type == "gpt2" and not name.startswith("lm_head."):
    name = "transformer." + name  # GPT2LMHeadModel's own prefix
  return name, transposed


def _check_target(folder: str, overwrite: bool) -> str:
  folder = os.path.abspath(folder)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise FileExistsError(f"{folder} exists and is not a folder; choose another path")
  if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
    raise FileExistsError(
        f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace"
        " the model files in it, leaving every other file, or choose a new or empty folder"
    )
  return folder


def _write_atomic(folder: str, write) -> str:
  """Runs ``write`` on a temp folder beside ``folder``, then moves its files into place.

  A new folder is the written one renamed, so it appears complete. Into an existing
  folder the files move one by one: ``config.json`` goes out first and in last, so no
  state in between reads as a model. Only the files written and stale weight files
  (:data:`_WEIGHTS`) are displaced; every other file and folder stays. On an error
  everything moved is put back, and the temp folder is always removed.
  """
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
  new, old = os.path.join(tmp, "new"), os.path.join(tmp, "old")
  done = []  # (where a file is now, where it came from), undone in reverse on an error
  try:
    os.mkdir(new)  # not mkdtemp's 0o700: the export gets the umask's permissions
    os.mkdir(old)
    write(new)
    if os.path.isdir(folder):
      _move_in(new, old, folder, done)
    else:
      os.rename(new, folder)
  except BaseException:
    for now, was in reversed(done):
      try:
        os.replace(now, was)
      except OSError:
        pass
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def _move_in(new: str, old: str, folder: str, done: list):
  names = sorted(os.listdir(new))
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isdir(path) and not os.path.islink(path):
      raise FileExistsError(f"{path} is a folder where the export writes a file; move it"
                            " away or choose another folder")
  stale = [f for f in os.listdir(folder) if _WEIGHTS.fullmatch(f) and f not in names
           and not os.path.isdir(os.path.join(folder, f))]

  def move(src, dst):
    os.replace(src, dst)
    done.append((dst, src))

  def displace(name):
    if os.path.lexists(os.path.join(folder, name)):
      move(os.path.join(folder, name), os.path.join(old, name))

  displace(_CONFIG)
  for name in names:
    if name != _CONFIG:
      displace(name)
      move(os.path.join(new, name), os.path.join(folder, name))
  for name in stale:
    displace(name)
  if _CONFIG in names:
    move(os.path.join(new, _CONFIG), os.path.join(folder, _CONFIG))


def _write_weights(tmp: str, tensors: dict, max_shard_bytes: Optional[int]):
  total = sum(a.nbytes for a in tensors.values())
  if not max_shard_bytes or total <= max_shard_bytes:
    st.save_file(tensors, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
    return
  shards, cur, size = [], {}, 0
  for name in sorted(tensors):
    if cur and size + tensors[name].nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[name] = tensors[name]
    size += tensors[name].nbytes
  shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    st.save_file(shard, os.path.join(tmp, fname), {"format": "pt"})
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _write_tokenizer(tmp: str, tokenizer):
  if tokenizer is None:
    return
  if isinstance(tokenizer, (str, os.PathLike)):
    if not os.path.isdir(tokenizer):
      raise FileNotFoundError(f"tokenizer folder {tokenizer} does not exist")
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, f))]
    if not found:
      raise FileNotFoundError(f"{tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for f in found:
      shutil.copy2(os.path.join(tokenizer, f), os.path.join(tmp, f))
  elif hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(tmp)
  else:
    raise TypeError("tokenizer must be a folder path or have save_pretrained()")


def _config_dict(cfg: models.ModelConfig, dtype_name: str,
                 quantization: Optional[dict]) -> dict:
  config = cfg.to_hf()
  # transformers 5 reads "dtype" first; 4.x reads "torch_dtype": both, never contradicting.
  config["torch_dtype"] = dtype_name
  config["dtype"] = dtype_name
  config.pop("quantization_config", None)
  if quantization is not None:
    config["quantization_config"] = quantization
  return config


def _dtype_name(arrays) -> str:
  dtypes = {np.dtype(a.dtype) for a in arrays if jnp.issubdtype(a.dtype, jnp.floating)}
  for name, dt in (("float32", np.float32), ("bfloat16", st.DTYPES["BF16"]),
                   ("float16", np.float16)):
    if np.dtype(dt) in dtypes:
      return name
  return "bfloat16"


def _folded(mk: MeldedKernel) -> MeldedKernel:
  """``mk`` with the pending ΔBuffer merged into its FP8 rows (nearest rounding) where its
  forward uses it (``live_delta``): what the forward computes is what gets exported."""
  if not mk.live_delta or mk.rank == 0:
    return mk
  return merge_rows(mk, mk.out_features, reset="all", rounding="nearest")


def _plain(leaf, transposed: bool, dtype):
  arr = np.asarray(leaf)
  if transposed:
    arr = arr.T
  if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
    arr = arr.astype(jnp.dtype(dtype))
  return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def save_fp8(
    folder: str,
    model,
    params,
    *,
    tokenizer=None,
    dtype=None,
    overwrite: bool = False,
    max_shard_bytes: Optional[int] = None,
) -> str:
  """Writes a HF folder in vLLM's ``fp8`` checkpoint format (see the module docstring).

  Works for every supported family; GPT-2's Conv1D weights keep HF's ``(in, out)`` layout.

  Args:
    folder: the output folder: new, empty, or (with ``overwrite``) an existing folder.
    model: the :class:`falqon_jax.models.Functional` (its config names the tensors and
      is written as ``config.json``).
    params: its params tree (``models.split``), with :class:`~falqon_jax.MeldedKernel`
      leaves for melded layers. A pending ΔBuffer is merged in (every row, nearest
      rounding) where the kernel's forward uses it (``live_delta``), else left out as
      the forward leaves it. Refused, before anything is written: kernels melded with
      ``scaling="row"``, a melded ``lm_head`` (vLLM's is never FP8), and a fused group
      (a layer's q/k/v or gate/up) melded only in part, which vLLM refuses to load, or
      whose members have different scales (``fused_groups=False``), which vLLM
      requantizes.
    tokenizer: a tokenizer (``save_pretrained``) or a folder to copy tokenizer files from.
    dtype: cast the non-FP8 float tensors to this dtype (e.g. ``jnp.bfloat16``); None
      keeps their dtype, so the export reloads bit-exact.
    overwrite: write into a non-empty folder, replacing only model files: the files this
      export writes and stale weight files (``model-*.safetensors``, the index,
      ``pytorch_model.bin``, ``flax_model.msgpack``, ...). Every other file and subfolder
      stays untouched, so a run folder or a folder of runs keeps all its contents.
    max_shard_bytes: split into shards plus ``model.safetensors.index.json`` above this.

  Returns:
    The absolute folder path. Everything is written to a temp folder beside it first; a
    new folder then appears complete, an existing one gets ``config.json`` last, and an
    error puts back whatever was moved.
  """
  cfg = _check_model(model, "save_fp8")
  folder = _check_target(folder, overwrite)
  tensors, ignored, others = {}, [], []
  kinds = {}  # module -> its weight_scale bytes if FP8, None if ignored
  for path, leaf in _flat(params):
    name, transposed = _tensor_name(cfg, path)
    module = name.rsplit(".", 1)[0]
    if isinstance(leaf, MeldedKernel):
      if leaf.scaling != "tensor":
        raise UserInputError(
            f"save_fp8: {'/'.join(map(str, path))} uses scaling='row'; vLLM's fp8 format"
            " is per-tensor only: meld with scaling='tensor' or use save_bf16"
        )
      if path[0] == "lm_head":
        raise UserInputError(
            "save_fp8: lm_head is melded; vLLM keeps the LM head unquantized and cannot"
            " load it in FP8: meld with targets that leave lm_head out, or use save_bf16")
      weight = np.asarray(_folded(leaf).qweight[: leaf.out_features])  # (out, in)
      if not transposed:  # GPT-2 Conv1D: (in, out) on disk
        weight = np.ascontiguousarray(weight.T)
      tensors[name] = weight
      inv = np.float32(1.0) / np.asarray(leaf.scale, np.float32)
      tensors[module + ".weight_scale"] = np.asarray(inv, np.float32).reshape(())
      kinds[module] = tensors[module + ".weight_scale"].tobytes()
      continue
    tensors[name] = _plain(leaf, transposed, dtype)
    others.append(tensors[name])
    if path[-1] == "kernel" and tensors[name].ndim == 2 and path[0] != "lm_head":
      ignored.append(module)
      kinds[module] = None
  if not any(isinstance(l, MeldedKernel) for _, l in _flat(params)):
    raise UserInputError("save_fp8: params hold no MeldedKernel; meld first or use save_bf16")
  # vLLM loads each group as one fused layer: one precision, and one scale or requantized.
  for group in FUSED_GROUPS:
    for parent in sorted({m.rpartition(".")[0] for m in kinds if m.rpartition(".")[2] in group}):
      members = {g: kinds[f"{parent}.{g}"] for g in group if f"{parent}.{g}" in kinds}
      fp8 = [g for g, s in members.items() if s is not None]
      if fp8 and len(fp8) < len(members):
        raise UserInputError(
            f"save_fp8: {parent} has {', '.join(fp8)} melded but not"
            f" {', '.join(g for g in members if g not in fp8)}; vLLM loads"
            f" {'/'.join(members)} as one fused layer and refuses a partly FP8 one: meld the"
            " whole group or none of it (targets), or use save_bf16")
      if len({members[g] for g in fp8}) > 1:
        raise UserInputError(
            f"save_fp8: {'/'.join(members)} of {parent} have different FP8 scales; vLLM"
            " requantizes their fused layer to the largest, changing the trained weights:"
            " meld with fused_groups=True (falqon_jax.RECOMMENDED) or use save_bf16")
  quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ignored}
  config = _config_dict(cfg, _dtype_name(others), quant)

  def write(tmp):
    _write_weights(tmp, tensors, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    _write_tokenizer(tmp, tokenizer)

  return _write_atomic(folder, write)


def save_bf16(
    folder: str,
    model,
    params,
    *,
    tokenizer=None,
    dtype=jnp.bfloat16,
    overwrite: bool = False,
    max_shard_bytes: Optional[int] = None,
) -> str:
  """Writes a standard HF safetensors folder with every melded kernel dequantized.

  Melded kernels become their dequantized backbone (``A`` dropped; a pending ΔBuffer
  folded in exactly where the kernel's forward uses it, ``live_delta``); all float tensors are cast to ``dtype`` (bf16 by default). Works for all
  supported families, GPT-2 included. Other arguments as for :func:`save_fp8`.

  Example:
    >>> from flax import nnx
    >>> from falqon_jax import export, models, nnx as fnnx
    >>> lm = models.CausalLM(models.tiny_config("gpt2"), rngs=nnx.Rngs(0))
    >>> report = fnnx.meld(lm, rank=16)
    >>> model, params = models.split(lm)
    >>> export.save_bf16("/tmp/falqon-doctest-bf16", model, params, overwrite=True)
    '/tmp/falqon-doctest-bf16'
  """
  cfg = _check_model(model, "save_bf16")
  folder = _check_target(folder, overwrite)
  tensors = {}
  for path, leaf in _flat(params):
    if isinstance(leaf, MeldedKernel):
      w = leaf.backbone(jnp.float32)  # the layout of the param it replaces
      if leaf.live_delta:  # the forward's W + BA, exactly
        w = w + jnp.dot(leaf.delta, leaf.lora_a(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST).T
      leaf = w
    name, transposed = _tensor_name(cfg, path)
    tensors[name] = _plain(leaf, transposed, dtype)
  dtype_name = _dtype_name(tensors.values()) if dtype is None else str(jnp.dtype(dtype))
  config = _config_dict(cfg, dtype_name, None)

  def write(tmp):
    _write_weights(tmp, tensors, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    _write_tokenizer(tmp, tokenizer)

  return _write_atomic(folder, write)
