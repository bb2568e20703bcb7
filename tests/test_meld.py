import jax
import jax.numpy as jnp
import numpy as np
import pytest

import falqon_jax


def _llama_like(rng, hidden=64, inter=128, vocab=250, layers=2):
  def k(i, o):
    return jnp.asarray(rng.standard_normal((i, o)) * 0.05, jnp.float32)
  layer = lambda: {
      "self_attn": {p: {"kernel": k(hidden, hidden)} for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "mlp": {"gate_proj": {"kernel": k(hidden, inter)}, "up_proj": {"kernel": k(hidden, inter)},
              "down_proj": {"kernel": k(inter, hidden)}},
      "input_layernorm": {"weight": jnp.ones(hidden)},
  }
  return {
      "model": {
          "embed_tokens": {"embedding": k(vocab, hidden)},
          "layers": {str(i): layer() for i in range(layers)},
          "norm": {"weight": jnp.ones(hidden)},
      },
      "lm_head": {"kernel": k(hidden, 256)},
  }


def test_default_targets_meld_projections_and_skip_the_rest(rng):
  params = _llama_like(rng)
  params["model"]["odd"] = {"kernel": jnp.ones((64, 40))}  # 40 % 16 != 0
  melded, report = falqon_jax.meld(params, rank=16)
  paths = {m.path for m in report.melded}
  assert len(paths) == 14 and "model/layers/0/self_attn/q_proj/kernel" in paths
  skipped = {s.path: s.reason for s in report.skipped}
  assert "embedding or LM head" in skipped["lm_head/kernel"]
  assert skipped["model/embed_tokens/embedding"] == "not a dense kernel"
  assert "multiples of 16" in skipped["model/odd/kernel"]
  assert isinstance(melded["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"], falqon_jax.MeldedKernel)
  assert melded["lm_head"]["kernel"] is params["lm_head"]["kernel"]
  # Trainable = sum(out * rank) = 2 layers * 16 * (4*64 + 2*128 + 64).
  assert report.num_trainable == 2 * 16 * (4 * 64 + 2 * 128 + 64)
  assert "melded 14 kernels" in str(report)


def test_regex_and_predicate_targets(rng):
  params = _llama_like(rng)
  _, rep = falqon_jax.meld(params, rank=8, targets=r"(q|k|v)_proj/kernel$")
  assert sorted(m.path.split("/")[-2] for m in rep.melded) == [
      "k_proj", "k_proj", "q_proj", "q_proj", "v_proj", "v_proj"]
  _, rep = falqon_jax.meld(params, rank=8, targets=lambda path, leaf: "mlp" in path and path.endswith("kernel"))
  assert len(rep.melded) == 6
  # Explicit targets may include the LM head if the user asks for it.
  _, rep = falqon_jax.meld(params, rank=8, targets=r"lm_head/kernel")
  assert [m.path for m in rep.melded] == ["lm_head/kernel"]


def test_llama_7b_trainable_count_matches_the_reference():
  def layer():
    sq = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    return {"q_proj": {"kernel": sq}, "k_proj": {"kernel": sq}, "v_proj": {"kernel": sq},
            "o_proj": {"kernel": sq},
            "gate_proj": {"kernel": jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)},
            "up_proj": {"kernel": jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)},
            "down_proj": {"kernel": jax.ShapeDtypeStruct((11008, 4096), jnp.bfloat16)}}
  shapes = {"layers": {str(i): layer() for i in range(32)},
            "lm_head": {"kernel": jax.ShapeDtypeStruct((4096, 32001), jnp.bfloat16)}}
  reports = []

  def run(p):
    melded, report = falqon_jax.meld(p, rank=64)
    reports.append(report)
    return melded

  out = jax.eval_shape(run, shapes)  # abstract: no 7B SVDs are run
  assert reports[0].num_trainable == 87_031_808
  assert len(reports[0].melded) == 224
  q = out["layers"]["0"]["q_proj"]["kernel"]
  assert q.qweight.shape == (4096 + 64, 4096) and q.qweight.dtype == jnp.float8_e4m3fn


def test_already_melded_is_skipped_and_unmeld_restores_kernels(rng):
  params = _llama_like(rng, layers=1)
  melded, _ = falqon_jax.meld(params, rank=16)
  again, rep = falqon_jax.meld(melded, rank=16)
  assert all(s.reason == "already melded" for s in rep.skipped if "proj" in s.path)
  assert not rep.melded
  plain = falqon_jax.unmeld(melded, dtype=jnp.bfloat16)
  q = plain["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  orig = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert q.dtype == jnp.bfloat16 and q.shape == orig.shape
  np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(orig), atol=float(jnp.abs(orig).max()) / 14)
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(params)


def test_random_init_gives_each_layer_its_own_key(rng):
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)}}
  params["b"]["kernel"] = params["a"]["kernel"]
  melded, _ = falqon_jax.meld(params, rank=8, init="random", key=jax.random.key(0))
  assert not np.array_equal(np.asarray(melded["a"]["kernel"].lora_a()), np.asarray(melded["b"]["kernel"].lora_a()))


def test_random_init_without_a_key_uses_the_options_seed(rng):
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)}}
  a_of = lambda tree: [np.asarray(tree[n]["kernel"].lora_a()) for n in ("a", "b")]
  bare, _ = falqon_jax.meld(params, rank=8, init="random")
  keyed, _ = falqon_jax.meld(params, rank=8, init="random", key=jax.random.key(0))
  other, _ = falqon_jax.meld(params, options=falqon_jax.RECOMMENDED.replace(
      rank=8, init="random", seed=1))
  np.testing.assert_array_equal(a_of(bare), a_of(keyed))  # one program, same key: exact
  assert not np.array_equal(a_of(bare)[0], a_of(other)[0])


def test_rank_argument_overrides_the_options_rank(rng):
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)}}
  opts = falqon_jax.REFERENCE.replace(rank=16)
  assert falqon_jax.meld(params, options=opts)[0]["a"]["kernel"].rank == 16
  assert falqon_jax.meld(params, 8, options=opts)[0]["a"]["kernel"].rank == 8


@pytest.mark.parametrize("targets,err,msg", [
    (r"q_proj", ValueError, "must be a 2-D"),  # matches the 1-D bias too
    (r"odd/kernel", ValueError, "multiples of 16: narrow `targets`"),
    (r"nothing_here", ValueError, "matched no parameter"),
    (r"bad(", ValueError, "not a valid regex"),
    (42, TypeError, "targets must be None, a regex"),
    (r"nan_layer/kernel", ValueError, "contains NaN or Inf"),
])
def test_bad_input_errors(rng, targets, err, msg):
  params = {"q_proj": {"kernel": jnp.ones((32, 32)), "bias": jnp.ones(32)},
            "odd": {"kernel": jnp.ones((32, 40))},
            "nan_layer": {"kernel": jnp.full((32, 32), jnp.nan)}}
  with pytest.raises(err, match=msg):
    falqon_jax.meld(params, rank=8, targets=targets)


def test_bad_rank(rng):
  params = {"a": {"kernel": jnp.ones((32, 48))}}
  with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in, out\)\] = \[1, 32\] for kernel 'a/kernel'"):
    falqon_jax.meld(params, rank=64)


def test_numpy_integer_rank_is_accepted_and_stored_as_int(rng):
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)}}
  want, _ = falqon_jax.meld(params, rank=8)
  melded, report = falqon_jax.meld(params, rank=np.int64(8))
  assert type(report.melded[0].rank) is int and type(melded["a"]["kernel"].rank) is int
  assert melded["a"]["kernel"].qweight.tobytes() == want["a"]["kernel"].qweight.tobytes()
  for bad in (True, 8.0, np.float32(8)):
    with pytest.raises(TypeError, match="rank must be an int"):
      falqon_jax.meld(params, rank=bad)


_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def _group_scales(melded, layer):
  node = melded["model"]["layers"][layer]
  return {names: [float(node[m][n]["kernel"].scale) for n in names] for m, names in _GROUPS}


def test_params_tree_meld_shares_one_scale_per_fused_group(rng):
  params = _llama_like(rng)
  for i in ("0", "1"):  # members of very different size, so their own scales differ
    params["model"]["layers"][i]["self_attn"]["v_proj"]["kernel"] *= 7.0
    params["model"]["layers"][i]["mlp"]["up_proj"]["kernel"] *= 0.2
  grouped, report = falqon_jax.meld(params, rank=8)
  alone, report_alone = falqon_jax.meld(params, rank=8, fused_groups=False)
  assert report == report_alone
  for i in ("0", "1"):
    own, shared = _group_scales(alone, i), _group_scales(grouped, i)
    for names in own:
      assert len(set(own[names])) == len(names)
      # The smallest scale (largest amax): no member saturates; a min of the same f32s.
      assert set(shared[names]) == {min(own[names])}
    attn = grouped["model"]["layers"][i]["self_attn"]
    w = params["model"]["layers"][i]["self_attn"]["q_proj"]["kernel"].T
    mk = attn["q_proj"]["kernel"]  # the member's W quantized with the shared scale
    np.testing.assert_array_equal(
        np.asarray(mk.qweight[: mk.out_features], np.float32),
        np.asarray(falqon_jax.fp8.quantize(w, mk.scale), np.float32))
  # Layers outside a group keep their own scale.
  o = params["model"]["layers"]["0"]["self_attn"]["o_proj"]
  assert (grouped["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"].qweight.tobytes()
          == falqon_jax.meld(o, rank=8)[0]["kernel"].qweight.tobytes())


def test_params_tree_meld_equals_melding_the_nnx_model():
  from flax import nnx
  from falqon_jax import models, nnx as fnnx
  lm = models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0))
  _, params = models.split(lm)
  melded, _ = falqon_jax.meld(params, rank=8)
  fnnx.meld(lm, rank=8)
  _, want = models.split(lm)
  got_leaves = jax.tree.leaves(melded, is_leaf=falqon_jax.is_melded)
  want_leaves = jax.tree.leaves(want, is_leaf=falqon_jax.is_melded)
  assert sum(map(falqon_jax.is_melded, got_leaves)) == 14
  for a, b in zip(got_leaves, want_leaves):
    assert type(a) is type(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_params_tree_meld_refuses_a_partial_fused_group(rng):
  params = _llama_like(rng)
  with pytest.raises(ValueError) as e:
    falqon_jax.meld(params, rank=8, targets=r"(q|v)_proj")
  msg = str(e.value)
  assert "\n" not in msg
  assert "targets meld q_proj but not k_proj of model/layers/0/self_attn" in msg
  assert 'target the whole group (e.g. r"(q|k|v)_proj")' in msg
  _, report = falqon_jax.meld(params, rank=8, targets=r"(gate|up)_proj")
  assert len(report.melded) == 4
  # The reference has no groups: it melds what it is told, each with its own scale.
  _, report = falqon_jax.meld(params, rank=8, targets=r"(q|v)_proj",
                              options=falqon_jax.REFERENCE)
  assert len(report.melded) == 4
