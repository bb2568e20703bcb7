"""A bf16 export of a trained (melded) model loads in transformers' own PyTorch classes and
gives our model's logits.

Needs torch and transformers >= 5, which the default test set does not install, so this
module is skipped there. To run it, in a venv with both:
``python -m pytest -q -s tests/test_export_torch.py``.
"""

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
