"""falqon_jax.eval: perplexity, MMLU-format multiple choice, generation and exact match,
checked against hand computations on tiny melded models and on exported folders."""

import collections
import json
import os

import pytest

pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
import numpy as np

import falqon_jax.hf as fh
from falqon_jax import eval as fe
from falqon_jax import export
from falqon_jax import linen as fl


class ByteTok:
  """The tokenizer interface the eval functions take: 256 bytes plus pad/bos/eos."""

  pad_id, bos_id, eos_id, vocab_size = 256, 257, 258, 259

  def encode(self, text, add_bos=False, add_eos=False):
    return [self.bos_id] * add_bos + list(text.encode("utf-8")) + [self.eos_id] * add_eos

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTok()
Example = collections.namedtuple("Example", "prompt response")
WIDTH = 512  # the test models' positions: hand computations pad to it, so they compile once
BATCH = 4  # one batch size throughout, so tests share compiled functions


def _tiny(model_type):
  positions = dict(n_positions=WIDTH) if model_type == "gpt2" else dict(
      max_position_embeddings=WIDTH)
  model = fh.build_model(fh.tiny_config(model_type, vocab_size=TOK.vocab_size, **positions))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
  return model, params


@pytest.fixture(scope="module")
def llama():
  model, params = _tiny("llama")
  melded, _ = fh.meld_params(model, params, rank=16)
  return model, params, melded


class Oracle:
  """Hand computation: next-token log-probs of one unpadded sequence, in float64.

  Right padding to a fixed width leaves a causal model's real positions unchanged, and
  keeps this to one compile per model and params structure.
  """

  def __init__(self, model):
    self.model = model
    self.run = jax.jit(fl.melded_fn(lambda p, ids: model(ids, params=p).logits))

  def logits(self, params, ids):
    buf = np.full((1, WIDTH), TOK.pad_id, np.int32)
    buf[0, :len(ids)] = ids
    return np.asarray(self.run(params, jnp.asarray(buf))[0, :len(ids)], np.float64)

  def logprobs(self, params, ids):
    """log p(ids[t] | ids[:t]) for t = 1 .. len - 1."""
    z = self.logits(params, ids)[:-1]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]

  def greedy(self, params, ids, max_new):
    ids, new = list(ids), []
    for _ in range(max_new):
      z = self.logits(params, ids)[-1]
      # Generation runs another f32 program (a KV cache): its argmax is the same only where
      # the top two logits are apart by far more than their last bits.
      second, first = np.sort(z)[-2:]
      assert first - second > 1e-4 * np.abs(z).max(), (first, second)
      tok = int(np.argmax(z))
      if tok == TOK.eos_id:
        break
      ids.append(tok)
      new.append(tok)
    return new


@pytest.fixture(scope="module")
def oracle(llama):
  return Oracle(llama[0])


# ----------------------------------------------------------------------------- MMLU data

DEV = {
    "abstract_algebra": [
        ["Find the order of the group Z_4.", "1", "2", "3", "4", "D"],
        ["Is every field a ring?", "Yes", "No", "Only finite ones", "Only infinite ones", "A"],
        ["  How many elements does S_3 have?  ", "3", "6", "9", "12", "B"],
    ],
    "world_religions": [
        ["Which city is holy in Islam?", "Mecca", "Rome", "Kyoto", "Lhasa", "A"],
        ["What is the Tao Te Ching?", "A temple", "A text", "A festival", "A dance", "B"],
        ["Who founded Sikhism?", "Buddha", "Nanak", "Confucius", "Laozi", "B"],
    ],
}
TEST = {
    "abstract_algebra": [
        ["What is 2 + 2 in Z_3?", "0", "1", "2", "3", "B"],
        ["Say \"yes\", or no?", "yes, indeed", "no", "maybe", "never", "A"],
        ["Is Z a field?", "Yes", "No", "Sometimes", "Unknown", "B"],
        ["What is 3 * 3 in Z_5?", "1", "2", "3", "4", "D"],
    ],
    "world_religions": [
        ["Where is the Kaaba?", "Mecca", "Medina", "Cairo", "Jerusalem", "A"],
        ["What is Diwali?", "A fast", "A festival of lights", "A river", "A god", "B"],
        ["Which text is Jewish?", "Quran", "Torah", "Vedas", "Avesta", "B"],
        ["What is Shinto's homeland?", "China", "India", "Japan", "Korea", "C"],
    ],
}


def _write_mmlu(root, split="test"):
  import csv

  for folder, data, suffix in (("dev", DEV, "dev"), (split, TEST, split)):
    os.makedirs(root / folder, exist_ok=True)
    for subject, rows in data.items():
      with open(root / folder / f"{subject}_{suffix}.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
  return str(root)


@pytest.fixture(scope="module")
def mmlu(tmp_path_factory):
  return _write_mmlu(tmp_path_factory.mktemp("mmlu"))


def test_mmlu_prompt_matches_lm_eval_format(mmlu):
  data = fe.read_mmlu(mmlu)
  assert list(data) == ["abstract_algebra", "world_religions"]
  dev, test = data["abstract_algebra"]
  assert test[1] == ("Say \"yes\", or no?", "yes, indeed", "no", "maybe", "never", "A")
  expected = (
      "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
      "Find the order of the group Z_4.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: D\n\n"
      "Is every field a ring?\nA. Yes\nB. No\nC. Only finite ones\nD. Only infinite ones\n"
      "Answer: A\n\n"
      "How many elements does S_3 have?\nA. 3\nB. 6\nC. 9\nD. 12\nAnswer: B\n\n"
      "Say \"yes\", or no?\nA. yes, indeed\nB. no\nC. maybe\nD. never\nAnswer:"
  )
  assert fe.mmlu_prompt("abstract_algebra", dev, test[1]) == expected


@pytest.mark.slow
def test_multiple_choice_picks_argmax_of_hand_loglikelihoods(llama, oracle, mmlu):
  model, params, melded = llama
  got = fe.multiple_choice(model, params, TOK, mmlu, k_shot=2, batch_size=BATCH, details=True)
  assert got["n"] == 8 and len(got["samples"]) == 8
  data = fe.read_mmlu(mmlu)
  hits = collections.Counter()
  for s in got["samples"]:
    dev, test = data[s["subject"]]
    prompt = fe.mmlu_prompt(s["subject"], dev[:2], test[s["index"]])
    assert s["prompt"] == prompt and prompt.count("\nAnswer: ") == 2
    # " A" is two byte tokens: the space and the letter; both are scored
    want = [oracle.logprobs(params, TOK.encode(prompt + " " + l, add_bos=True))[-2:].sum()
            for l in "ABCD"]
    np.testing.assert_allclose(s["scores"], want, rtol=1e-5, atol=1e-5)
    assert s["prediction"] == "ABCD"[int(np.argmax(s["scores"]))]
    assert s["answer"] == test[s["index"]][5]
    hits[s["subject"]] += s["correct"]
  assert got["per_subject"] == {k: hits[k] / 4 for k in TEST}
  assert got["accuracy"] == sum(hits.values()) / 8
  # Melded: the activation scale spans the batch, so scores move slightly with padding.
  mel = fe.multiple_choice(model, melded, TOK, mmlu, k_shot=2, batch_size=BATCH, details=True)
  for s, p in zip(mel["samples"], got["samples"]):
    want = [oracle.logprobs(melded, TOK.encode(s["prompt"] + " " + l, add_bos=True))[-2:].sum()
            for l in "ABCD"]
    np.testing.assert_allclose(s["scores"], want, rtol=1e-3, atol=1e-3)
    assert s["prediction"] == "ABCD"[int(np.argmax(s["scores"]))]
    assert s["scores"] != p["scores"]  # the melded model is not the plain one


@pytest.mark.slow
def test_multiple_choice_k_shot_subjects_limit(llama, oracle, mmlu):
  model, params, _ = llama
  zero = fe.multiple_choice(model, params, TOK, mmlu, k_shot=0, subjects="world_religions",
                            limit=2, batch_size=BATCH, details=True)
  assert zero["n"] == 2 and list(zero["per_subject"]) == ["world_religions"]
  assert zero["samples"][0]["prompt"] == (
      "The following are multiple choice questions (with answers) about world religions.\n\n"
      "Where is the Kaaba?\nA. Mecca\nB. Medina\nC. Cairo\nD. Jerusalem\nAnswer:")
  three = fe.multiple_choice(model, params, TOK, mmlu, k_shot=3, subjects=["world_religions"],
                             limit=2, batch_size=BATCH, details=True)
  assert three["samples"][1]["prompt"].count("\nAnswer: ") == 3
  assert three["samples"][1]["prompt"].endswith("What is Diwali?\nA. A fast\nB. A festival"
                                                " of lights\nC. A river\nD. A god\nAnswer:")
  assert zero["samples"][0]["scores"] != three["samples"][0]["scores"]
  # too-long prompts lose tokens on the left (lm-eval's truncation); the letter is kept
  short = fe.multiple_choice(model, params, TOK, mmlu, k_shot=3, subjects=["world_religions"],
                             limit=2, batch_size=BATCH, max_len=64, details=True)
  prompt = short["samples"][0]["prompt"]
  assert prompt == three["samples"][0]["prompt"]
  want = [oracle.logprobs(params, TOK.encode(prompt + " " + l, add_bos=True)[-64:])[-2:].sum()
          for l in "ABCD"]
  np.testing.assert_allclose(short["samples"][0]["scores"], want, rtol=1e-5, atol=1e-5)


def test_multiple_choice_bad_input(llama, mmlu, tmp_path):
  model, _, params = llama
  with pytest.raises(FileNotFoundError, match="no such folder"):
    fe.multiple_choice(model, params, TOK, str(tmp_path / "nope"))
  with pytest.raises(ValueError, match=r"k_shot=4 but .*abstract_algebra_dev.csv has only 3"):
    fe.multiple_choice(model, params, TOK, mmlu, k_shot=4)
  with pytest.raises(ValueError, match="unknown subject 'anatomy'"):
    fe.multiple_choice(model, params, TOK, mmlu, subjects=["anatomy"])
  bad = _write_mmlu(tmp_path / "bad")
  path = os.path.join(bad, "test", "world_religions_test.csv")
  with open(path, "a") as f:
    f.write("A question, with, too few columns\n")
  with pytest.raises(ValueError, match=rf"{path}:5: expected 6 columns .* got 3"):
    fe.multiple_choice(model, params, TOK, bad, k_shot=0)
  with open(path, "w") as f:
    f.write("q,a,b,c,d,A\nq,a,b,c,d,E\n")
  with pytest.raises(ValueError, match=rf"{path}:2: answer must be one of A, B, C, D"):
    fe.multiple_choice(model, params, TOK, bad, k_shot=0)
  os.remove(os.path.join(bad, "dev", "abstract_algebra_dev.csv"))
  with pytest.raises(FileNotFoundError, match="abstract_algebra_dev.csv: missing"):
    fe.multiple_choice(model, params, TOK, bad, subjects="abstract_algebra")
  val = _write_mmlu(tmp_path / "val", split="val")  # val/ stands in for test/
  assert list(fe.read_mmlu(val)) == ["abstract_algebra", "world_religions"]


# --------------------------------------------------------------------------- perplexity

DOCS = ["The quick brown fox jumps over the lazy dog.", "FP8 LoRA", "x"]


@pytest.mark.slow
def test_perplexity_is_exp_of_hand_computed_loss(llama, oracle, tmp_path):
  model, params, melded = llama
  # seq_len 16 splits the first document into rows of 16 tokens overlapping by one
  doc = TOK.encode(DOCS[0], add_bos=True)
  rows = [doc[s:s + 16] for s in range(0, len(doc) - 1, 15)]
  rows += [TOK.encode(d, add_bos=True) for d in DOCS[1:]]
  nll = -np.concatenate([oracle.logprobs(params, r) for r in rows])
  assert len(nll) == sum(len(d.encode()) for d in DOCS)  # every byte scored once
  got = fe.perplexity(model, params, TOK, DOCS, seq_len=16, batch_size=BATCH)  # 5 rows: padded
  assert got["tokens"] == len(nll)
  np.testing.assert_allclose(got["loss"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], np.exp(nll.mean()), rtol=1e-5)
  # the same documents from .jsonl, and one .txt document = the whole text
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
  assert fe.perplexity(model, params, TOK, str(jsonl), seq_len=16, batch_size=BATCH) == got
  txt = tmp_path / "doc.txt"
  txt.write_text(DOCS[0])
  whole = -oracle.logprobs(melded, doc)  # 45 tokens fit in one 256-token window
  got = fe.perplexity(model, melded, TOK, str(txt), batch_size=BATCH)
  assert got["tokens"] == len(whole)
  np.testing.assert_allclose(got["loss"], whole.mean(), rtol=1e-3)


def test_perplexity_bad_input(llama, tmp_path):
  model, _, params = llama
  with pytest.raises(FileNotFoundError, match="no such file"):
    fe.perplexity(model, params, TOK, str(tmp_path / "missing.txt"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
  with pytest.raises(ValueError, match=rf"{bad}:2: no string 'text' field"):
    fe.perplexity(model, params, TOK, str(bad))
  (tmp_path / "data.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="expected a .txt or .jsonl"):
    fe.perplexity(model, params, TOK, str(tmp_path / "data.csv"))
  with pytest.raises(ValueError, match="no tokens to score"):
    fe.perplexity(model, params, TOK, [""], add_bos=False)

  class Big(ByteTok):
    vocab_size = 300

  with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model's vocab_size"):
    fe.perplexity(model, params, Big(), ["x"])


# --------------------------------------------------------------------------- generation

WORD = "world"  # the rigged model's bigram chain: w -> o -> r -> l -> d -> EOS


def _rigged(model, params):
  """Params whose greedy continuation of a token in WORD is the rest of WORD, then EOS.

  The attention and MLP output projections are zero, so the last hidden state is the
  current token's embedding: unit vectors e_i for WORD's letters, mapped by the LM head
  to the next letter. Position and context do not matter.
  """
  params = jax.tree.map(np.array, params)
  for layer in params["model"]["layers"].values():
    layer["self_attn"]["o_proj"]["kernel"][:] = 0
    layer["mlp"]["down_proj"]["kernel"][:] = 0
  emb = params["model"]["embed_tokens"]["embedding"]
  head = params["lm_head"]["kernel"]
  head[:] = 0
  nexts = [ord(c) for c in WORD[1:]] + [TOK.eos_id]
  for i, (c, nxt) in enumerate(zip(WORD, nexts)):
    emb[ord(c)] = np.eye(emb.shape[1])[i]
    head[i, nxt] = 10.0
  return params


@pytest.fixture(scope="module")
def rigged(llama):
  model, plain, _ = llama
  params, _ = fh.meld_params(model, _rigged(model, plain), rank=16)
  return model, params


@pytest.mark.slow
def test_generate_rigged_model_stops_at_eos(rigged):
  model, params = rigged
  prompts = ["Say: w", "r", "hello", "d"]
  # batch_size 3: the second batch holds one prompt and two padding rows
  assert fe.generate(model, params, TOK, prompts, max_new_tokens=8, batch_size=3) == [
      "orld", "ld", "rld", ""]
  assert fe.generate(model, params, TOK, prompts[:1], max_new_tokens=2, batch_size=3) == ["or"]
  # sampling with top_k=1 is greedy; a seed makes sampling reproducible
  assert fe.generate(model, params, TOK, prompts, max_new_tokens=8, temperature=0.7, top_k=1,
                     batch_size=3) == ["orld", "ld", "rld", ""]
  # at temperature 100 the rigged logits (80 vs 0) are nearly flat: real draws
  sample = lambda seed: fe.generate(model, params, TOK, ["Say: w"] * 3, max_new_tokens=8,
                                    temperature=100.0, seed=seed, batch_size=3)
  assert sample(3) == sample(3) and sample(3) != sample(4)


@pytest.mark.slow
def test_exact_match_counts(rigged):
  model, params = rigged
  examples = [Example("Say: w", "orld"), Example("hello", " rld "), Example("r", "wrong")]
  got = fe.exact_match(model, params, TOK, examples, max_new_tokens=8, batch_size=3)
  assert got["n"] == 3 and got["exact_match"] == pytest.approx(2 / 3)
  assert [s["prediction"] for s in got["samples"]] == ["orld", "rld", "ld"]
  assert [s["correct"] for s in got["samples"]] == [True, True, False]
  first_letter = lambda pred, ex: pred[:1] == ex.response.strip()[:1]
  assert fe.exact_match(model, params, TOK, examples, max_new_tokens=8, batch_size=3,
                        match=first_letter)["exact_match"] == pytest.approx(2 / 3)
  # encode= replaces the prompt encoding (e.g. training's truncation): here every prompt
  # becomes "r", so every prediction is "ld"
  got = fe.exact_match(model, params, TOK, examples, max_new_tokens=8, batch_size=3,
                       encode=lambda prompt: TOK.encode("r", add_bos=True))
  assert [s["prediction"] for s in got["samples"]] == ["ld"] * 3 and got["exact_match"] == 0
  with pytest.raises(ValueError, match="no examples"):
    fe.exact_match(model, params, TOK, [])


@pytest.mark.slow
def test_generate_matches_uncached_greedy_with_left_padding(llama, oracle):
  # A random model depends on position and context, so left padding, positions and the
  # KV cache must all be right to match a plain full-sequence argmax loop.
  model, params, _ = llama
  prompts = ["a", "Some longer prompt, with context", "mid length"]
  got = fe.generate_ids(model, params, TOK, [TOK.encode(p, add_bos=True) for p in prompts],
                        max_new_tokens=6, batch_size=BATCH)
  assert got == [oracle.greedy(params, TOK.encode(p, add_bos=True), 6) for p in prompts]


@pytest.mark.slow
def test_generate_gpt2_matches_uncached_greedy():
  # GPT-2 has learned positions and its own cache code; plain params compile fastest
  model, params = _tiny("gpt2")
  oracle = Oracle(model)
  prompts = ["ab", "GPT-2 has learned positions"]
  got = fe.generate_ids(model, params, TOK, [TOK.encode(p, add_bos=True) for p in prompts],
                        max_new_tokens=5, batch_size=2)
  assert got == [oracle.greedy(params, TOK.encode(p, add_bos=True), 5) for p in prompts]


def test_generate_bad_input(llama):
  model, _, params = llama
  with pytest.raises(ValueError, match="max_new_tokens=512 leaves no room"):
    fe.generate(model, params, TOK, ["x"], max_new_tokens=512)
  with pytest.raises(TypeError, match="list of strings"):
    fe.generate(model, params, TOK, "x")
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    fe.generate(model, params, TOK, ["x"], temperature=-1.0)


# ---------------------------------------------------------------------- exported folders


@pytest.mark.slow
def test_exported_folders_evaluate_like_the_melded_model(llama, mmlu, tmp_path):
  model, _, params = llama
  texts = DOCS[:2]

  def evaluate(m, p):
    return (fe.perplexity(m, p, TOK, texts, seq_len=16, batch_size=BATCH),
            fe.multiple_choice(m, p, TOK, mmlu, k_shot=1, limit=2, batch_size=BATCH,
                               details=True))

  ppl, mc = evaluate(model, params)
  # FP8: the same bytes and an exactly inverted scale, but no A rows, so a narrower GEMM in
  # another program: a last bit of its sums can round an activation one e4m3 step away,
  # which moves the numbers about as padding does (see the multiple-choice test).
  fp8 = fh.load(export.save_fp8(str(tmp_path / "fp8"), model, params))
  ppl8, mc8 = evaluate(fp8.model, fp8.params)
  assert ppl8["tokens"] == ppl["tokens"]
  np.testing.assert_allclose(ppl8["loss"], ppl["loss"], rtol=1e-3)
  np.testing.assert_allclose([s["scores"] for s in mc8["samples"]],
                             [s["scores"] for s in mc["samples"]], rtol=1e-3, atol=1e-3)
  # bf16: dequantized weights rounded to bf16, run unmelded: close, not equal
  bf16 = fh.load(export.save_bf16(str(tmp_path / "bf16"), model, params))
  ppl16, mc16 = evaluate(bf16.model, bf16.params)
  assert ppl16["tokens"] == ppl["tokens"]
  np.testing.assert_allclose(ppl16["loss"], ppl["loss"], rtol=2e-2)
  np.testing.assert_allclose([s["scores"] for s in mc16["samples"]],
                             [s["scores"] for s in mc["samples"]], rtol=5e-2, atol=5e-2)
