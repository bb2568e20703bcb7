"""falqon_jax.export: FP8 (vLLM fp8 format) and bf16 exports of every family, reloaded
with ``models.load``."""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import falqon_jax
from falqon_jax import export, models
from falqon_jax import nnx as fnnx
from falqon_jax import _safetensors as st
from falqon_jax._melded_kernel import MeldedKernel

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-tiny"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"hf-tiny fixtures not found at {FIXTURES} (CI puts ../shared beside the clone)",
)
# The fixture of each family (tiny_config where the fixtures are absent).
ARCH = {"llama": "llama3", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
        "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2"}
FAMILIES = list(ARCH)
# Longer than the fixtures' sliding window (8), so local layers differ from global ones.
IDS = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) * 7 % 256


def _is_melded(x):
  return isinstance(x, MeldedKernel)


def _meld_and_train(lm):
  """``(Functional, params)`` of ``lm`` melded at rank 16, with random deltas merged as a
  proxy step would, so the backbone differs from the meld."""
  model, params = models.split(lm)
  keys = iter(jax.random.split(jax.random.key(1), 64))

  def merged(mk):
    mk = mk.replace(delta=0.05 * jax.random.normal(next(keys), mk.delta.shape))
    return falqon_jax.merge_top_k(mk, mk.rank)

  return model, jax.tree.map(lambda x: merged(x) if _is_melded(x) else x, params,
                             is_leaf=_is_melded)


@functools.lru_cache(maxsize=None)
def _melded(family):
  folder = FIXTURES / ARCH[family]
  if folder.is_dir():
    lm = models.load(str(folder), rank=16).model
  else:
    lm = models.CausalLM(models.tiny_config(family), rngs=nnx.Rngs(0))
    fnnx.meld(lm, rank=16)
  return _meld_and_train(lm)


@functools.lru_cache(maxsize=None)
def _tiny(model_type="llama", **meld_kwargs):
  lm = models.CausalLM(models.tiny_config(model_type), rngs=nnx.Rngs(0))
  fnnx.meld(lm, rank=16, **meld_kwargs)
  return _meld_and_train(lm)


def _logits(model, *trees):
  """Logits of each param tree, all from one executable: compiled once, called on each."""
  run = jax.jit(lambda p: model.apply(p, IDS))
  compiled = run.lower(trees[0]).compile()  # refuses a tree of other structure or dtypes
  return [np.asarray(compiled(t)) for t in trees]


def _fp8_view(params):
  """The trained params as save_fp8 stores them: melded kernels keep their backbone rows."""

  def backbone_only(mk):
    return mk.replace(qweight=mk.qweight[: mk.out_features], delta=mk.delta[:, :0], rank=0)

  return jax.tree.map(lambda x: backbone_only(x) if _is_melded(x) else x, params,
                      is_leaf=_is_melded)


def _assert_same_bytes(got, want):
  """Same tree, kernel types and static fields, dtypes, shapes and bytes."""
  (g, gdef), (w, wdef) = (jax.tree_util.tree_flatten_with_path(t) for t in (got, want))
  assert gdef == wdef
  for (path, a), (_, b) in zip(g, w):
    a, b = np.asarray(a), np.asarray(b)
    if getattr(path[-1], "name", None) == "scale":
      # The file holds weight_scale = 1 / scale and the loader picks a scale with exactly
      # that f32 reciprocal, which is all the melded forward reads of it.
      a, b = np.float32(1) / a, np.float32(1) / b
    where = jax.tree_util.keystr(path)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), where
    assert a.tobytes() == b.tobytes(), where


def _assert_same_config(model, loaded):
  assert loaded.config == model.config
  ignore = ("quantization_config", "torch_dtype", "dtype")  # what the export sets
  strip = lambda d: {k: v for k, v in d.items() if k not in ignore}
  assert strip(loaded.config.to_hf()) == strip(model.config.to_hf())


def _tensors(folder) -> dict:
  return {name: arr for f in st.weight_files(str(folder)) for name, arr in st.iter_tensors(f)}


def _split_loaded(folder, **kwargs):
  loaded = models.load(str(folder), **kwargs)
  return loaded, *models.split(loaded.model)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_export_in_float32_reloads_exactly(family, tmp_path):
  model, params = _melded(family)
  out = export.save_bf16(str(tmp_path / family), model, params, dtype=None)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["torch_dtype"] == config.get("dtype", "float32") == "float32"
  assert "quantization_config" not in config
  if (FIXTURES / ARCH[family]).is_dir():  # transformers' names: same tensors, new values
    fixture = _tensors(FIXTURES / ARCH[family])
    got = _tensors(out)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in fixture.items()}
  loaded, lmodel, lparams = _split_loaded(out)
  dense = falqon_jax.unmeld(params)  # f32 holds the dequantized FP8 exactly
  _assert_same_bytes(lparams, dense)
  _assert_same_config(model, loaded)
  got, want = _logits(lmodel, lparams, dense)  # one executable, same bytes
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_export_reloads_exactly(family, tmp_path):
  model, params = _melded(family)
  out = export.save_fp8(str(tmp_path / family), model, params)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["quantization_config"] == {
      "quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": []}
  loaded, lmodel, lparams = _split_loaded(out)
  melded = [k for k in jax.tree.leaves(lparams, is_leaf=_is_melded) if _is_melded(k)]
  assert len(melded) == 2 * (7 if family != "gpt2" else 4)  # every projection, A dropped
  assert all(k.rank == 0 for k in melded)
  view = _fp8_view(params)
  _assert_same_bytes(lparams, view)
  _assert_same_config(model, loaded)
  # One executable on inputs equal byte for byte (scales as their reciprocals, which IEEE
  # division rounds exactly), so the logits are bit-identical. The rank-16 original runs a
  # wider GEMM, whose f32 sums may round differently and then flip an FP8 rounding of the
  # next layer's input, so it is not compared.
  got, want = _logits(lmodel, lparams, view)
  np.testing.assert_array_equal(got, want)


@needs_fixtures
@pytest.mark.parametrize("arch", [*ARCH.values(), "llama3_tied"])
def test_export_writes_what_transformers_writes(arch, tmp_path):
  """An unmelded fixture exported in float32 gives back transformers' own file: every
  tensor name (GPT-2's ``transformer.`` prefix, no ``lm_head`` when tied), layout and byte,
  and its config.json."""
  model, params = models.split(models.load(str(FIXTURES / arch)).model)
  out = export.save_bf16(str(tmp_path / arch), model, params, dtype=None)
  got, want = _tensors(out), _tensors(FIXTURES / arch)
  assert sorted(got) == sorted(want)
  for name, arr in want.items():
    assert (got[name].dtype, got[name].shape) == (arr.dtype, arr.shape), name
    assert got[name].tobytes() == arr.tobytes(), name
  config = json.load(open(os.path.join(out, "config.json")))
  assert config.pop("torch_dtype") == "float32"
  assert config == json.loads((FIXTURES / arch / "config.json").read_text())


def test_fp8_export_format(tmp_path):
  model, params = _tiny("llama")
  out = export.save_fp8(str(tmp_path / "fp8"), model, params)
  header = st.read_header(os.path.join(out, "model.safetensors"))
  q = header["model.layers.0.self_attn.q_proj.weight"]
  assert q["dtype"] == "F8_E4M3" and q["shape"] == [64, 64]  # (out, in), A rows dropped
  k = header["model.layers.0.self_attn.k_proj.weight"]
  assert k["dtype"] == "F8_E4M3" and k["shape"] == [32, 64]
  s = header["model.layers.0.self_attn.q_proj.weight_scale"]
  assert s["dtype"] == "F32" and s["shape"] == []
  assert header["lm_head.weight"]["dtype"] == "F32"
  assert header["lm_head.weight"]["shape"] == [256, 64]  # torch's (out, in)
  assert header["model.layers.0.input_layernorm.weight"]["shape"] == [64]
  # the weight_scale is the dequant multiplier: W = weight * weight_scale
  mk = params["layers"][0]["self_attn"]["k_proj"]["kernel"]
  tensors = _tensors(out)
  w = tensors["model.layers.0.self_attn.k_proj.weight"].astype(np.float32)
  w = w * tensors["model.layers.0.self_attn.k_proj.weight_scale"]
  np.testing.assert_allclose(w.T, mk.backbone(), rtol=1e-6)


def test_fp8_export_lists_unmelded_projections_as_ignored(tmp_path):
  model, params = _tiny("llama", targets=r"self_attn/(q|k|v)_proj")  # whole fused groups
  out = export.save_fp8(str(tmp_path / "q"), model, params, dtype=jnp.bfloat16)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["torch_dtype"] == "bfloat16"
  ignored = config["quantization_config"]["ignored_layers"]
  assert sorted(ignored) == sorted(
      f"model.layers.{i}.{m}" for i in range(2) for m in (
          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
  header = st.read_header(os.path.join(out, "model.safetensors"))
  assert header["model.layers.1.self_attn.q_proj.weight"]["dtype"] == "F8_E4M3"
  assert header["model.layers.1.self_attn.o_proj.weight"]["dtype"] == "BF16"
  _, _, lparams = _split_loaded(out)
  assert _is_melded(lparams["layers"][1]["self_attn"]["q_proj"]["kernel"])
  assert not _is_melded(lparams["layers"][1]["self_attn"]["o_proj"]["kernel"])


def test_gpt2_fp8_export_keeps_conv1d_layout(tmp_path):
  model, params = _tiny("gpt2")
  out = export.save_fp8(str(tmp_path / "g8"), model, params)
  header = st.read_header(os.path.join(out, "model.safetensors"))
  tensors = _tensors(out)
  for module, (n_in, n_out) in {"attn.c_attn": (64, 192), "attn.c_proj": (64, 64),
                                "mlp.c_fc": (64, 256), "mlp.c_proj": (256, 64)}.items():
    name = f"transformer.h.0.{module}"
    # HF's Conv1D layout (in, out), which vLLM's GPT-2 loader transposes to (out, in).
    assert header[name + ".weight"]["dtype"] == "F8_E4M3"
    assert header[name + ".weight"]["shape"] == [n_in, n_out]
    assert header[name + ".weight_scale"]["shape"] == []
    part, proj = module.split(".")
    mk = params["layers"][0][{"attn": "self_attn", "mlp": "mlp"}[part]][proj]["kernel"]
    w = tensors[name + ".weight"].astype(np.float32) * tensors[name + ".weight_scale"]
    np.testing.assert_array_equal(w, np.asarray(mk.backbone()))  # backbone: (in, out)
  assert header["transformer.h.0.attn.c_attn.bias"]["dtype"] == "F32"
  assert "lm_head.weight" not in header  # tied to transformer.wte


def test_bf16_export_is_the_bf16_rounding_in_shards(tmp_path):
  lm = models.CausalLM(models.tiny_config("llama", dtype="float32"), rngs=nnx.Rngs(0))
  fnnx.meld(lm, rank=16)
  model, params = _meld_and_train(lm)
  out = export.save_bf16(str(tmp_path / "bf16"), model, params, max_shard_bytes=40_000)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  assert {a.dtype for a in _tensors(out).values()} == {jnp.dtype(jnp.bfloat16)}
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["torch_dtype"] == config["dtype"] == "bfloat16"  # no stale float32 left
  _, lmodel, lparams = _split_loaded(out)  # bf16 -> float32 is exact
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                         falqon_jax.unmeld(params))
  _assert_same_bytes(lparams, rounded)
  got, want = _logits(lmodel, lparams, rounded)
  np.testing.assert_array_equal(got, want)


def test_existing_target_is_refused_and_tokenizer_copied(tmp_path):
  model, params = _tiny("llama")
  target = str(tmp_path / "m")
  export.save_fp8(target, model, params)
  with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
    export.save_fp8(target, model, params)
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text("{}")
  export.save_bf16(target, model, params, overwrite=True, tokenizer=str(tok))
  assert os.path.isfile(os.path.join(target, "tokenizer.json"))
  assert "quantization_config" not in json.load(open(os.path.join(target, "config.json")))
  leftovers = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
  assert leftovers == []


def test_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
  model, params = _tiny("llama")

  def boom(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(st, "save_file", boom)
  with pytest.raises(KeyboardInterrupt):
    export.save_fp8(str(tmp_path / "x"), model, params)
  assert os.listdir(tmp_path) == []


def test_row_scaling_refused_by_fp8(tmp_path):
  model, params = _tiny("llama", scaling="row")
  with pytest.raises(ValueError, match="per-tensor only"):
    export.save_fp8(str(tmp_path / "r"), model, params)
  assert not os.path.exists(tmp_path / "r")


def test_unmelded_params_refused_by_fp8(tmp_path):
  model, params = models.split(models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no MeldedKernel; meld first or use save_bf16"):
    export.save_fp8(str(tmp_path / "p"), model, params)
  assert not os.path.exists(tmp_path / "p")


@pytest.mark.parametrize("save", [export.save_fp8, export.save_bf16])
def test_a_model_that_is_not_a_functional_is_refused_in_one_line(save, tmp_path):
  lm = models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0))
  _, params = models.split(lm)
  with pytest.raises(TypeError) as e:
    save(str(tmp_path / "x"), lm, params)
  msg = str(e.value)
  assert "\n" not in msg and "models.Functional" in msg and "models.split" in msg
  assert not os.path.exists(tmp_path / "x")


def _vllm_requantize(tensors, names):
  """vLLM's ``requantize_with_max_scale`` on one fused group: every shard dequantized with
  its own ``weight_scale`` (in float16, as ``per_tensor_dequantize`` does) and quantized
  again with the group's largest (``scaled_fp8_quant``: ``x / scale`` in float32)."""
  top = max(float(tensors[n + ".weight_scale"]) for n in names)
  out = {}
  for n in names:
    dq = tensors[n + ".weight"].astype(np.float16) * np.float16(tensors[n + ".weight_scale"])
    q = np.clip(dq.astype(np.float32) / np.float32(top), -448, 448)
    out[n] = q.astype(jnp.float8_e4m3fn)
  return out


@needs_fixtures
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_fp8_export_is_what_vllm_serves_for_fused_groups(tmp_path, family):
  model, params = _melded(family)  # melded while loading, then merged
  tensors = _tensors(export.save_fp8(str(tmp_path / family), model, params))
  for i in range(model.config.num_layers):
    for names in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  ("mlp.gate_proj", "mlp.up_proj")):
      names = [f"model.layers.{i}.{n}" for n in names]
      assert len({float(tensors[n + ".weight_scale"]) for n in names}) == 1
      served = _vllm_requantize(tensors, names)
      for n in names:  # the max-scale requantization is the identity: the trained bytes
        np.testing.assert_array_equal(served[n].view(np.uint8),
                                      tensors[n + ".weight"].view(np.uint8))


def _pending(live_delta=True):
  """A tiny llama melded with live deltas, each holding a random pending update."""
  lm = models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0))
  fnnx.meld(lm, rank=16, live_delta=live_delta)
  model, params = models.split(lm)
  keys = iter(jax.random.split(jax.random.key(2), 64))
  return model, jax.tree.map(
      lambda x: x.replace(delta=0.05 * jax.random.normal(next(keys), x.delta.shape))
      if _is_melded(x) else x, params, is_leaf=_is_melded)


def test_live_delta_bf16_export_is_w_plus_ba(tmp_path):
  """The forward of a live-delta kernel uses W + BA, so the dequantized export holds it."""
  model, pending = _pending()
  fold = lambda mk: mk.backbone() + (np.asarray(mk.delta, np.float64)
                                     @ np.asarray(mk.lora_a(), np.float64)).T
  dense = jax.tree.map(lambda x: jnp.asarray(fold(x), jnp.float32) if _is_melded(x) else x,
                       pending, is_leaf=_is_melded)
  unfolded = jax.tree.map(lambda x: x.backbone() if _is_melded(x) else x, pending,
                          is_leaf=_is_melded)
  export.save_bf16(str(tmp_path / "out"), model, pending, dtype=jnp.float32)
  _, reloaded_model, reloaded = _split_loaded(tmp_path / "out")
  want, got, without = _logits(reloaded_model, dense, reloaded, unfolded)
  # Same f32 program on weights equal up to the f32 rounding of the fold.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert np.abs(without - want).max() > 0.1  # leaving BA out would fail


def test_live_delta_fp8_export_merges_every_row_to_nearest(tmp_path):
  """The FP8 export of a live-delta kernel is e4m3(raw W + delta @ raw A), clamped:
  every pending row merged once, to nearest, against a float64 oracle."""
  model, pending = _pending()
  export.save_fp8(str(tmp_path / "out"), model, pending)
  tensors = _tensors(tmp_path / "out")
  mk = pending["layers"][0]["self_attn"]["q_proj"]["kernel"]
  raw = np.asarray(mk.qweight).astype(np.float64)
  want = np.clip(raw[: mk.out_features] + np.asarray(mk.delta, np.float64) @ raw[mk.out_features:],
                 -448, 448)
  want = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.float8_e4m3fn)).view(np.uint8)
  got = tensors["model.layers.0.self_attn.q_proj.weight"].view(np.uint8)
  # The f32 product can sit on the other side of a rounding tie than float64's: rare.
  assert np.mean(got == want) > 0.999
  assert np.mean(got == np.asarray(mk.qweight[: mk.out_features]).view(np.uint8)) < 0.9
  # A kernel whose forward ignores its delta exports its backbone rows as they are.
  model, plain = _pending(live_delta=False)
  export.save_fp8(str(tmp_path / "plain"), model, plain)
  mk = plain["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert (_tensors(tmp_path / "plain")["model.layers.0.self_attn.q_proj.weight"].tobytes()
          == np.asarray(mk.qweight[: mk.out_features]).tobytes())
