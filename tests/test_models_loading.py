"""falqon_jax.models.load: what lands where, stored dtypes and layouts, FP8 checkpoints, and
the one-line errors of folders it cannot load (the logits are in test_models.py)."""

import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx, serialization

from falqon_jax import models
from falqon_jax import nnx as fnnx
from falqon_jax import _safetensors as st
from falqon_jax.errors import UserInputError

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-tiny"
ARCHS = ["llama3", "llama3_tied", "llama3_sharded", "mistral", "qwen2", "qwen3", "gemma",
         "gemma2", "gemma3", "gpt2"]
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"hf-tiny fixtures not found at {FIXTURES} (CI puts ../shared beside the clone)",
)


def _one_line_error(fn, *needles, error=UserInputError):
  with pytest.raises(error) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  for n in needles:
    assert n in msg, msg
  return msg


def _file_tensors(folder) -> dict:
  """Copies, not memmaps: some tests rewrite the file they came from."""
  return {name: np.array(arr)
          for f in st.weight_files(str(folder)) for name, arr in st.iter_tensors(f)}


def _variables(loaded) -> dict:
  """``{HF name: value in the checkpoint's layout}`` of every variable of the loaded model."""
  out = {}
  for path, var in nnx.iter_graph(loaded.model):
    if isinstance(var, nnx.Variable):
      name, transposed = models.hf_name(loaded.config, path)
      value = np.asarray(var.get_value())
      out[name] = value.T if transposed else value
  return out


def _write(folder, config: dict, tensors: dict) -> str:
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(config))
  st.save_file(tensors, str(folder / "model.safetensors"))
  return str(folder)


def _config(arch) -> dict:
  return json.loads((FIXTURES / arch / "config.json").read_text())


def _assert_same_bytes(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, arr in want.items():
    assert (got[name].dtype, got[name].shape) == (arr.dtype, arr.shape), name
    assert got[name].tobytes() == arr.tobytes(), name


@needs_fixtures
@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_lands_bit_exactly_in_its_variable(arch):
  """Every tensor of the folder (single file or shards) fills one variable, in the layout
  hf_name gives, byte for byte; no variable is left unfilled. Tied models have no
  lm_head variable, and GPT-2's names come without their ``transformer.`` prefix."""
  loaded = models.load(str(FIXTURES / arch))
  assert loaded.report is None
  want = {n.removeprefix("transformer."): a for n, a in _file_tensors(FIXTURES / arch).items()}
  _assert_same_bytes(_variables(loaded), want)


@needs_fixtures
def test_square_kernels_keep_their_stored_layout():
  """torch's Linear stores (out, in), the transpose of nnx.Linear's kernel; GPT-2's Conv1D
  stores (in, out) already. Square kernels would load either way without a shape error."""
  path = ("layers", 1, "self_attn", "q_proj", "kernel")
  assert models.hf_name(models.tiny_config("llama"), path) == (
      "model.layers.1.self_attn.q_proj.weight", True)
  q = models.load(str(FIXTURES / "llama3")).model.layers[1].self_attn.q_proj.kernel[...]
  llama = _file_tensors(FIXTURES / "llama3")
  np.testing.assert_array_equal(q, llama["model.layers.1.self_attn.q_proj.weight"].T)
  path = ("layers", 1, "self_attn", "c_proj", "kernel")
  assert models.hf_name(models.tiny_config("gpt2"), path) == ("h.1.attn.c_proj.weight", False)
  c_proj = models.load(str(FIXTURES / "gpt2")).model.layers[1].self_attn.c_proj.kernel[...]
  gpt2 = _file_tensors(FIXTURES / "gpt2")
  np.testing.assert_array_equal(c_proj, gpt2["transformer.h.1.attn.c_proj.weight"])


@needs_fixtures
def test_sharded_folder_reads_only_the_shards_its_index_lists(tmp_path):
  folder = tmp_path / "sharded"
  shutil.copytree(FIXTURES / "llama3_sharded", folder)
  # Mistral's Hub folders also hold consolidated.safetensors, in Mistral's own names.
  st.save_file({"layers.0.attention.wq.weight": np.zeros((64, 64), np.float32)},
               str(folder / "consolidated.safetensors"))
  loaded = models.load(str(folder))
  want = _file_tensors(FIXTURES / "llama3")  # the same weights in one file
  _assert_same_bytes(_variables(loaded), want)
  (folder / "model-00003-of-00014.safetensors").unlink()
  _one_line_error(lambda: models.load(str(folder)), "model.safetensors.index.json",
                  "'model-00003-of-00014.safetensors'", "missing", error=FileNotFoundError)


@needs_fixtures
@pytest.mark.parametrize("stored", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_tensors_load_exactly(tmp_path, stored):
  stored = np.dtype(stored)
  tensors = {n: a.astype(stored) for n, a in _file_tensors(FIXTURES / "llama3_tied").items()}
  # Older Llama checkpoints also carry RoPE tables, which hold no weights.
  extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)
           for i in range(2)}
  folder = _write(tmp_path / "half", _config("llama3_tied"), {**tensors, **extra})
  # Widening to float32 is exact.
  f32 = {n: a.astype(np.float32) for n, a in tensors.items()}
  _assert_same_bytes(_variables(models.load(folder)), f32)
  _assert_same_bytes(_variables(models.load(folder, dtype=jnp.dtype(stored))), tensors)


@needs_fixtures
def test_tied_checkpoint_that_carries_an_lm_head_tensor_loads(tmp_path):
  """Some tied checkpoints also store lm_head.weight (a copy of the embedding); the
  model reads the embedding and has no lm_head of its own."""
  tensors = _file_tensors(FIXTURES / "llama3_tied")
  head = {"lm_head.weight": tensors["model.embed_tokens.weight"].copy()}
  folder = _write(tmp_path / "tied", _config("llama3_tied"), {**tensors, **head})
  _assert_same_bytes(_variables(models.load(folder)), tensors)


@needs_fixtures
def test_gpt2_loads_with_or_without_the_transformer_prefix(tmp_path):
  """Both forms are on the Hub: the fixture has the prefix; here none, plus the causal
  mask buffers older GPT-2 checkpoints carry (they hold no weights)."""
  tensors = _file_tensors(FIXTURES / "gpt2")
  bare = {n.removeprefix("transformer."): a for n, a in tensors.items()}
  assert len(bare) == len(tensors) and "wte.weight" in bare
  for i in range(2):
    bare[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 1024, 1024), np.bool_))
    bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  folder = _write(tmp_path / "gpt2", _config("gpt2"), bare)
  _assert_same_bytes(_variables(models.load(folder)), _variables(models.load(str(FIXTURES / "gpt2"))))


# The projections an FP8 checkpoint stores in e4m3 (vLLM's "fp8" format: one f32
# weight_scale per tensor, weight = e4m3 * weight_scale; embeddings and head unquantized).
_PROJECTIONS = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                          r"|c_attn|c_proj|c_fc)\.weight$")


def _fp8_folder(tmp_path, arch) -> tuple[str, dict]:
  """A fixture quantized to FP8 as an external tool writes it; also ``{name: (e4m3, scale)}``."""
  tensors, fp8 = _file_tensors(FIXTURES / arch), {}
  for name in [n for n in tensors if _PROJECTIONS.search(n)]:
    w = tensors[name]
    scale = np.float32(np.abs(w).max() / 448)  # e4m3's largest finite value
    q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    tensors[name], tensors[name + "_scale"] = q, scale
    fp8[name.removeprefix("transformer.")] = (q, scale)
  config = dict(_config(arch), quantization_config={"quant_method": "fp8",
                                                    "activation_scheme": "dynamic"})
  return _write(tmp_path / f"{arch}_fp8", config, tensors), fp8


@needs_fixtures
@pytest.mark.parametrize("arch", ["llama3", "gpt2"])
def test_fp8_checkpoint_loads_as_rank0_melded_layers(tmp_path, arch):
  folder, fp8 = _fp8_folder(tmp_path, arch)
  loaded = models.load(folder)
  kernels = fnnx.kernels(loaded.model)
  assert len(kernels) == len(fp8) == (4 if arch == "gpt2" else 7) * 2
  for path, mk in kernels.items():
    name, transposed = models.hf_name(loaded.config, (*path.split("/"), "kernel"))
    q, scale = fp8[name]
    assert mk.rank == 0 and mk.delta.shape == (mk.out_features, 0)
    # qweight is (out, in): torch's Linear layout, the transpose of GPT-2's Conv1D.
    assert np.asarray(mk.qweight).tobytes() == (q if transposed else q.T).tobytes(), name
    # The loader keeps the scale whose f32 reciprocal is the file's, all the GEMM reads.
    assert np.float32(1) / np.asarray(mk.scale, np.float32) == scale, name
  ref = np.load(FIXTURES / arch / "reference.npz")
  out = np.asarray(nnx.jit(lambda m, ids: m(ids))(loaded.model, jnp.asarray(ref["input_ids"])))
  # e4m3 weights and inputs: ~5% RMS per matmul over two layers (as a melded model in
  # test_models.py); a wrong layout or scale would be off by ~100%.
  err = np.sqrt(np.mean((out - ref["logits"]) ** 2)) / ref["logits"].std()
  assert err < 0.25, err


@needs_fixtures
def test_fp8_checkpoint_refusals(tmp_path):
  folder, _ = _fp8_folder(tmp_path, "llama3")
  _one_line_error(lambda: models.load(folder, rank=8), "FP8 export", "without rank")
  path = f"{folder}/model.safetensors"
  tensors = _file_tensors(folder)
  del tensors["model.layers.1.mlp.down_proj.weight_scale"]
  st.save_file(tensors, path)
  _one_line_error(lambda: models.load(folder), "'model.layers.1.mlp.down_proj.weight'",
                  "weight_scale")


@needs_fixtures
def test_melding_while_loading_refusals():
  folder = str(FIXTURES / "llama3")
  _one_line_error(lambda: models.load(folder, rank=8, targets=r"no_such_proj/kernel$"),
                  "'no_such_proj/kernel$'", "matched no")
  _one_line_error(lambda: models.load(folder, init="random"), "init= melds", "pass rank=")
  _one_line_error(lambda: models.load(folder, rank=8, reset="some"), "reset must be one of")


def test_folder_without_config_is_one_line_error(tmp_path):
  _one_line_error(lambda: models.load(str(tmp_path)), "no config.json")


def test_flax_msgpack_folder_is_one_line_error(tmp_path):
  """A folder saved by transformers' Flax save_pretrained (flax_model.msgpack) has no
  safetensors; the error says so and how to fix it."""
  (tmp_path / "config.json").write_text(json.dumps(models.tiny_config("llama").to_hf()))
  params = {"model": {"norm": {"weight": np.ones(64, np.float32)}}}
  (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
  _one_line_error(lambda: models.load(str(tmp_path)), "no *.safetensors weights",
                  "save the model with safetensors")


@needs_fixtures
def test_block_fp8_and_other_quantized_checkpoints_are_refused(tmp_path):
  """Hub FP8 checkpoints with 128x128 blocks (weight_scale_inv per block) and other
  quantization methods would load wrong or fail on an odd tensor name: refused up front."""
  src = FIXTURES / "llama3"
  for name, quant in (("block", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
                      ("awq", {"quant_method": "awq", "bits": 4})):
    folder = tmp_path / name
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    _one_line_error(lambda: models.load(str(folder)), "is not supported")


@needs_fixtures
def test_stray_safetensors_beside_model_safetensors_are_not_read(tmp_path):
  folder = tmp_path / "llama3"
  shutil.copytree(FIXTURES / "llama3", folder)
  st.save_file({"junk": np.ones((2, 2), np.float32)}, str(folder / "consolidated.safetensors"))
  models.load(str(folder))  # transformers reads model.safetensors only; so do we
  (folder / "model.safetensors").rename(folder / "other.safetensors")
  _one_line_error(lambda: models.load(str(folder)), "add the index file")
