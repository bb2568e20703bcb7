"""falqon_jax.export: FP8 (vLLM fp8 format) and bf16 exports, reloaded with our loader."""

import json
import os

import pytest

pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
import numpy as np

import falqon_jax
import falqon_jax.hf as fh
from falqon_jax import export
from falqon_jax import linen as fl
from falqon_jax import _safetensors as st

IDS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7 % 256


def _melded(model_type):
  model = fh.build_model(fh.tiny_config(model_type))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
  melded, _ = fh.meld_params(model, params, rank=16)
  # Make the backbone differ from the meld: random deltas merged as a proxy step would.
  keys = iter(jax.random.split(jax.random.key(1), 64))

  def merged(mk):
    mk = mk.replace(delta=0.05 * jax.random.normal(next(keys), mk.delta.shape))
    return falqon_jax.merge_top_k(mk, mk.rank)

  melded = jax.tree.map(lambda x: merged(x) if fl.is_melded(x) else x, melded,
                        is_leaf=fl.is_melded)
  return model, melded


@pytest.fixture(scope="module")
def llama():
  return _melded("llama")


def _logits(model, *trees):
  """Logits of each param tree, all from one executable: compiled once, called on each."""
  run = jax.jit(fl.melded_fn(lambda p: model(IDS, params=p).logits))
  compiled = run.lower(trees[0]).compile()  # refuses a tree of other structure or dtypes
  return [np.asarray(compiled(t)) for t in trees]


def _fp8_view(params):
  """The trained params as save_fp8 stores them: melded kernels keep their backbone rows."""

  def backbone_only(mk):
    return mk.replace(qweight=mk.qweight[: mk.out_features], delta=mk.delta[:, :0], rank=0)

  return jax.tree.map(lambda x: backbone_only(x) if fl.is_melded(x) else x, params,
                      is_leaf=fl.is_melded)


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
  ignore = ("quantization_config", "torch_dtype", "dtype")  # what the export sets
  assert ({k: v for k, v in loaded.model.config.to_dict().items() if k not in ignore}
          == {k: v for k, v in model.config.to_dict().items() if k not in ignore})


def _assert_reloads_exactly(model, params, loaded):
  view = _fp8_view(params)
  _assert_same_bytes(loaded.params, view)
  _assert_same_config(model, loaded)
  # One executable on inputs equal byte for byte (scales as their reciprocals, which IEEE
  # division rounds exactly), so the logits are bit-identical. The rank-16 original runs a
  # wider GEMM, whose summation order may differ by an ulp, so it is not compared.
  got, want = _logits(loaded.model, loaded.params, view)
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_fp8_export_format_and_exact_reload(llama, tmp_path):
  model, params = llama
  out = export.save_fp8(str(tmp_path / "fp8"), model, params)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["quantization_config"] == {
      "quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": []}
  header = st.read_header(os.path.join(out, "model.safetensors"))
  q = header["model.layers.0.self_attn.q_proj.weight"]
  assert q["dtype"] == "F8_E4M3" and q["shape"] == [64, 64]  # (out, in), A rows dropped
  s = header["model.layers.0.self_attn.q_proj.weight_scale"]
  assert s["dtype"] == "F32" and s["shape"] == []
  assert header["lm_head.weight"]["dtype"] == "F32"
  assert header["model.layers.0.input_layernorm.weight"]["shape"] == [64]
  # the weight_scale is the dequant multiplier: W = weight * weight_scale
  mk = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  tensors = dict(st.iter_tensors(os.path.join(out, "model.safetensors")))
  w = tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
  w = w * tensors["model.layers.0.self_attn.q_proj.weight_scale"]
  np.testing.assert_allclose(w.T, mk.backbone(), rtol=1e-6)
  _assert_reloads_exactly(model, params, fh.load(out))


@pytest.mark.slow
def test_bf16_export_reloads_within_bf16_rounding(llama, tmp_path):
  model, params = llama
  out = export.save_bf16(str(tmp_path / "bf16"), model, params, max_shard_bytes=40_000)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  loaded = fh.load(out)
  leaf = loaded.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert leaf.dtype == jnp.bfloat16
  want = np.asarray(jax.jit(lambda p: model(IDS, params=p).logits)(falqon_jax.unmeld(params)))
  got = np.asarray(jax.jit(lambda p: loaded.model(IDS, params=p).logits)(loaded.params))
  scale = np.abs(want).max()
  # bf16 moves each weight by at most 2^-9 relative; to first order these add up along a
  # token's path: embedding, 2 layers of 2 norms + 7 kernels, final norm, head (21 tensors).
  assert np.abs(got.astype(np.float32) - want).max() < 21 * 2.0**-9 * scale


@pytest.fixture(scope="module")
def gpt2():
  return _melded("gpt2")


@pytest.mark.slow
def test_gpt2_fp8_export_keeps_conv1d_layout_and_reloads_exactly(gpt2, tmp_path):
  model, params = gpt2
  out = export.save_fp8(str(tmp_path / "g8"), model, params)
  header = st.read_header(os.path.join(out, "model.safetensors"))
  tensors = dict(st.iter_tensors(os.path.join(out, "model.safetensors")))
  for module, (n_in, n_out) in {"attn.c_attn": (64, 192), "attn.c_proj": (64, 64),
                                "mlp.c_fc": (64, 256), "mlp.c_proj": (256, 64)}.items():
    name = f"transformer.h.0.{module}"
    # HF's Conv1D layout (in, out), which vLLM's GPT-2 loader transposes to (out, in).
    assert header[name + ".weight"]["dtype"] == "F8_E4M3"
    assert header[name + ".weight"]["shape"] == [n_in, n_out]
    assert header[name + ".weight_scale"]["shape"] == []
    mk = params["transformer"]["h"]["0"]
    for part in module.split("."):
      mk = mk[part]
    mk = mk["kernel"]
    w = tensors[name + ".weight"].astype(np.float32) * tensors[name + ".weight_scale"]
    np.testing.assert_allclose(w.T, mk.backbone(), rtol=1e-6)  # backbone: (out, in)
  assert header["transformer.h.0.attn.c_attn.bias"]["dtype"] == "F32"
  loaded = fh.load(out)
  kernel = loaded.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert isinstance(kernel, fl.TransposedMeldedKernel) and kernel.rank == 0
  _assert_reloads_exactly(model, params, loaded)


@pytest.mark.slow
def test_gpt2_bf16_export_round_trip(gpt2, tmp_path):
  model, params = gpt2
  out = export.save_bf16(str(tmp_path / "g"), model, params, dtype=jnp.float32)
  loaded = fh.load(out)
  dense = falqon_jax.unmeld(params)
  _assert_same_bytes(loaded.params, dense)  # f32 holds the dequantized FP8 exactly
  _assert_same_config(model, loaded)
  got, want = _logits(loaded.model, loaded.params, dense)  # one executable, same bytes
  np.testing.assert_array_equal(got, want)


def test_existing_target_is_refused_and_tokenizer_copied(llama, tmp_path):
  model, params = llama
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


def test_interrupted_export_leaves_no_folder(llama, tmp_path, monkeypatch):
  model, params = llama

  def boom(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(st, "save_file", boom)
  with pytest.raises(KeyboardInterrupt):
    export.save_fp8(str(tmp_path / "x"), model, params)
  assert os.listdir(tmp_path) == []


def test_row_scaling_refused_by_fp8(tmp_path):
  model = fh.build_model(fh.tiny_config("llama"))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
  params, _ = fh.meld_params(model, params, rank=16, scaling="row")
  with pytest.raises(ValueError, match="per-tensor only"):
    export.save_fp8(str(tmp_path / "r"), model, params)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_fp8_export_round_trip_other_families(family, tmp_path):
  """Llama and GPT-2 are covered in detail above; the others must round-trip exactly too."""
  model, params = _melded(family)
  loaded = fh.load(export.save_fp8(str(tmp_path / family), model, params))
  melded = [k for k in jax.tree.leaves(loaded.params, is_leaf=fl.is_melded) if fl.is_melded(k)]
  assert len(melded) == 14 and all(k.rank == 0 for k in melded)  # 7 per layer, A dropped
  _assert_reloads_exactly(model, params, loaded)
