"""A bf16 export of a trained (melded) model, and its FP8 export dequantized, load in
transformers' own PyTorch classes and give our model's logits.

Needs torch and transformers >= 5, which the default test set does not install, so this
module is skipped there; the FP8 test also needs accelerate (transformers' FP8 loader
does). To run it, in a venv with them:
``python -m pytest -q -s tests/test_export_torch.py``.
"""

import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import falqon_jax  # noqa: E402
from falqon_jax import export, models  # noqa: E402
from falqon_jax._melded_kernel import MeldedKernel  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-tiny"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"hf-tiny fixtures not found at {FIXTURES} (CI puts ../shared beside the clone)",
)
ARCHS = ["llama3", "llama3_tied", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
         "gpt2"]
# The fixtures' README: independent float32 implementations of the same weights agree to
# 1e-4 (15x the largest difference measured between them). Both sides here read the same
# bf16-rounded weights in float32, so bf16 adds nothing to the difference.
ATOL = 1e-4


def _trained(arch):
  """The fixture melded at rank 16 with random deltas merged, as a proxy step would."""
  model, params = models.split(models.load(str(FIXTURES / arch), rank=16).model)
  keys = iter(jax.random.split(jax.random.key(1), 64))

  def merged(mk):
    mk = mk.replace(delta=0.05 * jax.random.normal(next(keys), mk.delta.shape))
    return falqon_jax.merge_top_k(mk, mk.rank)

  is_melded = lambda x: isinstance(x, MeldedKernel)
  return model, jax.tree.map(lambda x: merged(x) if is_melded(x) else x, params,
                             is_leaf=is_melded)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_export_matches_transformers(arch, tmp_path):
  model, params = _trained(arch)
  out = export.save_bf16(str(tmp_path / arch), model, params)
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                       "error_msgs")), info
  hf.eval()

  # Our model on the same weights: the melded kernels' backbones, rounded to bf16 as the
  # file holds them, in the unmelded model of the same config, all in float32.
  dense, _ = models.split(models.load(str(FIXTURES / arch)).model)
  weights = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                         falqon_jax.unmeld(params))
  ref = np.load(FIXTURES / arch / "reference.npz")
  worst = 0.0
  for ids, mask in ((ref["input_ids"], ref["attention_mask"]),
                    (ref["input_ids_padded"], ref["attention_mask_padded"])):
    with jax.default_matmul_precision("highest"):
      ours = np.asarray(jax.jit(dense.apply)(weights, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
      theirs = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                  attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    valid = mask.astype(bool)  # logits of pad queries mean nothing
    worst = max(worst, float(np.abs(ours - theirs)[valid].max()))
    # The retrained weights moved the logits, so the check cannot pass on the fixture's.
    assert np.abs(ours - ref["logits"])[valid].max() > 100 * ATOL
  print(f"{arch}: max |dlogit| {worst:.2e}")
  assert worst < ATOL


# transformers' fp8 quantizer (FineGrainedFP8) names the per-tensor dequantization
# multiplier ``weight_scale_inv``; vLLM's format, which save_fp8 writes, names the same
# multiplier ``weight_scale``. Unmapped, transformers drops it as an unexpected key and runs
# on the unscaled FP8 values.
FP8_KEY_MAPPING = {r"\.weight_scale$": ".weight_scale_inv"}


def _logits(hf, ids, mask):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
              attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()


def _fp8_by_transformers(out):
  """The folder through transformers' own FP8 loader, dequantizing (its CPU path)."""
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True,
      key_mapping=FP8_KEY_MAPPING,
      quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                       "error_msgs")), info
  return hf.eval()


def _fp8_by_hand(out):
  """The folder dequantized here (weight * weight_scale) into the unquantized class."""
  from safetensors.torch import load_file
  tensors = load_file(str(pathlib.Path(out) / "model.safetensors"))
  weights = {name: t.to(torch.float32) * tensors[name + "_scale"]
             if t.dtype == torch.float8_e4m3fn else t.to(torch.float32)
             for name, t in tensors.items() if not name.endswith(".weight_scale")}
  cfg = json.loads((pathlib.Path(out) / "config.json").read_text())
  assert cfg.pop("quantization_config")["quant_method"] == "fp8"
  config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
  hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     attn_implementation="eager")
  res = hf.load_state_dict(weights, strict=False)
  tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
  assert not res.unexpected_keys and set(res.missing_keys) <= tied, res
  return hf.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_export_matches_transformers(arch, tmp_path):
  pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate")
  model, params = _trained(arch)
  out = export.save_fp8(str(tmp_path / arch), model, params)
  routes = {"transformers": _fp8_by_transformers(out), "by hand": _fp8_by_hand(out)}

  # Our model on the trained weights: the melded kernels' backbones (FP8 bytes / scale) in
  # the unmelded model, all float32. Both torch routes multiply the same bytes by the
  # exported 1 / scale, which differs from dividing by scale by float32 rounding only, so
  # the difference is float32 matmul noise, bounded as in the bf16 test.
  dense, _ = models.split(models.load(str(FIXTURES / arch)).model)
  # The fixture melded but not trained: the check must tell the merged FP8 rows apart.
  _, untrained = models.split(models.load(str(FIXTURES / arch), rank=16).model)
  ref = np.load(FIXTURES / arch / "reference.npz")
  worst = dict.fromkeys(routes, 0.0)
  for ids, mask in ((ref["input_ids"], ref["attention_mask"]),
                    (ref["input_ids_padded"], ref["attention_mask_padded"])):
    with jax.default_matmul_precision("highest"):
      ours, before = (np.asarray(jax.jit(dense.apply)(falqon_jax.unmeld(p), jnp.asarray(ids),
                                                      jnp.asarray(mask)))
                      for p in (params, untrained))
    valid = mask.astype(bool)  # logits of pad queries mean nothing
    assert np.abs(ours - before)[valid].max() > 100 * ATOL
    for route, hf in routes.items():
      worst[route] = max(worst[route], float(np.abs(ours - _logits(hf, ids, mask))[valid].max()))
  print(f"{arch}: max |dlogit| " + ", ".join(f"{r} {w:.2e}" for r, w in worst.items()))
  assert max(worst.values()) < ATOL, worst
