"""falqon_jax.lm_eval.LMEvalModel, the lm-eval-harness adapter, checked against the tiny
model's own logits: log-likelihoods (lm-eval's tokenization and truncation) and
is_greedy, rolling windows, generation until a stop string; then whole lm-eval runs on
tasks defined on local files, in Python and through the command line. All offline."""

import functools
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from falqon_jax import lm_eval as fl
from falqon_jax import export, models
from falqon_jax.data import ByteTokenizer
from falqon_jax.errors import UserInputError

TOK = ByteTokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id
POSITIONS = 128
MAX_GEN = 12
OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# The adapter scores with batched rows padded to a power of two; the reference forwards
# one row padded to the model's positions, the same weights. Both are float32 logits of a 2-layer, 64-wide
# model (|logit| < 10), so each log-probability differs by float32 rounding (~1e-6);
# 1e-5 per scored token leaves a 10x margin.
TOL_PER_TOKEN = 1e-5
MARGIN = 1e-3  # a greedy choice this far ahead of the runner-up cannot flip on rounding


@pytest.fixture(scope="module")
def lm_eval():
  return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tiny():
  cfg = models.tiny_config("llama", vocab_size=TOK.vocab_size, max_position_embeddings=POSITIONS)
  return models.split(models.CausalLM(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def lm(lm_eval, tiny):
  return fl.LMEvalModel.from_model(*tiny, TOK, batch_size=4, max_gen_toks=MAX_GEN)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, mask):
  return model.apply(params, ids, attention_mask=mask)


def _logp(tiny, ids) -> np.ndarray:
  """log-softmax of the model's logits for one row, in float64: ``[len(ids), V]``.

  The row is right padded to the model's positions (one compile for every reference);
  the causal mask keeps the pads out of every real token's context."""
  model, params = tiny
  row, mask = np.zeros((1, POSITIONS), np.int32), np.zeros((1, POSITIONS), np.int32)
  row[0, :len(ids)], mask[0, :len(ids)] = ids, 1
  logits = np.asarray(_forward(model, params, row, mask)[0, :len(ids)], np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _reference(tiny, context, continuation, max_len=POSITIONS):
  """lm-eval's loglikelihood contract by hand: (sum log p, is_greedy, scored tokens)."""
  whole = (list(context) + list(continuation))[-(max_len + 1):]
  lp = _logp(tiny, whole[:-1])
  steps = range(len(whole) - 1 - len(continuation), len(whole) - 1)
  score = sum(lp[t, whole[t + 1]] for t in steps)
  return score, all(np.argmax(lp[t]) == whole[t + 1] for t in steps), len(continuation)


def _greedy(tiny, ids, n):
  """Up to ``n`` greedy tokens after ``ids`` (stopping at EOS), by full recomputation, or
  None when some step is a near tie (where cached decoding may round the other way)."""
  ids, new = list(ids), []
  for _ in range(n):
    lp = _logp(tiny, ids)[-1]
    first, second = np.sort(lp)[-2:][::-1]
    if first - second < MARGIN:
      return None
    tok = int(np.argmax(lp))
    if tok == EOS:
      break
    new.append(tok)
    ids.append(tok)
  return new


def _ascii_greedy(tiny, n=3):
  """A context whose next ``n`` greedy tokens are ASCII (so they round-trip through text)."""
  for word in ("The", "a", "x", "Hello", "It", "0", "cat", "Is", "w", "Be", "q", "no", "zz"):
    new = _greedy(tiny, [BOS, *word.encode()], n)
    if new and len(new) == n and all(t < 128 for t in new):
      return word, bytes(new).decode()
  raise AssertionError("no context with an ASCII greedy continuation; add candidates")


def _instances(kind, args):
  from lm_eval.api.instance import Instance

  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_logits(lm, tiny):
  word, cont = _ascii_greedy(tiny)
  wrong = cont[:-1] + chr((ord(cont[-1]) + 1) % 128)
  cases = [  # (context, continuation): lm-eval strings, then the tokens lm-eval's contract gives
      (("The cat", " sat"), ([BOS, *b"The cat"], b" sat")),
      (("", "abc"), ([BOS], b"abc")),  # empty context: BOS
      (("2+2= ", "4"), ([BOS, *b"2+2="], b" 4")),  # trailing space moves to the continuation
      (("x" * 200, "yz"), ([BOS, *b"x" * 200], b"yz")),  # longer than the model: left cut
      ((word, cont), ([BOS, *word.encode()], cont.encode())),
      ((word, wrong), ([BOS, *word.encode()], wrong.encode())),
  ]
  got = lm.loglikelihood(_instances("loglikelihood", [c for c, _ in cases]), disable_tqdm=True)
  want = [_reference(tiny, ctx, list(cont)) for _, (ctx, cont) in cases]
  for (score, greedy), (ref, ref_greedy, n) in zip(got, want):
    assert abs(score - ref) <= TOL_PER_TOKEN * n
    assert greedy == ref_greedy
  assert [g for _, g in got] == [False, False, False, False, True, False]


def test_loglikelihood_rolling_windows(lm, tiny):
  from lm_eval import utils

  text = ("the quick brown fox jumps over the lazy dog; " * 3)[:100]
  tokens = list(text.encode())
  full = sum(_logp(tiny, [BOS] + tokens[:-1])[t, tokens[t]] for t in range(len(tokens)))
  short = fl.LMEvalModel.from_model(*tiny, TOK, batch_size=4, max_length=16)
  requests = _instances("loglikelihood_rolling", [(text,), ("",)])
  whole, empty = lm.loglikelihood_rolling(requests)
  windowed, _ = short.loglikelihood_rolling(requests)
  # One window when the text fits: the full text's log-likelihood after BOS.
  assert abs(whole - full) <= TOL_PER_TOKEN * len(tokens)
  assert empty == 0.0
  # Windows of 16 tokens: each token scored once, with at most 16 tokens of context.
  windows = [utils.make_disjoint_window(w) for w in
             utils.get_rolling_token_windows(tokens, BOS, 16, 1)]
  assert len(windows) == 7 and sum(len(c) for _, c in windows) == len(tokens)
  by_window = sum(_reference(tiny, ctx, cont)[0] for ctx, cont in windows)
  assert abs(windowed - by_window) <= TOL_PER_TOKEN * len(tokens)
  assert abs(windowed - full) > 100 * TOL_PER_TOKEN * len(tokens)  # context was cut


def _generation_case(tiny):
  """A prompt, its greedy text (MAX_GEN tokens, no near ties) and a stop character in it."""
  for prompt in ("Once", "The", "a b", "Hi", "1,2,"):
    new = _greedy(tiny, [BOS, *prompt.encode()], MAX_GEN)
    if new is None:
      continue
    text = TOK.decode(new)
    stops = [c for c in text[1:] if text.index(c) > 0]
    if stops:
      return prompt, new, text, stops[0]
  raise AssertionError("no prompt with a clear greedy generation; add candidates")


def test_generate_until_stops(lm, tiny):
  prompt, new, text, stop = _generation_case(tiny)
  got = lm.generate_until(_instances("generate_until", [
      (prompt, {"until": [stop], "do_sample": False}),
      (prompt, {"until": "never", "max_gen_toks": 5}),
      (prompt, {"until": ["never"], "do_sample": False, "temperature": 0.0, "top_p": 0.9}),
  ]))
  assert got[0] == text.split(stop)[0] and got[0] != text
  assert got[1] == TOK.decode(new[:5])  # max_gen_toks
  assert got[2] == text  # lm.max_gen_toks by default; greedy ignores top_p


def _write_tasks(folder, tiny):
  """Three tasks on local jsonl files (multiple choice, rolling, generation) and the
  expected results: ``(task names, fj_choice acc, fj_rolling log-likelihoods)``."""
  choice = [{"question": "The cat", "choices": ["sat", "dog", "7"], "answer": 0},
            {"question": "2+2=", "choices": ["4", "5"], "answer": 1}]
  texts = [{"text": "hello world"}, {"text": "falqon melds fp8 lora"}]
  prompt, _, text, stop = _generation_case(tiny)
  gen = [{"prompt": prompt, "answer": text.split(stop)[0]}, {"prompt": prompt, "answer": "no"}]
  tasks = {
      "fj_choice": (choice, {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                             "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                             "metric_list": [{"metric": "acc"}]}),
      "fj_rolling": (texts, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                             "doc_to_target": "{{text}}",
                             "metric_list": [{"metric": "word_perplexity"}]}),
      "fj_gen": (gen, {"output_type": "generate_until", "doc_to_text": "{{prompt}}",
                       "doc_to_target": "{{answer}}",
                       "generation_kwargs": {"until": [stop], "do_sample": False},
                       "metric_list": [{"metric": "exact_match"}]}),
  }
  for name, (rows, spec) in tasks.items():
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    spec = {"task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": data},
                               "cache_dir": os.path.join(folder, "hf-cache")}, **spec}
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
      json.dump(spec, f)  # JSON is YAML
  picks = [np.argmax([_reference(tiny, [BOS, *d["question"].encode()], f" {c}".encode())[0]
                      for c in d["choices"]]) for d in choice]
  acc = np.mean([p == d["answer"] for p, d in zip(picks, choice)])
  rolling = [sum(_logp(tiny, [BOS, *t][:-1])[i, t[i]] for i in range(len(t)))
             for t in (list(d["text"].encode()) for d in texts)]
  return list(tasks), acc, rolling


def test_simple_evaluate_local_tasks(lm, tiny, tmp_path, monkeypatch):
  import lm_eval
  from lm_eval.tasks import TaskManager

  for k, v in OFFLINE.items():
    monkeypatch.setenv(k, v)
  names, acc, rolling = _write_tasks(str(tmp_path), tiny)
  out = lm_eval.simple_evaluate(
      model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path),
                                                      include_defaults=False),
      log_samples=True, bootstrap_iters=0)
  results = out["results"]
  assert results["fj_choice"]["acc,none"] == acc
  assert results["fj_gen"]["exact_match,none"] == 0.5  # the first answer is the greedy text
  got = [s["resps"][0][0] for s in sorted(out["samples"]["fj_rolling"],
                                          key=lambda s: s["doc_id"])]
  for g, ref, doc in zip(got, rolling, ("hello world", "falqon melds fp8 lora")):
    assert abs(g - ref) <= TOL_PER_TOKEN * len(doc)


@pytest.mark.slow
def test_command_line_on_local_task(lm_eval, tiny, tmp_path):
  """``python -m falqon_jax.lm_eval`` (the ``falqon-jax-lm-eval`` script) runs lm-eval's
  command line with ``--model falqon_jax`` on an exported folder."""
  folder = str(tmp_path / "model")
  export.save_bf16(folder, *tiny, dtype=jnp.float32)  # float32: the fixture's exact weights
  _, acc, _ = _write_tasks(str(tmp_path), tiny)
  out = tmp_path / "out"
  env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}
  proc = subprocess.run(
      [sys.executable, "-m", "falqon_jax.lm_eval", "--model", "falqon_jax",
       "--model_args", f"pretrained={folder},max_gen_toks={MAX_GEN}", "--batch_size", "4",
       "--tasks", "fj_choice", "--include_path", str(tmp_path), "--output_path", str(out),
       "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
  with open(path) as f:
    assert json.load(f)["results"]["fj_choice"]["acc,none"] == acc
  (path,) = glob.glob(str(out / "**" / "samples_fj_choice_*.jsonl"), recursive=True)
  with open(path) as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 2
  for s in samples:  # arguments {gen_args_i: {arg_0: context, arg_1: continuation}}
    for args, ((score, _),) in zip(s["arguments"].values(), s["resps"]):
      ref = _reference(tiny, [BOS, *args["arg_0"].encode()], args["arg_1"].encode())
      assert abs(float(score) - ref[0]) <= TOL_PER_TOKEN * ref[2]


def test_bos_follows_the_hf_tokenizer(lm_eval, tiny, tmp_path):
  """Like lm-eval's hf backend, text gets BOS exactly when the HF tokenizer adds it by
  default, and never a second one before text that starts with it."""
  tokenizers = pytest.importorskip("tokenizers")
  from falqon_jax.data import load_tokenizer

  for adds_bos in (True, False):
    folder = tmp_path / f"tok-{adds_bos}"
    folder.mkdir()
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if adds_bos:
      tk.post_processor = tokenizers.processors.TemplateProcessing(
          single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = load_tokenizer(str(folder))
    adapter = fl.LMEvalModel.from_model(*tiny, tok)
    assert adapter.add_bos_token is adds_bos
    assert adapter.tok_encode("a b") == tok.hf.encode("a b") == [1] * adds_bos + [3, 4]
    assert adapter.tok_encode("<s> a") == [1, 3]


def test_bad_arguments_are_one_line_errors(lm, tiny, tmp_path):
  missing = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    fl.LMEvalModel(pretrained=missing)
  with pytest.raises(UserInputError, match="needs model_args pretrained="):
    fl.LMEvalModel()
  for options, message in [({"batch_size": "auto"}, "not supported; pass an int"),
                           ({"max_length": POSITIONS + 1}, "exceeds the model's 128"),
                           ({"dtype": "bfloat16"}, "unknown falqon_jax model_args dtype")]:
    with pytest.raises(UserInputError, match=message):
      fl.LMEvalModel.from_model(*tiny, TOK, **options)
  for kwargs, message in [({"max_gen_toks": POSITIONS}, "leaves no room for a prompt"),
                          ({"do_sample": False, "repetition_penalty": 1.1},
                           "unsupported generation kwargs repetition_penalty")]:
    with pytest.raises(UserInputError, match=message):
      lm.generate_until(_instances("generate_until", [("a", {"until": ["."], **kwargs})]))


def test_missing_lm_eval_is_one_line_error():
  """Without lm-eval installed, asking for the adapter (or its command) names the fix."""
  block = "import sys; sys.modules['lm_eval'] = None; "  # as if lm-eval were not installed
  proc = subprocess.run(
      [sys.executable, "-c", block + "import falqon_jax.lm_eval as fl; fl.LMEvalModel"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'ImportError: lm-eval is not installed: pip install "falqon-jax[lm-eval]"')
  proc = subprocess.run(
      [sys.executable, "-c", block + "from falqon_jax.lm_eval import main; sys.exit(main([]))"],
      capture_output=True, text=True, timeout=300)
  assert (proc.returncode, proc.stderr) == (2, 'falqon-jax-lm-eval: error: lm-eval is not'
                                            ' installed: pip install "falqon-jax[lm-eval]"\n')
