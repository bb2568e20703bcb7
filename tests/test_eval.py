"""falqon_jax.eval: perplexity, MMLU-format multiple choice, generation and exact match,
checked against hand computations on tiny models (melded and not) and against a real
checkpoint's PyTorch reference logits (hf-tiny)."""

import collections
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from falqon_jax import eval as fe
from falqon_jax import models
from falqon_jax import nnx as fnnx

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-tiny"


class ByteTok:
  """The tokenizer interface the eval functions take: 256 bytes plus pad/bos/eos."""

  pad_id, bos_id, eos_id, vocab_size = 256, 257, 258, 259

  def encode(self, text, add_bos=False, add_eos=False):
    return [self.bos_id] * add_bos + list(text.encode("utf-8")) + [self.eos_id] * add_eos

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTok()
Example = collections.namedtuple("Example", "prompt response")
Tiny = collections.namedtuple("Tiny", "model params")  # a models.Functional and its params
WIDTH = 512  # the test models' positions: hand computations pad to it, so they compile once
BATCH = 4  # one batch size throughout, so tests share compiled functions


def _tiny(model_type) -> Tiny:
  positions = dict(n_positions=WIDTH) if model_type == "gpt2" else dict(
      max_position_embeddings=WIDTH)
  cfg = models.tiny_config(model_type, vocab_size=TOK.vocab_size, **positions)
  return Tiny(*models.split(models.CausalLM(cfg, rngs=nnx.Rngs(0))))


def _meld(tiny: Tiny) -> Tiny:
  """The same weights, every projection melded (rank 16)."""
  lm = tiny.model.merge(jax.tree.map(jnp.asarray, tiny.params))
  fnnx.meld(lm, rank=16)
  return Tiny(*models.split(lm))


@pytest.fixture(scope="module")
def llama():
  """(plain, melded) tiny Llama with the same weights."""
  plain = _tiny("llama")
  return plain, _meld(plain)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(model, params, ids, mask):
  return model.apply(params, ids, attention_mask=mask)


def oracle_logits(tiny, ids):
  """Hand computation: logits of one unpadded sequence without a cache, in float64.

  Right padding to a fixed width leaves a causal model's real positions unchanged, and
  keeps this to one compile per model.
  """
  buf = np.full((1, WIDTH), TOK.pad_id, np.int32)
  buf[0, :len(ids)] = ids
  out = _full_logits(tiny.model, tiny.params, buf, np.ones_like(buf))
  return np.asarray(out[0, :len(ids)], np.float64)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def oracle_logprobs(tiny, ids):
  """log p(ids[t] | ids[:t]) for t = 1 .. len - 1."""
  logp = _log_softmax(oracle_logits(tiny, ids)[:-1])
  return logp[np.arange(len(ids) - 1), ids[1:]]


def oracle_block_logprobs(tiny, rows, width):
  """Hand computation on ``rows`` (at most BATCH token lists) as eval batches them: one
  right-padded ``[BATCH, width]`` block, so a melded model quantizes the same activations
  with the same per-tensor scales as in eval. Per row, log p(ids[t] | ids[:t]), float64."""
  buf = np.full((BATCH, width), TOK.pad_id, np.int32)
  mask = np.zeros_like(buf)
  for r, ids in enumerate(rows):
    buf[r, :len(ids)] = ids
    mask[r, :len(ids)] = 1
  logp = _log_softmax(np.asarray(_full_logits(tiny.model, tiny.params, buf, mask), np.float64))
  return [logp[r, np.arange(len(ids) - 1), ids[1:]] for r, ids in enumerate(rows)]


def _eval_width(rows):
  """The width eval pads ``rows`` to: the longest, rounded up to its multiple."""
  return -(-max(map(len, rows)) // fe._WIDTH_MULTIPLE) * fe._WIDTH_MULTIPLE


def oracle_greedy(tiny, ids, max_new):
  """Greedy decoding by full recomputation: argmax of the growing sequence's last logits."""
  ids, new = list(ids), []
  for _ in range(max_new):
    z = oracle_logits(tiny, ids)[-1]
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
def test_multiple_choice_picks_argmax_of_hand_loglikelihoods(llama, mmlu):
  plain, melded = llama
  got = fe.multiple_choice(*plain, TOK, mmlu, k_shot=2, batch_size=BATCH, details=True)
  assert got["n"] == 8 and len(got["samples"]) == 8
  data = fe.read_mmlu(mmlu)
  hits = collections.Counter()
  for s in got["samples"]:
    dev, test = data[s["subject"]]
    prompt = fe.mmlu_prompt(s["subject"], dev[:2], test[s["index"]])
    assert s["prompt"] == prompt and prompt.count("\nAnswer: ") == 2
    # " A" is two byte tokens: the space and the letter; both are scored
    want = [oracle_logprobs(plain, TOK.encode(prompt + " " + l, add_bos=True))[-2:].sum()
            for l in "ABCD"]
    np.testing.assert_allclose(s["scores"], want, rtol=1e-5, atol=1e-5)
    assert s["prediction"] == "ABCD"[int(np.argmax(s["scores"]))]
    assert s["answer"] == test[s["index"]][5]
    hits[s["subject"]] += s["correct"]
  assert got["per_subject"] == {k: hits[k] / 4 for k in TEST}
  assert got["accuracy"] == sum(hits.values()) / 8
  # Melded: the activation scale spans the batch, so scores move with padding; the hand
  # computation runs each question's 4 rows as the same block (BATCH is 4), which leaves
  # only float32 rounding.
  mel = fe.multiple_choice(*melded, TOK, mmlu, k_shot=2, batch_size=BATCH, details=True)
  rows = [[TOK.encode(s["prompt"] + " " + l, add_bos=True) for l in "ABCD"]
          for s in mel["samples"]]
  width = _eval_width(sum(rows, []))
  for s, p, choices in zip(mel["samples"], got["samples"], rows):
    want = [lp[-2:].sum() for lp in oracle_block_logprobs(melded, choices, width)]
    np.testing.assert_allclose(s["scores"], want, rtol=1e-5, atol=1e-5)
    assert s["prediction"] == "ABCD"[int(np.argmax(s["scores"]))]
    assert s["scores"] != p["scores"]  # the melded model is not the plain one


@pytest.mark.slow
def test_multiple_choice_k_shot_subjects_limit(llama, mmlu):
  plain, _ = llama
  zero = fe.multiple_choice(*plain, TOK, mmlu, k_shot=0, subjects="world_religions",
                            limit=2, batch_size=BATCH, details=True)
  assert zero["n"] == 2 and list(zero["per_subject"]) == ["world_religions"]
  assert zero["samples"][0]["prompt"] == (
      "The following are multiple choice questions (with answers) about world religions.\n\n"
      "Where is the Kaaba?\nA. Mecca\nB. Medina\nC. Cairo\nD. Jerusalem\nAnswer:")
  three = fe.multiple_choice(*plain, TOK, mmlu, k_shot=3, subjects=["world_religions"],
                             limit=2, batch_size=BATCH, details=True)
  assert three["samples"][1]["prompt"].count("\nAnswer: ") == 3
  assert three["samples"][1]["prompt"].endswith("What is Diwali?\nA. A fast\nB. A festival"
                                                " of lights\nC. A river\nD. A god\nAnswer:")
  assert zero["samples"][0]["scores"] != three["samples"][0]["scores"]
  # too-long prompts lose tokens on the left (lm-eval's truncation); the letter is kept
  short = fe.multiple_choice(*plain, TOK, mmlu, k_shot=3, subjects=["world_religions"],
                             limit=2, batch_size=BATCH, max_len=64, details=True)
  prompt = short["samples"][0]["prompt"]
  assert prompt == three["samples"][0]["prompt"]
  want = [oracle_logprobs(plain, TOK.encode(prompt + " " + l, add_bos=True)[-64:])[-2:].sum()
          for l in "ABCD"]
  np.testing.assert_allclose(short["samples"][0]["scores"], want, rtol=1e-5, atol=1e-5)


def test_multiple_choice_bad_input(llama, mmlu, tmp_path):
  model, params = llama[1]
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
def test_perplexity_is_exp_of_hand_computed_loss(llama, tmp_path):
  plain, melded = llama
  # seq_len 16 splits the first document into rows of 16 tokens overlapping by one
  doc = TOK.encode(DOCS[0], add_bos=True)
  rows = [doc[s:s + 16] for s in range(0, len(doc) - 1, 15)]
  rows += [TOK.encode(d, add_bos=True) for d in DOCS[1:]]
  nll = -np.concatenate([oracle_logprobs(plain, r) for r in rows])
  assert len(nll) == sum(len(d.encode()) for d in DOCS)  # every byte scored once
  got = fe.perplexity(*plain, TOK, DOCS, seq_len=16, batch_size=BATCH)  # 5 rows: padded
  assert got["tokens"] == len(nll)
  np.testing.assert_allclose(got["loss"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], np.exp(nll.mean()), rtol=1e-5)
  # the same documents from .jsonl, and one .txt document = the whole text
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
  assert fe.perplexity(*plain, TOK, str(jsonl), seq_len=16, batch_size=BATCH) == got
  txt = tmp_path / "doc.txt"
  txt.write_text(DOCS[0])
  # 45 tokens fit in one 256-token window: one block, the row and 3 padding rows
  whole = -oracle_block_logprobs(melded, [doc], _eval_width([doc]))[0]
  got = fe.perplexity(*melded, TOK, str(txt), batch_size=BATCH)
  assert got["tokens"] == len(whole)
  np.testing.assert_allclose(got["loss"], whole.mean(), rtol=1e-5)


def test_perplexity_bad_input(llama, tmp_path):
  model, params = llama[1]
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
  with pytest.raises(TypeError, match="model must be a falqon_jax.models.Functional.*split"):
    fe.perplexity(model.merge(params), params, TOK, ["x"])  # a CausalLM, not split


# --------------------------------------------------------------------------- generation

WORD = "world"  # the rigged model's bigram chain: w -> o -> r -> l -> d -> EOS


def _rigged(params):
  """Params whose greedy continuation of a token in WORD is the rest of WORD, then EOS.

  The attention and MLP output projections are zero, so the last hidden state is the
  current token's embedding: unit vectors e_i for WORD's letters, mapped by the LM head
  to the next letter. Position and context do not matter.
  """
  params = jax.tree.map(np.array, params)
  for layer in params["layers"].values():
    layer["self_attn"]["o_proj"]["kernel"][:] = 0
    layer["mlp"]["down_proj"]["kernel"][:] = 0
  emb = params["embed_tokens"]["embedding"]
  head = params["lm_head"]["kernel"]
  head[:] = 0
  nexts = [ord(c) for c in WORD[1:]] + [TOK.eos_id]
  for i, (c, nxt) in enumerate(zip(WORD, nexts)):
    emb[ord(c)] = np.eye(emb.shape[1])[i]
    head[i, nxt] = 10.0
  return params


@pytest.fixture(scope="module")
def rigged(llama):
  plain, _ = llama
  return _meld(Tiny(plain.model, _rigged(plain.params)))


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
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RoPE; learned positions
def test_generate_with_cache_matches_greedy_recomputation(llama, family):
  # A random model depends on position and context, so left padding, positions and the
  # KV cache must all be right to match a full-sequence argmax loop on each bare prompt.
  tiny = llama[0] if family == "llama" else _tiny("gpt2")  # plain params compile fastest
  prompts = [TOK.encode(p, add_bos=True) for p in ("a", "Some longer prompt, with context",
                                                    "mid length")]
  got = fe.generate_ids(*tiny, TOK, prompts, max_new_tokens=6, batch_size=BATCH)
  assert got == [oracle_greedy(tiny, p, 6) for p in prompts]


def test_generate_bad_input(llama):
  model, params = llama[1]
  with pytest.raises(ValueError, match="max_new_tokens=512 leaves no room"):
    fe.generate(model, params, TOK, ["x"], max_new_tokens=512)
  with pytest.raises(TypeError, match="list of strings"):
    fe.generate(model, params, TOK, "x")
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    fe.generate(model, params, TOK, ["x"], temperature=-1.0)


# ------------------------------------------------------------------- a real checkpoint


class Latin1Tok:
  """Bytes as ids 0..255 (the fixtures' vocabulary, no special tokens); a text starting
  with a key of ``known`` encodes that key to its ids, so a chosen prompt encodes to a
  reference input row."""

  pad_id, bos_id, eos_id, vocab_size = 0, None, None, 256

  def __init__(self, known=None):
    self.known = known or {}

  def encode(self, text, add_bos=False, add_eos=False):
    assert not (add_bos or add_eos), "no special tokens"
    for key in sorted(self.known, key=len, reverse=True):
      if text.startswith(key):
        return [int(i) for i in self.known[key]] + list(text[len(key):].encode("latin-1"))
    return list(text.encode("latin-1"))

  def decode(self, ids):
    return bytes(int(i) for i in ids).decode("latin-1")


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"hf-tiny fixtures not found at {FIXTURES}")
def test_scores_match_reference_logits_of_a_real_checkpoint(tmp_path):
  folder = FIXTURES / "llama3"
  ref = np.load(folder / "reference.npz")
  ids = ref["input_ids"]  # (2, 32) random bytes
  logp = _log_softmax(ref["logits"].astype(np.float64))  # PyTorch's, float32
  model, params = models.split(models.load(str(folder)).model)
  # The README's logit tolerance is 1e-4; a log-prob z_i - logsumexp(z) moves by at most
  # twice the largest logit error, so 2e-4 per token (a mean of them too), 4e-4 for the
  # two tokens of an MMLU choice.
  per_token = 2e-4

  # Perplexity: both rows whole, and row 1's first 24 tokens (right padded in the batch).
  tok = Latin1Tok()
  docs = [tok.decode(ids[0]), tok.decode(ids[1]), tok.decode(ids[1, :24])]
  with jax.default_matmul_precision("highest"):
    got = fe.perplexity(model, params, tok, docs, seq_len=32, batch_size=BATCH, add_bos=False)
  t = np.arange(31)
  nll = -np.concatenate([logp[0, t, ids[0, t + 1]], logp[1, t, ids[1, t + 1]],
                         logp[1, t[:23], ids[1, t[:23] + 1]]])
  assert got["tokens"] == len(nll) == 85
  np.testing.assert_allclose(got["loss"], nll.mean(), rtol=0, atol=per_token)

  # Multiple choice: question r's prompt encodes to ids[r, :30], and prompt + " " to
  # ids[r, :31], so choice X scores log p(ids[r, 30]) + log p(X | ids[r, :31]).
  rows = [["First question?", "a", "b", "c", "d"], ["Second question?", "a", "b", "c", "d"]]
  prompts = [fe.mmlu_prompt("fixture", [], row + ["A"]) for row in rows]
  want = np.array([[logp[r, 29, ids[r, 30]] + logp[r, 30, ord(x)] for x in "ABCD"]
                   for r in range(2)])
  best = np.argmax(want, axis=-1)
  top2 = np.sort(want, axis=-1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] > 4 * per_token)  # predictions not within tolerance
  answers = ["ABCD"[best[0]], "ABCD"[(best[1] + 1) % 4]]  # the first right, the second wrong
  os.makedirs(tmp_path / "mmlu" / "test")
  with open(tmp_path / "mmlu" / "test" / "fixture_test.csv", "w") as f:
    f.writelines(",".join(row + [a]) + "\n" for row, a in zip(rows, answers))
  known = {}
  for r, prompt in enumerate(prompts):
    known[prompt], known[prompt + " "] = ids[r, :30], ids[r, :31]
  with jax.default_matmul_precision("highest"):
    got = fe.multiple_choice(model, params, Latin1Tok(known), tmp_path / "mmlu", k_shot=0,
                             batch_size=BATCH, add_bos=False, details=True)
  assert [s["prompt"] for s in got["samples"]] == prompts
  np.testing.assert_allclose([s["scores"] for s in got["samples"]], want, rtol=0,
                             atol=2 * per_token)
  assert [s["prediction"] for s in got["samples"]] == ["ABCD"[b] for b in best]
  assert got["accuracy"] == 0.5 and got["per_subject"] == {"fixture": 0.5}
