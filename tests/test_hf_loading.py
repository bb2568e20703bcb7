"""falqon_jax.hf.load: local HF folders (safetensors, sharded, msgpack) without torch."""

import json
import os

import pytest

pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict

import falqon_jax
import falqon_jax.hf as fh
from falqon_jax import _safetensors as st

FAMILIES = ["llama", "mistral", "gemma", "gpt2"]


def _init(model_type, **overrides):
  model = fh.build_model(fh.tiny_config(model_type, **overrides))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
  return model, params


def _torch_state_dict(model_type, params, dtype=np.float32):
  """What transformers' PyTorch save_pretrained writes: nn.Linear weights (out, in),
  GPT-2 Conv1D weights (in, out) with no 'transformer.' prefix, plus GPT-2's buffers."""
  sd = {}
  for path, v in flatten_dict(params).items():
    *mods, leaf = path
    v = np.asarray(v)
    if leaf == "kernel":
      v = v.T
    name = ".".join([*mods, {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)])
    if model_type == "gpt2":
      name = name.removeprefix("transformer.")
    sd[name] = v.astype(dtype)
  if model_type == "gpt2":
    sd["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.bool_))
  return sd


def _write(folder, config, sd, shards=1):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  names = sorted(sd)
  if shards == 1:
    st.save_file(sd, os.path.join(folder, "model.safetensors"))
    return folder
  weight_map = {}
  for i in range(shards):
    fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: sd[n] for n in names[i::shards]}
    st.save_file(part, os.path.join(folder, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  model, params = _init(request.param)
  return request.param, model, params


def test_names_are_hf_names(family):
  name, _, params = family
  sd = _torch_state_dict(name, params)
  if name == "gpt2":
    assert sd["h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    assert "wte.weight" in sd and "ln_f.bias" in sd
  else:
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)  # (out, in)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert "model.embed_tokens.weight" in sd and "model.norm.weight" in sd


def test_safetensors_checkpoint_loads_exactly(family, tmp_path):
  name, model, params = family
  folder = _write(str(tmp_path / name), model.config, _torch_state_dict(name, params), shards=3)
  loaded = fh.load(folder)
  assert type(loaded.model) is type(model) and loaded.report is None
  got, want = flatten_dict(loaded.params), flatten_dict(params)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


@pytest.mark.slow
def test_load_melds_layer_by_layer(family, tmp_path):
  name, model, params = family
  folder = _write(str(tmp_path / name), model.config, _torch_state_dict(name, params))
  loaded = fh.load(folder, rank=16)
  want, want_report = fh.meld_params(model, params, rank=16)
  assert sorted(m.path for m in loaded.report.melded) == sorted(m.path for m in want_report.melded)
  is_mk = lambda x: isinstance(x, falqon_jax.MeldedKernel)
  got_l = jax.tree_util.tree_leaves(loaded.params, is_leaf=is_mk)
  want_l = jax.tree_util.tree_leaves(want, is_leaf=is_mk)
  assert len(got_l) == len(want_l)
  for a, b in zip(got_l, want_l):
    assert type(a) is type(b)
    if is_mk(a):
      np.testing.assert_array_equal(np.asarray(a.qweight, np.float32), np.asarray(b.qweight, np.float32))


def test_bf16_checkpoint_and_tied_lm_head(tmp_path):
  model, params = _init("llama", tie_word_embeddings=True)
  sd = _torch_state_dict("llama", params, ml_dtypes.bfloat16)
  del sd["lm_head.weight"]
  loaded = fh.load(_write(str(tmp_path / "t"), model.config, sd))
  emb = loaded.params["model"]["embed_tokens"]["embedding"]
  assert emb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded.params["lm_head"]["kernel"], emb.T)
  f32 = fh.load(str(tmp_path / "t"), param_dtype=jnp.float32)
  assert f32.params["model"]["norm"]["weight"].dtype == jnp.float32


@pytest.mark.slow
def test_flax_msgpack_folder(tmp_path):
  model, params = _init("mistral")
  model.save_pretrained(str(tmp_path / "m"), params=params)
  loaded = fh.load(str(tmp_path / "m"), rank=16)
  assert len(loaded.report.melded) == 14
  np.testing.assert_array_equal(
      loaded.params["model"]["norm"]["weight"], params["model"]["norm"]["weight"])


@pytest.fixture(scope="module")
def llama_sd():
  model, params = _init("llama")
  return model.config, _torch_state_dict("llama", params)


def test_error_no_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    fh.load(str(tmp_path))


def test_error_no_weights(tmp_path, llama_sd):
  config, _ = llama_sd
  folder = _write(str(tmp_path / "w"), config, {"x": np.zeros(1, np.float32)})
  os.remove(os.path.join(folder, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"no weights \(\*\.safetensors"):
    fh.load(folder)


def test_error_unsupported_architecture(tmp_path):
  os.makedirs(tmp_path / "b")
  (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="unsupported model_type 'bert'; supported: gemma, gpt2, llama, mistral"):
    fh.load(str(tmp_path / "b"))


def test_error_missing_tensor(tmp_path, llama_sd):
  config, sd = llama_sd
  sd = dict(sd)
  del sd["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    fh.load(_write(str(tmp_path / "m"), config, sd))


def test_error_wrong_shape(tmp_path, llama_sd):
  config, sd = llama_sd
  sd = dict(sd, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has shape \(64, 32\), expected \(64, 64\)"):
    fh.load(_write(str(tmp_path / "s"), config, sd))


def test_error_unexpected_tensor_and_missing_shard(tmp_path, llama_sd):
  config, sd = llama_sd
  with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
    fh.load(_write(str(tmp_path / "u"), config, dict(sd, **{"model.extra.weight": np.zeros(2, np.float32)})))
  folder = _write(str(tmp_path / "sh"), config, sd, shards=2)
  os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
  with pytest.raises(FileNotFoundError, match="lists shard 'model-00002-of-00002.safetensors'"):
    fh.load(folder)
