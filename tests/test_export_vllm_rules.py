"""FP8 exports checked against vLLM's loading rules, restated in plain Python.

No vLLM or torch here: :func:`vllm_load` restates what vLLM does with a ``fp8`` folder,
as read in ``vllm-project/vllm`` (the stored copies; each file at the commit named):

* ``vllm/model_executor/layers/quantization/fp8.py`` (0071b24b, 1436674b):
  ``Fp8Config.from_config`` reads ``quant_method`` (``"fp8" in quant_method``: serialized
  FP8), ``activation_scheme`` (``static``/``dynamic``), ``ignored_layers`` and
  ``weight_block_size`` (block scales, ``weight_scale_inv``: not this format);
  ``Fp8Config.get_quant_method`` gives a ``LinearBase`` whose prefix
  ``is_layer_skipped`` the unquantized method, every other one ``Fp8LinearMethod`` (the
  LM head is a ``ParallelLMHead``, not a ``LinearBase``: never quantized);
  ``Fp8LinearMethod.create_weights``: ``weight`` float8_e4m3fn ``(sum(output_partition_
  sizes), input_size)``, ``weight_scale`` float32 ``(len(output_partition_sizes),)``
  filled with float32's min, ``input_scale`` only for ``static``;
  ``process_weights_after_loading``: ``requantize_with_max_scale`` over the logical
  widths, for every per-tensor layer (fused or not) when not on Marlin.
* ``.../quantization/utils/quant_utils.py`` (01693a61) ``is_layer_skipped``: exact
  prefix match; a fused name (``qkv_proj``, ``gate_up_proj``) is expanded through the
  model's ``packed_modules_mapping`` and shards that disagree raise "Detected some but not
  all shards of ... are quantized".
* ``.../quantization/utils/w8a8_utils.py`` (646ad5a4, 0039d4bd)
  ``requantize_with_max_scale``: when the last scale slot was loaded, each shard is
  dequantized (``per_tensor_dequantize``: float16 times its scale) and quantized again
  with the largest scale (``ops.scaled_fp8_quant``).
* ``vllm/model_executor/parameter.py`` (0045689b): ``PerTensorScaleParameter`` loads a
  scale of shape ``()`` ("AutoFP8 scales do not have a shape") or ``(1,)`` into its
  shard's slot; ``BasevLLMParameter._assert_and_load`` copies (and so casts) into the
  parameter's dtype.
* ``vllm/model_executor/layers/linear.py`` (0036d38d) ``QKVParallelLinear`` /
  ``MergedColumnParallelLinear.weight_loader_v2``: shard ``q``/``k``/``v`` or ``0``/``1``
  loads its rows; shard ``None`` (fused on disk) splits the weight by the output sizes and
  copies the one scale into every slot.
* ``vllm/model_executor/models/llama.py`` (e06c9ba2; ``MistralForCausalLM`` maps to it in
  ``models/registry.py`` bf8e7624), ``qwen2.py`` (cb24295e), ``qwen3.py`` (e745baff),
  ``gemma.py`` (fcd3f0cb), ``gemma2.py`` (02cda6e4), ``gemma3.py`` (311a97cb),
  ``load_weights``: ``stacked_params_mapping`` (q/k/v -> ``qkv_proj``, gate/up ->
  ``gate_up_proj``), ``rotary_emb.inv_freq`` skipped (not in the gemma files),
  ``maybe_remap_kv_scale_name`` (``model_loader/weight_utils.py`` 0a1ee72e: renames only
  KV-cache scales, ``.kv_scale``/``.k_scale``/``.v_scale``, which the export never
  writes and this restatement refuses), ``lm_head.`` skipped when tied
  (``AutoWeightsLoader`` ``skip_prefixes``, ``models/utils.py`` d30d0c13); a ``.bias``
  with no parameter is dropped silently (refused here: vLLM would serve without it), and
  any other unknown name is an error.
* ``vllm/model_executor/models/gpt2.py`` (e7dffa68, 01768942) ``GPT2LMHeadModel.
  load_weights``: no packed mapping; ``transformer.`` prefixed; ``.attn.bias`` /
  ``.attn.masked_bias`` skipped; every ``.weight`` of ``c_attn``/``c_proj``/``c_fc``
  transposed (``weight_scale`` not); ``c_attn`` is one ``QKVParallelLinear`` (shard None).
* ``vllm/model_executor/model_loader/default_loader.py`` (0e06f498)
  ``DefaultModelLoader.load_weights`` checks that every parameter was loaded only for
  unquantized models: a tensor missing from an FP8 folder would be served as
  uninitialized memory, so the restatement requires them all.
"""

import dataclasses
import json
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest

import falqon_jax
from falqon_jax import export, models
from falqon_jax import _safetensors as st
from falqon_jax.errors import UserInputError

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-tiny"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"hf-tiny fixtures not found at {FIXTURES} (CI puts ../shared beside the clone)",
)
ARCHES = ["llama3", "llama3_tied", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
          "gpt2"]


class VllmRefuses(Exception):
  """vLLM would refuse the folder, or serve weights other than the ones it holds."""


# --- the model vLLM builds from config.json ------------------------------------------

@dataclasses.dataclass(frozen=True)
class Linear:
  outs: tuple  # output_partition_sizes: the logical widths, one per fused shard
  n_in: int
  bias: bool


PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
           ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
           ("gate_up_proj", "up_proj", 1)]
GEMMAS = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}
DECODERS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            *GEMMAS}


def vllm_model(cfg: dict):
  """``(linears {prefix: Linear}, other params {name: shape}, packed mapping, tied)``."""
  arch = cfg["architectures"][0]
  if arch == "GPT2LMHeadModel":
    return _gpt2_model(cfg)
  if arch not in DECODERS:
    raise VllmRefuses(f"architecture {arch} is not one of the families checked here")
  h, n_layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
  heads = cfg["num_attention_heads"]
  kv = cfg.get("num_key_value_heads") or heads
  hd = cfg.get("head_dim") or h // heads
  inter = cfg["intermediate_size"]
  attn_bias = bool(cfg.get("attention_bias"))
  qkv_bias = {"Qwen2ForCausalLM": True, "GemmaForCausalLM": False}.get(arch, attn_bias)
  o_bias = attn_bias if arch in ("LlamaForCausalLM", "MistralForCausalLM") else False
  mlp_bias = bool(cfg.get("mlp_bias")) if arch in ("LlamaForCausalLM",
                                                   "MistralForCausalLM") else False
  norms = ["input_layernorm", "post_attention_layernorm"]
  if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  linears, params = {}, {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
  for i in range(n_layers):
    p = f"model.layers.{i}"
    linears[f"{p}.self_attn.qkv_proj"] = Linear((heads * hd, kv * hd, kv * hd), h, qkv_bias)
    linears[f"{p}.self_attn.o_proj"] = Linear((h,), heads * hd, o_bias)
    linears[f"{p}.mlp.gate_up_proj"] = Linear((inter, inter), h, mlp_bias)
    linears[f"{p}.mlp.down_proj"] = Linear((h,), inter, mlp_bias)
    params.update({f"{p}.{n}.weight": (h,) for n in norms})
    if arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"):
      params.update({f"{p}.self_attn.{n}.weight": (hd,) for n in ("q_norm", "k_norm")})
  tied = bool(cfg.get("tie_word_embeddings"))
  if arch in GEMMAS and not tied:
    raise VllmRefuses(f"{arch} asserts tie_word_embeddings")
  if not tied:
    params["lm_head.weight"] = (vocab, h)
  return linears, params, PACKED, tied


def _gpt2_model(cfg):
  h, vocab = cfg["n_embd"], cfg["vocab_size"]
  inner = cfg.get("n_inner") or 4 * h
  linears, params = {}, {"transformer.wte.weight": (vocab, h),
                         "transformer.wpe.weight": (cfg["n_positions"], h),
                         "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
  for i in range(cfg["n_layer"]):
    p = f"transformer.h.{i}"
    linears[f"{p}.attn.c_attn"] = Linear((h, h, h), h, True)
    linears[f"{p}.attn.c_proj"] = Linear((h,), h, True)
    linears[f"{p}.mlp.c_fc"] = Linear((inner,), h, True)
    linears[f"{p}.mlp.c_proj"] = Linear((h,), inner, True)
    params.update({f"{p}.{n}.{w}": (h,) for n in ("ln_1", "ln_2") for w in ("weight", "bias")})
  return linears, params, {}, True  # the LM head is transformer.wte itself


# --- the rules ------------------------------------------------------------------------

def quant_config(cfg: dict) -> tuple[str, list]:
  """``Fp8Config.from_config`` and ``__init__``: ``(activation_scheme, ignored_layers)``."""
  qc = cfg.get("quantization_config")
  # "fp8" in quant_method marks serialized FP8; the name itself selects Fp8Config.
  if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
    raise VllmRefuses(f"quantization_config.quant_method must be 'fp8', got {qc!r}")
  scheme = qc.get("activation_scheme")
  if scheme not in ("static", "dynamic"):
    raise VllmRefuses(f"Unsupported activation scheme {scheme}")
  if qc.get("weight_block_size") is not None:
    raise VllmRefuses("weight_block_size selects block scales (weight_scale_inv)")
  ignored = qc.get("ignored_layers") or []
  if not isinstance(ignored, list) or not all(isinstance(n, str) for n in ignored):
    raise VllmRefuses(f"ignored_layers must be a list of module names, got {ignored!r}")
  return scheme, ignored


def is_layer_skipped(prefix: str, ignored: list, packed: dict) -> bool:
  proj = prefix.split(".")[-1]
  if proj not in packed:
    return prefix in ignored
  skipped = {prefix.replace(proj, shard) in ignored for shard in packed[proj]}
  if len(skipped) > 1:
    raise VllmRefuses(f"Detected some but not all shards of {prefix} are quantized."
                      " All shards of fused layers to have the same precision.")
  return skipped.pop()


def checkpoint_name(name: str, arch: str, tied: bool):
  """A checkpoint tensor's ``(vLLM parameter, shard id, transposed)``; None if vLLM skips
  it on purpose (tied LM head, rotary buffers, GPT-2's attention masks)."""
  if arch == "GPT2LMHeadModel":
    if ".attn.bias" in name or ".attn.masked_bias" in name:
      return None
    if name.startswith("lm_head"):  # e7dffa68 loads it into the tied wte, 01768942 skips it
      raise VllmRefuses(f"{name}: GPT-2's LM head is transformer.wte; a copy would replace it")
    if not name.startswith("transformer."):
      name = "transformer." + name
    conv1d = any(c in name for c in ("c_attn", "c_proj", "c_fc")) and name.endswith(".weight")
    return name, None, conv1d
  if tied and name.startswith("lm_head."):
    return None
  if "rotary_emb.inv_freq" in name and arch not in GEMMAS:  # no such skip in gemma*.py
    return None
  if name.endswith((".kv_scale", ".k_scale", ".v_scale")):
    # maybe_remap_kv_scale_name: KV-cache scales (Fp8KVCacheMethod), which the export
    # never writes and this restatement does not model.
    raise VllmRefuses(f"{name}: a KV-cache scale")
  for param, shard, shard_id in STACKED:
    if shard in name:
      return name.replace(shard, param), shard_id, False
  return name, None, False


@dataclasses.dataclass
class Served:
  """What the restatement loaded: quantized / unquantized layer prefixes, the FP8 weights
  as vLLM serves them after ``process_weights_after_loading``, and their scales."""
  quantized: list
  unquantized: list
  weights: dict
  scales: dict


FLOAT = {"F32", "BF16", "F16"}
FP8_MIN = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).min)


def vllm_load(folder: str) -> Served:
  """Loads ``folder`` as vLLM would (see the module docstring); raises VllmRefuses."""
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  scheme, ignored = quant_config(cfg)
  arch = cfg["architectures"][0]
  linears, plain, packed, tied = vllm_model(cfg)
  quantized = {p: not is_layer_skipped(p, ignored, packed) for p in linears}
  # parameter name -> (kind, dtype names, shape, linear prefix)
  params = {n: ("plain", FLOAT, s, None) for n, s in plain.items()}
  for p, lin in linears.items():
    shape = (sum(lin.outs), lin.n_in)
    params[p + ".weight"] = ("weight", {"F8_E4M3"} if quantized[p] else FLOAT, shape, p)
    if lin.bias:
      params[p + ".bias"] = ("bias", FLOAT, (sum(lin.outs),), p)
    if quantized[p]:
      params[p + ".weight_scale"] = ("scale", {"F32"}, (len(lin.outs),), p)
      if scheme == "static":
        params[p + ".input_scale"] = ("scale", {"F32"}, (len(lin.outs),), p)
  data = {n: np.full(spec[2], np.nan, np.float32) if spec[0] == "scale" else None
          for n, spec in params.items()}
  rows = {n: set() for n, spec in params.items() if spec[0] in ("weight", "bias")}
  tensors = {n: a for f in st.weight_files(folder) for n, a in st.iter_tensors(f)}
  for name, arr in tensors.items():
    target = checkpoint_name(name, arch, tied)
    if target is None:
      continue
    pname, shard, transposed = target
    if pname not in params:
      raise VllmRefuses(f"{name}: {arch} has no parameter {pname}")
    kind, dtypes, shape, prefix = params[pname]
    dtype = st.NAMES[arr.dtype]
    if dtype not in dtypes:  # the copy into the parameter casts without a scale
      raise VllmRefuses(f"{name}: {dtype} into a {'/'.join(sorted(dtypes))} parameter")
    arr = arr.T if transposed else arr
    if kind == "plain":
      if tuple(arr.shape) != shape:
        raise VllmRefuses(f"{name}: shape {arr.shape}, {pname} has {shape}")
      data[pname] = arr
      continue
    lin = linears[prefix]
    slots = _slots(lin, shard, pname)
    if kind == "scale":
      if arr.shape not in ((), (1,)):
        raise VllmRefuses(f"{name}: a per-tensor scale has shape () or (1,), got {arr.shape}")
      data[pname][slots] = arr.reshape(())
      continue
    width = sum(lin.outs[s] for s in slots)  # output rows, of a weight or a bias
    if tuple(arr.shape) != (width,) + shape[1:]:
      raise VllmRefuses(f"{name}: shape {arr.shape}, its rows of {pname} {shape} are {width}")
    if data[pname] is None:
      data[pname] = np.zeros(shape, arr.dtype)
    start = sum(lin.outs[: slots[0]])
    data[pname][start: start + width] = arr
    rows[pname].update(slots)
  missing = [n for n, v in data.items()
             if v is None or (params[n][0] == "scale" and np.isnan(v).any())]
  missing += [n for n, done in rows.items() if len(done) < len(linears[params[n][3]].outs)]
  if missing:
    raise VllmRefuses(f"not in the folder (served as uninitialized memory): {sorted(missing)}")
  weights, scales = {}, {}
  for p in (p for p in linears if quantized[p]):
    weights[p], scales[p] = requantize_with_max_scale(
        data[p + ".weight"], data[p + ".weight_scale"], linears[p].outs)
    if weights[p].tobytes() != data[p + ".weight"].tobytes():
      raise VllmRefuses(f"{p}: requantization changes the stored FP8 weights (shard"
                        f" scales {data[p + '.weight_scale'].tolist()})")
  return Served(sorted(p for p in linears if quantized[p]),
                sorted(p for p in linears if not quantized[p]), weights, scales)


def _slots(lin: Linear, shard, pname: str) -> list:
  """The scale slots / logical shards a tensor loads into (``weight_loader_v2``)."""
  if shard is None:
    return list(range(len(lin.outs)))  # fused on disk, or a layer with one shard
  index = {"q": 0, "k": 1, "v": 2}.get(shard, shard)
  if len(lin.outs) == 1 or index >= len(lin.outs):
    raise VllmRefuses(f"{pname}: shard id {shard!r} for a layer of {len(lin.outs)} shards")
  return [index]


def requantize_with_max_scale(weight, scale, outs):
  """``(served e4m3 weight, served scale)``: each shard dequantized in float16 (its scale
  rounded to float16 first, as a float16 tensor times a 0-dim float32 tensor is) and
  quantized again with the largest scale, ``x / scale`` clamped to +-448 and rounded to
  nearest e4m3 (kernels that multiply by ``1 / scale`` differ by at most one float32 ulp,
  which cannot move a value re-rounded with its own scale across an e4m3 boundary)."""
  top = np.float32(scale.max())
  if not scale[-1] > FP8_MIN:
    return weight, top
  out, start = np.empty_like(weight), 0
  for s, width in zip(scale, outs):
    shard = weight[start: start + width]
    dq = shard.astype(np.float16) * np.float16(s)
    q = np.clip(dq.astype(np.float32) / top, -448, 448)
    out[start: start + width] = q.astype(ml_dtypes.float8_e4m3fn)
    start += width
  return out, top


# --- the exports ----------------------------------------------------------------------

def _export(tmp_path, arch, **load_kwargs) -> str:
  lm = models.load(str(FIXTURES / arch), rank=8, **load_kwargs).model
  return export.save_fp8(str(tmp_path / arch), *models.split(lm))


def _assert_served_bytes_are_the_files(folder, served: Served):
  """The weights vLLM serves after requantization are the exported bytes."""
  tensors = {n: a for f in st.weight_files(folder) for n, a in st.iter_tensors(f)}
  for prefix, weight in served.weights.items():
    start = 0
    for name, width in _files_of(prefix, tensors):
      disk = tensors[name + ".weight"]
      disk = disk.T if prefix.startswith("transformer.") else disk
      np.testing.assert_array_equal(weight[start: start + width].view(np.uint8),
                                    disk.view(np.uint8), err_msg=name)
      assert np.float32(tensors[name + ".weight_scale"]) == served.scales[prefix], name
      start += width


def _files_of(prefix, tensors):
  """``[(checkpoint module, rows)]`` that make up the vLLM layer ``prefix``."""
  if prefix.startswith("transformer."):
    return [(prefix, tensors[prefix + ".weight"].shape[1])]  # Conv1D (in, out)
  proj = prefix.split(".")[-1]
  names = [prefix.replace(proj, s) for s in PACKED.get(proj, [proj])]
  return [(n, tensors[n + ".weight"].shape[0]) for n in names]


@needs_fixtures
@pytest.mark.parametrize("arch", ARCHES)
def test_fp8_export_loads_under_vllm_rules(arch, tmp_path):
  """Fully melded (fused groups sharing a scale): every projection FP8, every tensor a
  vLLM parameter, and vLLM serves the exported bytes."""
  folder = _export(tmp_path, arch)
  served = vllm_load(folder)
  assert served.unquantized == []  # every projection melded, none ignored
  assert len(served.quantized) == 4 * json.load(open(os.path.join(folder, "config.json")))[
      "n_layer" if arch == "gpt2" else "num_hidden_layers"]
  _assert_served_bytes_are_the_files(folder, served)


@needs_fixtures
@pytest.mark.parametrize("arch", ARCHES)
def test_mlp_only_meld_loads_under_vllm_rules(arch, tmp_path):
  """Attention left unmelded: its whole groups in ignored_layers, loaded unquantized."""
  folder = _export(tmp_path, arch, targets=r"mlp/")
  served = vllm_load(folder)
  assert served.quantized and all(".mlp." in p for p in served.quantized)
  assert served.unquantized and all(".attn." in p or ".self_attn." in p
                                    for p in served.unquantized)
  _assert_served_bytes_are_the_files(folder, served)


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)


@needs_fixtures
def test_partly_melded_fused_group_refused(tmp_path):
  """REFERENCE melds q and v alone; vLLM would refuse the folder ("some but not all
  shards" of qkv_proj), so save_fp8 does, before writing anything."""
  lm = models.load(str(FIXTURES / "llama3"), rank=8, options=falqon_jax.REFERENCE,
                   targets=r"self_attn/(q|v)_proj").model
  with pytest.raises(UserInputError, match=r"k_proj.*whole group") as excinfo:
    export.save_fp8(str(tmp_path / "qv"), *models.split(lm))
  _one_line(excinfo)
  assert not os.path.exists(tmp_path / "qv")


@needs_fixtures
def test_fused_group_with_unshared_scales_refused(tmp_path):
  """REFERENCE gives q/k/v their own scales; vLLM would requantize the fused qkv_proj to
  the largest, changing the trained bytes, so save_fp8 refuses."""
  lm = models.load(str(FIXTURES / "qwen3"), rank=8, options=falqon_jax.REFERENCE).model
  with pytest.raises(UserInputError, match=r"different FP8 scales.*fused_groups=True") as e:
    export.save_fp8(str(tmp_path / "ref"), *models.split(lm))
  _one_line(e)
  assert not os.path.exists(tmp_path / "ref")


@needs_fixtures
def test_melded_lm_head_refused(tmp_path):
  """vLLM's LM head (a ParallelLMHead) is never FP8: its weight would be cast without the
  scale, and the scale has no parameter to load into, so save_fp8 refuses."""
  lm = models.load(str(FIXTURES / "llama3"), rank=8, targets=r"lm_head|mlp/").model
  with pytest.raises(UserInputError, match=r"lm_head is melded.*leave lm_head out") as e:
    export.save_fp8(str(tmp_path / "head"), *models.split(lm))
  _one_line(e)
  assert not os.path.exists(tmp_path / "head")


# --- the restatement catches what vLLM refuses or changes -----------------------------

def _rename(tensors, cfg):
  tensors["model.layers.0.self_attn.q_prj.weight"] = tensors.pop(
      "model.layers.0.self_attn.q_proj.weight")


def _float32_weight(tensors, cfg):
  name = "model.layers.1.mlp.down_proj.weight"
  tensors[name] = tensors[name].astype(np.float32)


def _half_group_ignored(tensors, cfg):
  cfg["quantization_config"]["ignored_layers"] = ["model.layers.0.self_attn.k_proj"]


def _unshared_scale(tensors, cfg):
  name = "model.layers.0.mlp.up_proj.weight_scale"
  tensors[name] = tensors[name] * np.float32(1.5)


def _missing_scale(tensors, cfg):
  del tensors["model.layers.1.self_attn.o_proj.weight_scale"]


BREAKS = {
    "renamed tensor": (_rename, "has no parameter"),
    "float32 weight": (_float32_weight, "F32 into a F8_E4M3 parameter"),
    "half a fused group ignored": (_half_group_ignored, "some but not all shards"),
    "unshared scale in a fused group": (_unshared_scale, "requantization changes"),
    "missing scale": (_missing_scale, "not in the folder"),
}


@needs_fixtures
@pytest.mark.parametrize("case", sorted(BREAKS))
def test_restatement_catches_a_broken_folder(case, tmp_path):
  folder = _export(tmp_path, "llama3")
  vllm_load(folder)  # intact: loads
  path = os.path.join(folder, "model.safetensors")
  tensors = {n: np.array(a) for n, a in st.iter_tensors(path)}  # copies: path is rewritten
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  breaks, message = BREAKS[case]
  breaks(tensors, cfg)
  st.save_file(tensors, path, {"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(VllmRefuses, match=message):
    vllm_load(folder)
