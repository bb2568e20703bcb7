"""Tests for the benchmark harness: each method's layer, and the falqon_jax.models.CausalLM
running it on every projection, against a float reference; which leaves a train step
changes; smoke runs of benchmarks/step_time.py and benchmarks/quality.py.

The smoke runs are subprocesses (as CI would run the scripts) with XLA's CPU backend
optimizations off: at these sizes compiling is most of the time, and it checks nothing.
The quality run gets a small made-up corpus in tmp_path, so it never needs ../shared.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import falqon_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import methods as M  # noqa: E402

KINDS = M.METHODS
IN, OUT, RANK, N = 128, 64, 16, 48  # NF4 needs in % 64 == 0


def _state(kind, rng):
  w = jnp.asarray(rng.normal(0, 0.05, (IN, OUT)), jnp.float32)
  state = M.Method(kind, kind, rank=RANK, alpha=RANK).prepare_kernel(w, jax.random.key(0))
  if kind != "falqon":  # B = 0 at init hides the branch; make it count
    state = dataclasses.replace(
        state, b=jnp.asarray(rng.normal(0, 0.05, (RANK, OUT)), jnp.float32))
  return w, state


def _float_forward(kind, w, state, x):
  """The method's function in f32 on the unquantized weight (FALQON: delta is 0)."""
  x = x.astype(jnp.float32)
  if kind == "falqon":
    return x @ w
  return x @ w + (x @ state.a) @ state.b * state.scaling


# Relative Frobenius error bounds: bf16 rounding, e4m3 (3 mantissa bits) on x and W,
# NF4's 16 levels per block of 64.
FWD_TOL = {"bf16-lora": 0.02, "fp8-base-lora": 0.08, "fp8-all-lora": 0.08,
           "qlora-nf4": 0.15, "falqon": 0.08}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_forward_close_to_float(kind, rng):
  w, state = _state(kind, rng)
  x = jnp.asarray(rng.normal(0, 1, (N, IN)), jnp.bfloat16)
  y = M.apply_state(x, state)
  assert y.dtype == jnp.bfloat16 and y.shape == (N, OUT)
  assert _rel(y, _float_forward(kind, w, state, x)) < FWD_TOL[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_layer_gradients_close_to_float_and_only_trainable(kind, rng):
  w, state = _state(kind, rng)
  x = jnp.asarray(rng.normal(0, 1, (N, IN)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(0, 1, (N, OUT)), jnp.bfloat16)
  fields = M.trainable_fields(state)
  assert fields == (("delta",) if kind == "falqon" else ("a", "b"))
  t = {f: getattr(state, f) for f in fields}

  def loss(t, x):
    y = M.apply_state(x, dataclasses.replace(state, **t))
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))

  dt, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(t, x)
  assert set(dt) == set(fields)

  if kind == "falqon":  # y = x W + (x A^T) delta^T, differentiated at delta = 0
    a = state.lora_a(jnp.float32)
    ref = jax.grad(lambda d, x: jnp.sum(
        (x @ w + (x @ a.T) @ d.T) * g.astype(jnp.float32)), argnums=(0, 1))
    ref_dt, ref_dx = ref(jnp.zeros_like(state.delta), x.astype(jnp.float32))
    ref_dt = {"delta": ref_dt}
  else:
    ref = jax.grad(lambda t, x: jnp.sum(
        _float_forward(kind, w, dataclasses.replace(state, **t), x)
        * g.astype(jnp.float32)), argnums=(0, 1))
    ref_dt, ref_dx = ref(t, x.astype(jnp.float32))
  tol = 0.02 if kind == "bf16-lora" else 0.15
  assert _rel(dx, ref_dx) < tol
  for f in fields:
    assert _rel(dt[f], ref_dt[f]) < tol, f


STATE_TYPES = {"bf16-lora": M.LoraKernel, "fp8-base-lora": M.Fp8BaseLoraKernel,
               "fp8-all-lora": M.Fp8AllLoraKernel, "qlora-nf4": M.Nf4LoraKernel,
               "falqon": falqon_jax.MeldedKernel}
PROJECTIONS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def _tiny_cfg():
  return M.llama_config(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny():
  """A random-init one-layer Llama computing in bf16: (config, model, params)."""
  cfg = _tiny_cfg()
  model, params = M.build(cfg, jax.random.key(0))
  return cfg, model, params


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0, compiler_options=M.FAST_COMPILE)
def _logits(model, params):
  return model.apply(params, TOKENS)


def _projections(params):
  layer = params["layers"][0]
  return {p: layer[p.split("/")[0]][p.split("/")[1]]["kernel"] for p in PROJECTIONS}


def _leaves(tree):
  return dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=M.is_state)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_prepared_model_runs_the_method_on_every_projection(kind, rng, tiny):
  cfg, model, base = tiny
  method = M.Method(kind, kind, rank=RANK, alpha=RANK)
  pmodel, params = method.prepare(model, base, jax.random.key(2))
  states = _projections(params)
  assert all(type(s) is STATE_TYPES[kind] for s in states.values()), states
  base_leaves = _leaves(base)
  for path, leaf in _leaves(params).items():
    if not M.is_state(leaf):  # embeddings, norms, LM head: the base's, copied
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(base_leaves[path]))
  # build() makes the same graph: the state scope sizes the model the other scopes train.
  bmodel, bparams = M.build(cfg, jax.random.key(0), method)
  assert bmodel == pmodel
  assert jax.tree_util.tree_structure(bparams) == jax.tree_util.tree_structure(params)

  if kind != "falqon":  # B = 0 at init hides the branch; make it count
    params = jax.tree_util.tree_map(
        lambda s: dataclasses.replace(s, b=jnp.asarray(rng.normal(0, 0.05, s.b.shape),
                                                        jnp.float32)) if M.is_state(s) else s,
        params, is_leaf=M.is_state)
  # The float model: every projection's kernel is W (+ s A B), f32 throughout. FALQON's
  # forward is x W alone (B only reaches W through merges).
  ref_model, _ = M.build(cfg, jax.random.key(0), dtype=jnp.float32)
  eff = lambda s, w: (w.astype(jnp.float32) if not M.is_state(s) or kind == "falqon"
                      else _float_forward(kind, w.astype(jnp.float32), s, jnp.eye(w.shape[0])))
  ref = jax.tree_util.tree_map(eff, params, base, is_leaf=M.is_state)
  got, want = _logits(pmodel, params), _logits(ref_model, ref)
  # One decoder layer over an exact embedding: the logits stay within the per-layer bound.
  # Without the LoRA branch they would be about 0.5 off.
  assert got.dtype == jnp.float32 and _rel(got, want) < FWD_TOL[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_train_steps_change_only_trainable_leaves(kind, tiny):
  _, model, base = tiny
  method = M.Method(kind, kind, rank=RANK)
  pmodel, params = method.prepare(model, base, jax.random.key(2))
  # Host copies of device copies: a numpy view of a CPU buffer would block its donation.
  before = _leaves(jax.tree_util.tree_map(lambda x: np.asarray(jnp.copy(x)), params))
  opt = method.optimizer()
  opt_state = opt.init(params)
  lr = jnp.float32(0.1)
  step = M.make_train_step(pmodel, opt, remat=True).lower(params, opt_state, TOKENS, lr)
  step = step.compile(M.FAST_COMPILE)
  for _ in range(2):  # LoRA's A gets a gradient once B is nonzero, from the second step
    params, opt_state, loss = step(params, opt_state, TOKENS, lr)
  assert np.isfinite(float(loss))
  # The steps donated the prepared copy, never the base.
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(base))
  for path, new in _leaves(params).items():
    old = before[path]
    if not M.is_state(new):
      np.testing.assert_array_equal(np.asarray(new), old)
      continue
    for f in dataclasses.fields(new):
      if f.metadata.get("static"):
        continue
      a, b = getattr(old, f.name), np.asarray(getattr(new, f.name))
      if kind == "falqon" and f.name == "qweight":  # each merge rewrites at most k rows
        changed = np.any(a.view(np.uint8) != b.view(np.uint8), axis=1)
        assert 0 < changed.sum() <= 2 * RANK and not changed[new.out_features:].any()
      elif kind == "falqon" and f.name == "delta":
        np.testing.assert_array_equal(b, 0)  # reset="all"
      elif f.name in M.trainable_fields(new):
        assert not np.array_equal(a, b), (path, f.name)
      else:
        np.testing.assert_array_equal(a.reshape(-1).view(np.uint8),
                                      b.reshape(-1).view(np.uint8), f"{path} {f.name}")


def test_nf4_round_trip_and_packing():
  levels = jnp.asarray(M.NF4_CODE)
  w = jnp.tile(levels, (2, 8)) * jnp.array([[2.0], [0.5]])  # (2, 128), on the grid
  codes, absmax = M.nf4_quantize(w)
  assert codes.shape == (2, 64) and codes.dtype == jnp.uint8 and absmax.shape == (2, 2)
  np.testing.assert_array_equal(M.nf4_dequantize(codes, absmax, jnp.float32), w)
  assert int(codes[0, 0]) == 0x01  # codes 0 and 1 share the first byte, high nibble first


def test_method_specs():
  m = M.make_method("falqon[reset=merged,rounding=stochastic,top_k=4]", 16)
  assert m.options == {"reset": "merged", "rounding": "stochastic", "top_k": 4}
  assert M.make_method("falqon[fused_groups=true]", 16).falqon_options.fused_groups is True
  live = M.make_method("falqon[live_delta=true,merge_every=10]", 16).falqon_options
  assert live.live_delta is True and live.merge_every == 10
  for bad in ("lora", "bf16-lora[reset=all]", "falqon[speed=fast]", "falqon[reset]",
              "falqon[fused_groups=1]", "falqon[merge_every=10]", "falqon[live_delta=yes]"):
    with pytest.raises(ValueError):
      M.make_method(bad, 16)


def _run(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


FIVE = "bf16-lora,fp8-base-lora,fp8-all-lora,qlora-nf4,falqon"


@pytest.mark.slow
def test_step_time_smoke(tmp_path):
  out = tmp_path / "st.json"
  stdout = _run([os.path.join(BENCH, "step_time.py"), "--smoke", "--steps", "1",
                 "--methods", FIVE, "--json", str(out)], tmp_path)
  assert "say nothing about FP8 speed" in stdout and "Model scope" in stdout
  result = json.loads(out.read_text())
  assert result["smoke"] and result["peaks"]["copy_gbps"] > 0
  assert {r["method"] for r in result["layer"]} == set(FIVE.split(","))
  assert len(result["layer"]) == 3 * 5
  for r in result["layer"]:
    assert r["ms"] > 0 and r["floor_ms"] > 0 and 0 <= r["outside"] <= 1
  rows = {r["method"]: r for r in result["model"]}
  assert set(rows) == set(FIVE.split(","))
  assert all(r["finite_loss"] and r["ms"] > 0 for r in rows.values())
  # FALQON trains only B (out x r): fewer parameters than LoRA's A and B.
  assert rows["falqon"]["trainable"] < rows["bf16-lora"]["trainable"]
  state = {r["method"]: r for r in result["state"]}
  assert set(state) == set(FIVE.split(","))
  assert state["falqon"]["trainable"] == rows["falqon"]["trainable"]
  total = {m: r["params_gib"] + r["opt_state_gib"] for m, r in state.items()}
  assert total["falqon"] < total["fp8-base-lora"] < total["bf16-lora"]


def test_step_time_state_scope_at_7b_shape_allocates_nothing(tmp_path):
  out = tmp_path / "state.json"
  stdout = _run([os.path.join(BENCH, "step_time.py"), "--scope", "state", "--methods",
                 "bf16-lora,falqon", "--json", str(out)], tmp_path)
  assert "Persistent state at full depth" in stdout
  state = {r["method"]: r for r in json.loads(out.read_text())["state"]}
  # LLaMA-7B at rank 64: B is sum(out) x 64 = 87.0M parameters (LoRA: 159.9M).
  assert state["falqon"]["trainable"] == 87_031_808
  assert state["bf16-lora"]["trainable"] == 159_907_840
  ratio = ((state["falqon"]["params_gib"] + state["falqon"]["opt_state_gib"])
           / (state["bf16-lora"]["params_gib"] + state["bf16-lora"]["opt_state_gib"]))
  assert 0.5 < ratio < 0.55


def _tiny_corpus(folder):
  """Four made-up 'works' with different word statistics (no real text needed)."""
  rng = np.random.default_rng(0)
  vocab = ["thou", "art", "the", "king", "of", "night", "and", "my", "love", "is",
           "fair", "sweet", "death", "come", "hence", "lord"]
  folder.mkdir()
  for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
    p = np.roll(np.linspace(1, 3, len(vocab)), 4 * i)
    words = rng.choice(vocab, 12000, p=p / p.sum())
    lines = [" ".join(words[j:j + 8]) for j in range(0, len(words), 8)]
    (folder / f"{name}.txt").write_text(f"WORK {name.upper()}\n" + "\n".join(lines))


@pytest.mark.slow
def test_quality_quick(tmp_path):
  corpus = tmp_path / "corpus"
  _tiny_corpus(corpus)
  out = tmp_path / "q.json"
  stdout = _run([os.path.join(BENCH, "quality.py"), "--quick", "--corpus", str(corpus),
                 "--held-out", "delta", "--methods", FIVE, "--json", str(out)], tmp_path)
  assert "keeps" in stdout
  result = json.loads(out.read_text())
  assert result["held_out"] == ["delta"]
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == set(FIVE.split(","))
  for r in rows.values():
    assert np.isfinite(r["test"]) and r["best_lr"] > 0
  assert rows["bf16-lora"]["gain"] > 0  # fine-tuning on the held-out work helps
  assert rows["bf16-lora"]["kept"] == pytest.approx(1.0)


def test_quality_missing_corpus_skips_cleanly(tmp_path, capsys):
  import quality

  assert quality.main(["--quick", "--corpus", str(tmp_path / "absent")]) is None
  out = capsys.readouterr().out
  assert "quality benchmark skipped: no corpus at" in out and "--corpus" in out


@pytest.mark.parametrize("flags", [[], ["--no-native"]])
def test_merge_cost_smoke(tmp_path, flags):
  stdout = _run([os.path.join(BENCH, "merge_cost.py"), "--in_features", "256", "--out", "256",
                 "--rank", "16", "--k", "16", "--repeats", "2", *flags], tmp_path)
  assert "bit-identical results: True" in stdout
  assert ("uint8 view" in stdout) == bool(flags)
  assert "speedup:" in stdout


def test_kernels_smoke(tmp_path):
  out = tmp_path / "k.json"
  stdout = _run([os.path.join(BENCH, "kernels.py"), "--smoke", "--json", str(out)], tmp_path)
  assert "device-to-device copy" in stdout
  rows = json.loads(out.read_text())["rows"]
  # 4 quantize variants and 2 merge roundings, each in both implementations.
  assert len(rows) == 2 * (4 + 2)
  assert {r["impl"] for r in rows} == {"xla", "pallas"}
  for r in rows:
    assert "error" not in r and r["mismatches"] == 0 and r["us"] > 0, r


@pytest.mark.slow
def test_gpu_session_script_dry_run(tmp_path):
  """One stage end to end on CPU: env.txt, the step's log and JSON, the summary."""
  env = dict(os.environ, OUT=str(tmp_path), GPU_SESSION_ALLOW_CPU="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_session.sh"), "layer"],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "jax" in (tmp_path / "env.txt").read_text()
  assert "=== layer: exit 0" in (tmp_path / "summary.txt").read_text()
  assert len(json.loads((tmp_path / "layer.json").read_text())["layer"]) == 3 * 6


def test_gpu_session_script_refuses_unknown_stages(tmp_path):
  script = os.path.join(BENCH, "gpu_session.sh")
  proc = subprocess.run(["bash", script, "warp"], capture_output=True, text=True,
                        env=dict(os.environ, OUT=str(tmp_path)))
  assert proc.returncode == 2 and "unknown stage 'warp'" in proc.stdout
  proc = subprocess.run(["bash", script], capture_output=True, text=True)
  assert proc.returncode == 2 and "Stages" in proc.stdout


def test_step_time_gpu_only_reporting(capsys):
  """The target check, the per-layer extrapolation and the tables run on a GPU only:
  check them here on made-up rows."""
  import step_time as S

  def row(method, kind, layers, ms, peak, error=None):
    if error:
      return {"method": method, "shape": "7b", "layers": layers, "error": error}
    return dict(method=method, kind=kind, shape="7b", layers=layers, n=8448, ms=ms,
             tokens_per_s=8448 / ms * 1e3, compiled_mib=None, device_peak_mib=peak,
             trainable=1, fp8_calls=3 if kind in S.FP8_KINDS else 0, finite_loss=True,
             floor_ms=ms / 2, floor_fused_ms=ms / 2)

  rows = [row("bf16-lora", "bf16-lora", 4, 100.0, 1000.0),
          row("bf16-lora", "bf16-lora", 8, 180.0, 1800.0),
          row("falqon", "falqon", 4, 55.0, 500.0), row("falqon", "falqon", 8, 95.0, 1100.0),
          row("fp8-base-lora", "fp8-base-lora", 4, 60.0, 600.0),
          row("qlora-nf4", "qlora-nf4", 4, 200.0, 400.0),
          row("fp8-all-lora", "fp8-all-lora", 8, 0, 0, error="RESOURCE_EXHAUSTED")]
  lines = S.check_targets(rows)
  assert "7b L=4 falqon vs bf16-lora: 1.82x (target >= 1.7x) met" in lines
  assert "7b L=4 falqon vs fp8-base-lora: 1.09x (target >= 1.12x) MISSED" in lines
  assert "7b L=4 falqon vs qlora-nf4: 3.64x (target >= 3.0x) met" in lines
  assert "7b L=8 falqon peak memory 0.61x bf16-lora (target <= 0.6x) MISSED" in lines
  ext = {e["method"]: e for e in S.extrapolate(rows)}
  assert set(ext) == {"bf16-lora", "falqon"}  # one depth only: nothing to extrapolate
  assert ext["falqon"]["per_layer_ms"] == pytest.approx(10.0)
  assert ext["falqon"]["full_ms"] == pytest.approx(95.0 + 10.0 * 24)
  assert ext["falqon"]["vs_bf16"] == pytest.approx((180 + 20 * 24) / (95 + 10 * 24))
  S.print_model_table(rows, list(ext.values()))
  out = capsys.readouterr().out
  assert "FAILED: RESOURCE_EXHAUSTED" in out and "3 ok" in out and "extrapolated 7b" in out


def test_tpu_fp8_hlo_reads_the_dots_of_compiled_hlo():
  """The TPU check's HLO reader, on this CPU's compiled forward: it finds the fused
  ``[y | Ax]`` GEMM and its operand types. XLA CPU has no FP8 dot, so it widens the
  operands first, which the script would report as an upcast."""
  import tpu_fp8_hlo as T

  mk = falqon_jax.meld_kernel(jax.random.normal(jax.random.key(0), (64, 32)), 16)
  text = jax.jit(falqon_jax.melded_dense).lower(jnp.ones((8, 64), jnp.bfloat16), mk)
  (gemm,) = [g for g in T.gemms(text.compile().as_text()) if g["shape"] == (8, 32 + 16)]
  assert gemm["operands"] == ("f32", "f32")


def test_tpu_fp8_hlo_without_libtpu_says_so_in_one_line(tmp_path):
  import importlib.util
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed: the script would compile for every TPU generation")
  out = _run([os.path.join(BENCH, "tpu_fp8_hlo.py")], tmp_path)
  assert out.strip().splitlines() == [
      "tpu_fp8_hlo: libtpu is not installed; install the matching one with"
      " `pip install 'jax[tpu]'` to compile for TPUs without a device"]
