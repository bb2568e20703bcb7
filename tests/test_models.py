"""falqon_jax.models: every family's logits against PyTorch reference logits (hf-tiny)."""

import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import falqon_jax
from falqon_jax import models
from falqon_jax import nnx as fnnx
from falqon_jax import train
from falqon_jax.errors import UserInputError
from falqon_jax import _safetensors as st
from falqon_jax.models import _config, _decoder

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-tiny"
ARCHS = ["llama3", "llama3_tied", "llama3_sharded", "mistral", "qwen2", "qwen3", "gemma",
         "gemma2", "gemma3", "gpt2"]
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"hf-tiny fixtures not found at {FIXTURES} (CI puts ../shared beside the clone)",
)
# The README's tolerance: 15x the largest float32 error between independent
# implementations, 6x below the smallest feature effect.
ATOL = 1e-4

# One jitted forward for all tests; it retraces per graph (i.e. per architecture).
_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))


def _folder(tmp_path, arch, style):
  if style == "config":
    return FIXTURES / arch
  dst = tmp_path / arch
  shutil.copytree(FIXTURES / arch, dst)
  shutil.copy(dst / "legacy_config.json", dst / "config.json")
  return dst


def _run(model, ids, mask):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def _one_line_error(fn, *needles):
  with pytest.raises(UserInputError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  for n in needles:
    assert n in msg, msg
  return msg


@needs_fixtures
@pytest.mark.parametrize("style", ["config", "legacy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_reference(tmp_path, arch, style):
  model, _, _ = models.load(str(_folder(tmp_path, arch, style)))
  ref = np.load(FIXTURES / arch / "reference.npz")
  out = _run(model, ref["input_ids"], ref["attention_mask"])
  np.testing.assert_allclose(out, ref["logits"], atol=ATOL, rtol=0)
  padded = _run(model, ref["input_ids_padded"], ref["attention_mask_padded"])
  valid = ref["attention_mask_padded"].astype(bool)
  # Finite everywhere: the mask is a finite negative, so even a pad query with no key in
  # its sliding window gives a (meaningless) finite row rather than NaN.
  assert np.isfinite(padded).all()
  np.testing.assert_allclose(padded[valid], ref["logits_padded"][valid], atol=ATOL, rtol=0)


@needs_fixtures
@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                  "gemma3", "gpt2"])
def test_legacy_config_parses_to_the_same_model_config(arch):
  new = json.loads((FIXTURES / arch / "config.json").read_text())
  old = json.loads((FIXTURES / arch / "legacy_config.json").read_text())
  assert models.ModelConfig.from_hf(old) == models.ModelConfig.from_hf(new)


@needs_fixtures
@pytest.mark.parametrize("arch", ["llama3", "llama3_tied", "qwen3", "gemma2", "gemma3", "gpt2"])
def test_melded_model_stays_close_before_training(arch):
  model, cfg, _ = models.load(str(FIXTURES / arch))
  report = fnnx.meld(model, rank=8)
  per_layer = 4 if cfg.model_type == "gpt2" else 7  # every projection of every layer
  assert len(report.melded) == per_layer * cfg.num_layers
  ref = np.load(FIXTURES / arch / "reference.npz")
  out = _run(model, ref["input_ids"], ref["attention_mask"])
  # FP8 e4m3 keeps 3 mantissa bits: ~2^-4/sqrt(3) ≈ 4% RMS rounding on each of the
  # weight and the input, ~5% per matmul, compounding over two layers and amplified by
  # these random models (up to ~14% seen). The zero ΔBuffer adds nothing; a wrong melded
  # layout would be off by ~100%.
  err = np.sqrt(np.mean((out - ref["logits"]) ** 2)) / ref["logits"].std()
  assert err < 0.25
  assert np.abs(out - ref["logits"]).max() > 1e-3  # really melded, not the float path


_step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))


@needs_fixtures
@pytest.mark.parametrize("arch", ["llama3", "gemma2", "gemma3", "gpt2"])
def test_kv_cache_decoding_matches_reference(arch):
  model, _, _ = models.load(str(FIXTURES / arch))
  ref = np.load(FIXTURES / arch / "reference.npz")
  ids = jnp.asarray(ref["input_ids"])
  cache = model.init_cache(2, 32)
  # A 20-token prefill, then one token at a time: past the sliding window (8), so the
  # cached local layers must drop the old keys.
  with jax.default_matmul_precision("highest"):
    logits, cache = _step(model, ids[:, :20], cache)
    steps = [logits]
    for i in range(20, 32):
      logits, cache = _step(model, ids[:, i:i + 1], cache)
      steps.append(logits)
  assert int(cache.index) == 32
  np.testing.assert_allclose(np.concatenate(steps, axis=1), ref["logits"], atol=ATOL, rtol=0)


@needs_fixtures
def test_bfloat16_load_keeps_float32_logits_close():
  model, _, _ = models.load(str(FIXTURES / "gemma2"), dtype=jnp.bfloat16)
  assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  ref = np.load(FIXTURES / "gemma2" / "reference.npz")
  out = _run(model, ref["input_ids"], ref["attention_mask"])
  assert out.dtype == np.float32
  # bf16 keeps 8 mantissa bits: ~0.1% RMS per rounding, a few dozen roundings in series.
  err = np.sqrt(np.mean((out - ref["logits"]) ** 2)) / ref["logits"].std()
  assert err < 0.03


@needs_fixtures
def test_qkv_and_gate_up_quantize_their_shared_input_once():
  model, cfg, _ = models.load(str(FIXTURES / "llama3"))
  fnnx.meld(model, rank=8)
  ids = jnp.zeros((2, 16), jnp.int32)
  hlo = _forward.lower(model, ids, jnp.ones_like(ids)).compile().as_text()
  quantized = re.findall(r"= f8e4m3fn\[[^\]]*\]\S* convert\(", hlo)
  # One input quantization per distinct input: q/k/v's, o's, gate/up's and down's.
  assert 0 < len(quantized) <= 4 * cfg.num_layers, len(quantized)


def test_legacy_configs_derive_layer_types_and_local_rope_as_4x_did():
  base = {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "num_hidden_layers": 6, "head_dim": 16, "sliding_window": 8, "rope_theta": 1e6}
  s, f = "sliding_attention", "full_attention"
  gemma3 = models.ModelConfig.from_hf(
      {**base, "model_type": "gemma3_text", "sliding_window_pattern": 3,
       "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert gemma3.layer_types == (s, s, f, s, s, f)
  assert gemma3.rope_for(s) == models.Rope(theta=1e4)  # local layers: unscaled, local base
  assert gemma3.rope_for(f) == models.Rope(rope_type="linear", theta=1e6, factor=8.0)
  gemma2 = models.ModelConfig.from_hf({**base, "model_type": "gemma2"})
  assert gemma2.layer_types == (s, f) * 3
  mistral = models.ModelConfig.from_hf({**base, "model_type": "mistral"})
  assert mistral.layer_types == (s,) * 6 and mistral.sliding_window == 8
  qwen2 = models.ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": False})
  assert qwen2.layer_types == (f,) * 6 and qwen2.sliding_window is None


def test_unsupported_model_type_and_rope_type_are_one_line_errors():
  base = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2}
  _one_line_error(lambda: models.ModelConfig.from_hf({**base, "model_type": "bloom"}),
                  "'bloom'", "model_type")
  _one_line_error(
      lambda: models.ModelConfig.from_hf(
          {**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}),
      "'longrope'", "RoPE type")
  nested = {"full_attention": {"rope_type": "su", "rope_theta": 1e4}}
  _one_line_error(
      lambda: models.ModelConfig.from_hf({**base, "rope_parameters": nested}), "'su'")


@needs_fixtures
def test_unsupported_model_type_in_a_folder_is_one_line_error(tmp_path):
  folder = _folder(tmp_path, "gpt2", "legacy")
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
  _one_line_error(lambda: models.load(str(folder)), "'gpt_neox'", "config.json")


@needs_fixtures
def test_tensor_shape_mismatch_names_the_tensor(tmp_path):
  folder = _folder(tmp_path, "qwen2", "legacy")
  path = folder / "model.safetensors"
  tensors = {k: np.array(v) for k, v in st.iter_tensors(str(path))}
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  st.save_file(tensors, str(path))
  _one_line_error(lambda: models.load(str(folder)),
                  "'model.layers.1.self_attn.k_proj.weight'", "(16, 64)", "(32, 64)")


@needs_fixtures
def test_missing_tensor_is_one_line_error(tmp_path):
  folder = _folder(tmp_path, "llama3_tied", "legacy")
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
  _one_line_error(lambda: models.load(str(folder)), "'lm_head.weight'")


def _rope(**kw):
  return _config.Rope(**kw)


def test_rope_linear_divides_every_frequency():
  default, _ = _config.inv_freq(_rope(theta=1e4), 64, 4096)
  linear, att = _config.inv_freq(_rope(rope_type="linear", theta=1e4, factor=4.0), 64, 4096)
  np.testing.assert_allclose(linear, default / 4, rtol=1e-6)
  assert att == 1.0


def test_rope_llama3_keeps_smooths_and_divides_as_the_fixture_says():
  rope = _rope(rope_type="llama3", theta=5e5, factor=32.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=64)
  default, _ = _config.inv_freq(_rope(theta=5e5), 16, 2048)
  inv, _ = _config.inv_freq(rope, 16, 2048)
  ratio = default / inv
  assert np.isclose(ratio[0], 1.0)  # wavelength below 64/4: kept
  assert 1.0 < ratio[1] < 32.0  # between 16 and 64: smoothed
  np.testing.assert_allclose(ratio[2:], 32.0, rtol=1e-6)  # above 64: divided by 32


def test_rope_yarn_interpolates_only_the_long_wavelengths():
  factor, dim = 8.0, 128
  default, _ = _config.inv_freq(_rope(theta=1e4), dim, 32768)
  inv, att = _config.inv_freq(
      _rope(rope_type="yarn", theta=1e4, factor=factor, original_max_position_embeddings=4096),
      dim, 32768)
  # Dimensions that turn more than beta_fast (32) times over the original context keep
  # their frequency; fewer than beta_slow (1) times: divided by the factor.
  turns = 4096 * default / (2 * math.pi)
  np.testing.assert_allclose(inv[turns > 32 * 1.5], default[turns > 32 * 1.5], rtol=1e-6)
  np.testing.assert_allclose(inv[turns < 0.5], default[turns < 0.5] / factor, rtol=1e-6)
  mid = (turns < 32) & (turns > 1)
  assert np.all((inv[mid] < default[mid]) & (inv[mid] > default[mid] / factor))
  assert att == pytest.approx(0.1 * math.log(factor) + 1.0)


def test_rope_dynamic_grows_the_base_past_the_context_only():
  rope = _rope(rope_type="dynamic", theta=1e4, factor=2.0)
  dim, max_pos = 16, 64
  short = jnp.arange(max_pos)[None]
  cos, sin = _decoder.rope_tables(rope, dim, max_pos, short)
  cos0, sin0 = _decoder.rope_tables(_rope(theta=1e4), dim, max_pos, short)
  np.testing.assert_array_equal(cos, cos0)
  np.testing.assert_array_equal(sin, sin0)
  # At twice the context the NTK base makes the lowest frequency (factor*2 - factor + 1)
  # = 3 times lower, and leaves the highest (exponent 0) as it is.
  long = jnp.arange(2 * max_pos)[None]
  cos, sin = _decoder.rope_tables(rope, dim, max_pos, long)
  default, _ = _config.inv_freq(_rope(theta=1e4), dim, max_pos)
  angles = np.arctan2(np.asarray(sin[0, 1]), np.asarray(cos[0, 1]))  # position 1
  np.testing.assert_allclose(angles[0], default[0], rtol=1e-6)
  np.testing.assert_allclose(angles[-1], default[-1] / 3, rtol=1e-5)


def _tiny(model_type, layers=2, hidden=32, **extra):
  return models.ModelConfig.from_hf({
      "model_type": model_type, "vocab_size": 64, "hidden_size": hidden,
      "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
      "num_attention_heads": 4, "num_key_value_heads": 2, **extra,
  })


def _delta_grads(model, ids):
  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])
  return nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, fnnx.Melded)))(model)


def test_remat_keeps_the_delta_gradients():
  model = models.CausalLM(_tiny("llama"), rngs=nnx.Rngs(0))
  fnnx.meld(model, rank=16)
  # Nonzero deltas, so the gradients also go through the delta term.
  keys = iter(jax.random.split(jax.random.key(1), 64))
  for _, var in nnx.iter_graph(model):
    if isinstance(var, fnnx.Melded):
      mk = var.get_value()
      var.set_value(mk.replace(delta=0.01 * jax.random.normal(next(keys), mk.delta.shape)))
  ids = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
  remat = nnx.clone(model)
  remat.remat = True
  plain = nnx.to_flat_state(_delta_grads(model, ids))
  again = dict(nnx.to_flat_state(_delta_grads(remat, ids)))
  assert len(plain) == len(again) == 14
  for path, g in plain:
    g, h = np.asarray(g.get_value().delta), np.asarray(again[path].get_value().delta)
    # Remat recomputes the same ops in another program: f32 reassociation (~1e-7
    # relative per op, a few hundred in series) stays far below 2e-3 of the largest
    # entry. So does a rare e4m3 flip of one recomputed input element: 1/8 of one of
    # 32 products (~1/8/sqrt(32)) in one of the 2*16 summed tokens, ~7e-4. A missing or
    # wrong path would differ by O(1).
    np.testing.assert_allclose(h, g, rtol=0, atol=2e-3 * np.abs(g).max(), err_msg=str(path))
    assert np.abs(g).max() > 0


def _residual_bytes(model, batch, seq):
  """Bytes the backward of a delta loss keeps from the forward (abstract: no compute)."""
  graphdef, delta, rest = nnx.split(model, fnnx.Melded, ...)
  def loss(delta, rest, ids):
    return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, delta, rest)(ids))[..., 0])
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  vjp = jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], delta, rest, ids)
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(vjp))


def test_remat_saves_only_the_layer_outputs():
  cfg = _tiny("llama", layers=4, hidden=128)
  def build(remat):
    def make():
      model = models.CausalLM(cfg, remat=remat, rngs=nnx.Rngs(0))
      fnnx.meld(model, rank=16)
      return model
    return nnx.eval_shape(make)  # shapes only: the residuals depend on nothing else
  batch, seq = 8, 64
  plain, remat = _residual_bytes(build(False), batch, seq), _residual_bytes(build(True), batch, seq)
  stream = batch * seq * cfg.hidden_size * 4  # one f32 residual-stream activation
  weights = sum(math.prod(x.shape) * x.dtype.itemsize
                for x in jax.tree.leaves(nnx.state(build(True))))
  # Without remat every layer keeps its attention probabilities and MLP activations
  # (tens of streams each); with it each layer keeps one stream (its output), and the
  # weights, embedding, final norm and log-softmax (a few streams) remain.
  assert plain > remat + 10 * cfg.num_layers * stream
  assert remat < weights + (2 * cfg.num_layers + 4) * stream
  # One name, so falqon_jax.train's whole-model policy keeps these outputs too.
  assert models.LAYER_OUTPUT == train.LAYER_OUTPUT


# FSDP over "data" on the hidden axis, tensor parallelism over "model" on the rest.
_RULES = (("vocab", "model"), ("embed", "data"), ("heads", "model"), ("kv_heads", "model"),
          ("mlp", "model"))
_FAMILY_CONFIGS = {
    "llama": {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16, "tie_word_embeddings": False},
    "gemma": {}, "gemma2": {}, "gemma3_text": {}, "gpt2": {"max_position_embeddings": 32},
}


@pytest.mark.parametrize("model_type", models.FAMILIES)
def test_every_parameter_has_logical_axis_names(model_type):
  cfg = _tiny(model_type, **_FAMILY_CONFIGS[model_type])
  model = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0)))
  names = {"vocab", "embed", "heads", "kv_heads", "mlp", None}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path
    assert set(axes) <= names, (path, axes)


@needs_fixtures
def test_load_keeps_the_axis_names():
  model, _, _ = models.load(str(FIXTURES / "llama3"))
  with nnx.logical_axis_rules(_RULES):
    specs = nnx.get_partition_spec(nnx.state(model))
  P = jax.sharding.PartitionSpec
  assert specs["embed_tokens"]["embedding"].get_value() == P("model", "data")
  assert specs["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value() == P("data", "model")
  assert specs["layers"][0]["mlp"]["down_proj"]["kernel"].get_value() == P("model", "data")
  assert specs["norm"]["weight"].get_value() == P("data")


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2"])
def test_sharded_forward_matches_the_unsharded_one(model_type):
  cfg = _tiny(model_type, **_FAMILY_CONFIGS[model_type])
  model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  mask = jnp.ones((2, 16), jnp.int32).at[1, 12:].set(0)
  want = _run(model, ids, mask)
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=auto)
  with nnx.logical_axis_rules(_RULES):
    shardings = nnx.get_named_sharding(nnx.state(model), mesh)
  nnx.update(model, jax.device_put(nnx.state(model), shardings))
  up = model.layers[0].mlp.c_fc if model_type == "gpt2" else model.layers[0].mlp.up_proj
  kernel = up.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  assert kernel.addressable_shards[0].data.shape == (cfg.hidden_size // 2, kernel.shape[1] // 2)
  got = _run(model, ids, mask)
  # Sharded matmuls sum in another order: f32 reassociation, ~1e-7 relative per term over
  # sums of <= 128 terms and a few layers in series, stays below 1e-5 of the logits' scale;
  # a wrongly placed shard would change them by O(1).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_melded_weights_keep_the_kernels_axis_names_and_shard():
  cfg = _tiny("qwen3", **_FAMILY_CONFIGS["qwen3"])
  model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  fnnx.meld(model, rank=8)
  up = model.layers[0].mlp.up_proj
  assert isinstance(up, fnnx.MeldedLinear)
  assert up.kernel.get_metadata()["kernel_axes"] == ("embed", "mlp")
  with nnx.logical_axis_rules(_RULES):
    spec = fnnx.get_partition_spec(nnx.state(model))["layers"][0]["mlp"]["up_proj"]
  P = jax.sharding.PartitionSpec
  mk_spec = spec["kernel"].get_value()
  assert (mk_spec.qweight, mk_spec.scale, mk_spec.delta) == (P("model", "data"), P(), P("model", None))
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  mask = jnp.ones((2, 16), jnp.int32)
  want = _run(model, ids, mask)
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with nnx.logical_axis_rules(_RULES):
    shardings = fnnx.get_named_sharding(nnx.state(model), mesh)
  nnx.update(model, jax.device_put(nnx.state(model), shardings))
  assert up.kernel.get_value().qweight.sharding.spec == jax.sharding.PartitionSpec("model", "data")
  got = _run(model, ids, mask)
  # The same FP8 GEMMs split over devices: f32 reassociation only (as the unmelded case),
  # unless an activation's FP8 rounding flips on it; 1e-3 of the scale allows a few flips.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


@needs_fixtures
@pytest.mark.parametrize("arch,targets,seed", [
    ("llama3_sharded", None, 5), ("gpt2", r"attn/c_attn", 5),
    ("llama3_sharded", None, None)])  # None: both default to jax.random.key(options.seed)
def test_melding_while_loading_equals_melding_after(arch, targets, seed):
  kw = dict(init="random", key=None if seed is None else jax.random.key(seed), targets=targets)
  loaded = models.load(str(FIXTURES / arch), rank=8, **kw)
  model, _, _ = models.load(str(FIXTURES / arch))
  report = fnnx.meld(model, rank=8, **kw)
  assert loaded.report == report and len(report.melded) > 1
  got, want = fnnx.kernels(loaded.model), fnnx.kernels(model)
  assert list(got) == list(want)
  for path in want:  # the same bytes: the same per-layer keys and the same quantization
    for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path])):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  a_rows = [np.asarray(k.lora_a(jnp.float32)) for k in want.values()]
  assert not np.array_equal(a_rows[0], a_rows[1])  # every layer its own random A
  # The rest of the model (norms, embeddings, biases) is the same too.
  rest = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, rest(loaded.model), rest(model))


def test_split_gives_melded_kernel_leaves_and_the_same_logits():
  model = models.CausalLM(_tiny("qwen3", **_FAMILY_CONFIGS["qwen3"]), rngs=nnx.Rngs(0))
  fnnx.meld(model, rank=8)
  fmodel, params = models.split(model)
  kernels = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, falqon_jax.MeldedKernel))
             if isinstance(x, falqon_jax.MeldedKernel)]
  assert len(kernels) == 7 * 2
  assert hash(fmodel) == hash(models.split(model)[0])  # a jit static argument
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  apply = jax.jit(fmodel.apply, static_argnames="remat")
  want = jax.jit(lambda m, i: m(i))(model, ids)
  # Two compiled programs of the same ops: f32 reassociation, or an activation's e4m3
  # rounding flipping by it, stays far below 1e-3 of the logits' scale; a wrong tree or
  # graph would be off by O(1).
  np.testing.assert_allclose(apply(params, ids), want, rtol=0, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("window", [None, 4])
def test_structured_causal_attention_matches_the_mask(window):
  # attention="cudnn" passes the causal mask as lengths and a window; the same structured
  # call on XLA (runnable here) must give what the mask array gives on every valid query.
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, n, 16)) for i, n in
             ((0, 4), (1, 2), (2, 2)))
  spec = _decoder.CausalSpec(jnp.array([12, 7], jnp.int32), window, "xla")
  got = _decoder.attend(q, k, v, spec, 0.25)
  want = _decoder.attend(q, k, v, _decoder._spec_mask(spec, 12), 0.25)
  idx = jnp.arange(12)
  explicit = (idx[None, :] <= idx[:, None]) & (idx[None, :] < jnp.array([12, 7])[:, None, None])
  if window is not None:
    explicit &= idx[None, :] > idx[:, None] - window
  np.testing.assert_array_equal(_decoder._spec_mask(spec, 12)[:, 0], explicit)
  # Two programs, same f32 math in another order: ~1e-7 relative.
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_allclose(got[1, :7], want[1, :7], atol=1e-5)


def test_cudnn_attention_takes_lengths_and_windows_and_falls_back_with_a_cache():
  cfg = _tiny("mistral", sliding_window=4)
  model = models.CausalLM(cfg, attention="cudnn", rngs=nnx.Rngs(0))
  mask = jnp.ones((2, 12), jnp.int32).at[1, 7:].set(0)
  masks, _ = model._masks(2, 12, mask, None, None, 0)
  assert masks[_config.FULL].lengths.tolist() == [12, 7] and masks[_config.FULL].window is None
  assert masks[_config.SLIDING].window == 4
  assert masks[_config.FULL].implementation == "cudnn"
  cache = model.init_cache(2, 16)
  masks, _ = model._masks(2, 12, mask, None, cache, 0)
  assert masks[_config.FULL].shape == (2, 1, 12, 16)  # decoding: the XLA mask path
  with pytest.raises(UserInputError, match="attention must be one of xla, cudnn"):
    models.CausalLM(cfg, attention="flash", rngs=nnx.Rngs(0))


def test_segment_ids_keep_packed_examples_apart():
  model = models.CausalLM(_tiny("llama"), rngs=nnx.Rngs(0))
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, 64)
  b = jax.random.randint(jax.random.key(2), (1, 6), 0, 64)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 6])
  pos = jnp.array([list(range(5)) + list(range(6))])
  got = _run_kw(model, packed, positions=pos, segment_ids=seg)
  want = jnp.concatenate([_run_kw(model, a), _run_kw(model, b)], axis=1)
  # Separate programs: f32 reassociation only, far below the O(1) of a leaked context.
  np.testing.assert_allclose(got, want, atol=1e-4)


_run_kw = nnx.jit(lambda m, ids, **kw: m(ids, **kw))


def test_untied_gpt2_head_is_a_torch_linear():
  # GPT2LMHeadModel's lm_head is an nn.Linear, stored (vocab, hidden), unlike its Conv1Ds.
  cfg = _tiny("gpt2", tie_word_embeddings=False, max_position_embeddings=32)
  assert models.hf_name(cfg, ("lm_head", "kernel")) == ("lm_head.weight", True)
  assert models.hf_name(cfg, ("layers", 0, "mlp", "c_fc", "kernel")) == ("h.0.mlp.c_fc.weight", False)


def test_projections_sharing_an_input_quantize_it_once():
  # q/k/v (and gate/up) read the same x: XLA's CSE leaves one amax pass and one FP8 cast
  # for them.
  cfg = _tiny("llama", layers=2, hidden=64)
  model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  fnnx.meld(model, rank=16)
  fmodel, params = models.split(model)
  ids = jnp.zeros((2, 16), jnp.int32)
  text = jax.jit(fmodel.apply).lower(params, ids).compile().as_text()
  # One per-tensor amax (a reduce to an f32 scalar) per distinct input: the attention
  # input, o_proj's, the MLP input and down_proj's. Seven would mean no sharing.
  assert len(re.findall(r"= f32\[\] reduce\(", text)) == 4 * cfg.num_layers


_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


@needs_fixtures
@pytest.mark.parametrize("arch", ["llama3", "qwen3", "gemma2"])
def test_fused_groups_share_the_smallest_member_scale(arch):
  loaded = models.load(str(FIXTURES / arch), rank=8)
  after = models.load(str(FIXTURES / arch)).model
  assert fnnx.meld(after, rank=8) == loaded.report
  own = models.load(str(FIXTURES / arch), rank=8, fused_groups=False).model
  plain = models.load(str(FIXTURES / arch)).model
  got, want, alone = fnnx.kernels(loaded.model), fnnx.kernels(after), fnnx.kernels(own)
  for path in want:  # melding while loading buffers a group and melds it as meld does
    for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path])):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for i in range(2):
    for module, names in _GROUPS:
      paths = [f"layers/{i}/{module}/{n}" for n in names]
      own_scales = [float(alone[p].scale) for p in paths]
      assert len(set(own_scales)) > 1  # the fixture's members differ on their own
      # One scale: the largest amax, so no member saturates (exact: a min of the same f32s).
      assert {float(got[p].scale) for p in paths} == {min(own_scales)}
      for p, name in zip(paths, names):  # each member's W quantized with the shared scale
        mk = got[p]
        w = getattr(getattr(plain.layers[i], module), name).kernel[...].T
        np.testing.assert_array_equal(
            np.asarray(mk.qweight[: mk.out_features], np.float32),
            np.asarray(falqon_jax.fp8.quantize(w, mk.scale), np.float32))


@needs_fixtures
def test_partial_fused_group_is_refused_at_meld_time():
  folder = str(FIXTURES / "llama3")
  _one_line_error(lambda: models.load(folder, rank=8, targets=r"(q|v)_proj"),
                  "targets meld q_proj but not k_proj of layers/0/self_attn",
                  'target the whole group (e.g. r"(q|k|v)_proj")')
  lm = models.load(folder).model
  _one_line_error(lambda: fnnx.meld(lm, rank=8, targets=r"mlp/gate_proj"),
                  "but not up_proj of layers/0/mlp", 'r"(gate|up)_proj"')
  assert isinstance(lm.layers[0].mlp.gate_proj, nnx.Linear)  # refused before any swap
  report = fnnx.meld(lm, rank=8, targets=r"(q|k|v)_proj")  # a whole group is fine
  assert len(report.melded) == 6
  # The reference has no groups: it melds what it is told, each with its own scale.
  lm = models.load(folder).model
  report = fnnx.meld(lm, rank=8, targets=r"mlp/gate_proj", options=falqon_jax.REFERENCE)
  assert len(report.melded) == 2
