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
from falqon_jax.hf import _safetensors as st

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


def _logits(model, params):
  @jax.jit
  def run(p):
    with fl.melded():
      return model(IDS, params=p).logits

  return np.asarray(run(params))


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
  loaded = fh.load(out)
  np.testing.assert_array_equal(_logits(loaded.model, loaded.params), _logits(model, params))


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
  assert np.abs(got.astype(np.float32) - want).max() < 3e-2 * scale


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
  np.testing.assert_array_equal(_logits(loaded.model, loaded.params), _logits(model, params))


@pytest.mark.slow
def test_gpt2_bf16_export_round_trip(gpt2, tmp_path):
  model, params = gpt2
  out = export.save_bf16(str(tmp_path / "g"), model, params, dtype=jnp.float32)
  loaded = fh.load(out)
  want = jax.jit(lambda p: model(IDS, params=p).logits)(falqon_jax.unmeld(params))
  got = jax.jit(lambda p: loaded.model(IDS, params=p).logits)(loaded.params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_existing_target_is_refused_and_tokenizer_copied(llama, tmp_path):
  model, params = llama
  target = str(tmp_path / "m")
  export.save_fp8(target, model, params)
  with pytest.raises(FileExistsError, match="already holds a model .*overwrite=True"):
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
  np.testing.assert_array_equal(_logits(loaded.model, loaded.params), _logits(model, params))
