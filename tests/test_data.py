"""falqon_jax.data: tokenizers, example formats, masks, buckets, packing, sharding, resume.

All data is written by the tests themselves (tiny JSON/JSONL files, a WordLevel tokenizer
trained on a few sentences); nothing is downloaded.
"""

import json
import sys
from collections import Counter

import numpy as np
import pytest

from falqon_jax.data import (
    ALPACA_PROMPT_INPUT,
    Batches,
    ByteTokenizer,
    DataError,
    Example,
    HFTokenizer,
    alpaca_prompt,
    default_buckets,
    encode_prompt,
    exact_match,
    load_examples,
    load_tokenizer,
    segment_mask,
    synthetic_kind,
    synthetic_task,
    tokenize_example,
    tokenize_examples,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
  """Keeps the Arrow files `datasets` writes for the test's JSON out of the user's cache."""
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
  """A WordLevel tokenizer with BOS/EOS/pad and a chat template, saved like an HF folder."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  folder = tmp_path_factory.mktemp("tok")
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
  sentences = ["what is two plus two", "it is four", "user assistant system hello world",
               "say hi please", "hi there"]
  tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=specials))
  tok.save(str(folder / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


# -- tokenizers ---------------------------------------------------------------------


def test_byte_tokenizer_roundtrip_and_specials():
  tok = ByteTokenizer()
  assert tok.vocab_size % 16 == 0 and tok.vocab_size > max(tok.pad_id, tok.bos_id, tok.eos_id)
  ids = tok.encode("añ€", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids[1:-1]) < 256
  assert tok.decode(ids + [tok.pad_id, 270]) == "añ€"
  assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character: replaced


def test_load_tokenizer_local_folder(tok_folder):
  tok = load_tokenizer(str(tok_folder))
  assert isinstance(tok, HFTokenizer) and tok.chat_template == CHAT_TEMPLATE
  hf = tok.hf
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
      hf.convert_tokens_to_ids("<s>"), hf.convert_tokens_to_ids("</s>"),
      hf.convert_tokens_to_ids("<pad>"))
  ids = tok.encode("say hi", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 4
  assert tok.decode(ids) == "say hi"
  assert tok.encode_batch(["hi", "it is four"]) == [tok.encode("hi"), tok.encode("it is four")]
  assert load_tokenizer(None).vocab_size == 272 and load_tokenizer(tok) is tok


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer folder not found: .*nope"):
    load_tokenizer(str(tmp_path / "nope"))
  with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer_config.json"):
    load_tokenizer(str(tmp_path))


def test_chat_template_needs_jinja2(tok_folder, monkeypatch):
  tok = load_tokenizer(str(tok_folder))
  monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
  with pytest.raises(DataError, match="needs jinja2"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


# -- formats ------------------------------------------------------------------------


def test_alpaca_jsonl_and_json_list(tmp_path):
  rows = [{"instruction": "Say hi.", "input": "", "output": "hi"},
          {"instruction": "Add.", "input": "2 and 2", "output": "4"}]
  for path in (write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "a.json"):
    if path.suffix == ".json":
      path.write_text(json.dumps(rows))
    for fmt in ("auto", "alpaca"):
      ex = load_examples(str(path), format=fmt)
      assert ex[0] == Example(alpaca_prompt("Say hi."), "hi")
      assert ex[1].prompt == ALPACA_PROMPT_INPUT.format(instruction="Add.", input="2 and 2")
      assert ex[0].prompt.endswith("### Instruction:\nSay hi.\n\n### Response: ")
      assert "### Input:" not in ex[0].prompt and ex[1].response == "4"


def test_oasst_multi_turn(tmp_path):
  text = "### Human: what is two plus two?### Assistant: four.### Human: thanks### Assistant: ok!"
  path = write_jsonl(tmp_path / "o.jsonl", [{"text": text}, {"text": "### Human: no answer"}])
  ex = load_examples(str(path))
  assert [e.response for e in ex] == ["four.", "ok!"]
  assert ex[0].prompt == "### Human: what is two plus two?### Assistant: "
  assert ex[1].prompt == text[:text.rindex("ok!")]  # earlier turns are context


def test_chat_fallback_template(tmp_path):
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
          {"role": "assistant", "content": "6"}]
  path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
  ex = load_examples(str(path))  # no tokenizer: the built-in format
  assert ex[0] == Example("<|system|>\nbe brief\n<|user|>\n2+2?\n<|assistant|>\n", "4")
  assert ex[1].prompt == ex[0].prompt + "4\n<|user|>\n3+3?\n<|assistant|>\n"
  assert ex[1].response == "6"
  assert load_examples(str(path), tokenizer=ByteTokenizer()) == ex  # no template either


def test_chat_with_tokenizer_template(tmp_path, tok_folder):
  pytest.importorskip("jinja2")
  tok = load_tokenizer(str(tok_folder))
  msgs = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]
  ex = load_examples([{"messages": msgs}], tokenizer=tok)
  assert ex == [Example("<s><|im_start|> user say hi <|im_end|> <|im_start|> assistant ",
                        "hi there <|im_end|>")]
  ids, mask = tokenize_example(ex[0], tok)
  assert ids[0] == tok.bos_id and list(ids).count(tok.bos_id) == 1  # template's BOS kept, once
  assert tok.decode(ids[mask]) == "hi there"  # im_end and EOS are special, decode skips them


def test_prompt_format_split_folder_and_limit(tmp_path):
  rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
  write_jsonl(tmp_path / "train.jsonl", rows)
  write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q", "response": "a"}])
  (tmp_path / "README.md").write_text("# not data\n")  # other files are ignored
  assert [e.response for e in load_examples(str(tmp_path), limit=2)] == ["r0", "r1"]
  assert load_examples(str(tmp_path), split="test") == [Example("q", "a")]
  # A single file is whatever split is asked for.
  assert load_examples(str(tmp_path / "test.jsonl"), split="validation") == [Example("q", "a")]
  with pytest.raises(DataError, match="validation.*pass split="):
    load_examples(str(tmp_path), split="validation")


def test_load_examples_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data path not found: .*missing.jsonl"):
    load_examples(str(tmp_path / "missing.jsonl"))
  odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
  with pytest.raises(DataError, match=r"odd.jsonl: cannot detect .*\['answer', 'question'\].*"
                     r"instruction\+output"):
    load_examples(str(odd))
  with pytest.raises(DataError, match=r"format 'alpaca' needs fields \['instruction', 'output'\],"
                     r" found \['answer', 'question'\]"):
    load_examples(str(odd), format="alpaca")
  blank = write_jsonl(tmp_path / "blank.jsonl", [{"instruction": "x", "output": "  "}])
  with pytest.raises(DataError, match="blank.jsonl: no examples left after dropping empty"):
    load_examples(str(blank))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"instruction": "x", "output": \n')
  with pytest.raises(DataError, match="bad.jsonl: cannot read as JSON/JSONL"):
    load_examples(str(bad))
  msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": "hello"}])
  with pytest.raises(DataError, match="row 0: 'messages' must be a list of"):
    load_examples(str(msgs))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(DataError, match="no .json or .jsonl files"):
    load_examples(str(tmp_path / "empty_dir"))
  (tmp_path / "empty_dir" / "notes.txt").write_text("x")
  with pytest.raises(DataError, match="empty_dir: no .json or .jsonl files"):
    load_examples(str(tmp_path / "empty_dir"))
  with pytest.raises(DataError, match="format must be one of"):
    load_examples(str(odd), format="csv")
  with pytest.raises(DataError, match="limit must be"):
    load_examples(str(odd), limit=0)


def test_hub_name_offline_fails_in_one_line(monkeypatch):
  import datasets

  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  with pytest.raises(DataError, match="'no-such-owner/no-such-set' is not a local file or"
                     " folder, and loading hub dataset") as e:
    load_examples("no-such-owner/no-such-set")
  assert "\n" not in str(e.value)


# -- tokenization and masks -----------------------------------------------------------


def test_loss_mask_covers_response_and_eos_only():
  tok = ByteTokenizer()
  ids, mask = tokenize_example(Example("ab", "xyz"), tok)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  assert ids.tolist() == [tok.bos_id, 97, 98, 120, 121, 122, tok.eos_id]
  assert mask.tolist() == [False, False, False, True, True, True, True]
  _, mask = tokenize_example(Example("ab", "xyz"), tok, train_on_source=True)
  assert mask.tolist() == [False] + [True] * 6  # the BOS is never a target


def test_truncation_lengths_and_sides():
  tok = ByteTokenizer()
  ex = Example("0123456789" * 3, "abcdefghij" * 2)
  ids, mask = tokenize_example(ex, tok)  # defaults 16 / 512: keep the prompt's end
  assert len(ids) == 16 + 21 and ids[0] == tok.bos_id
  assert tok.decode(ids[1:16]) == ex.prompt[-15:] and mask[:16].sum() == 0
  ids, _ = tokenize_example(ex, tok, truncation_side="right")  # the reference's side
  assert tok.decode(ids[1:16]) == ex.prompt[:15]
  ids, mask = tokenize_example(ex, tok, source_max_len=4, target_max_len=5)
  assert len(ids) == 9 and tok.decode(ids[4:]) == "abcde" and ids[-1] != tok.eos_id
  assert mask.sum() == 5  # a cut response keeps no EOS
  ids, _ = tokenize_example(ex, tok, source_max_len=1)
  assert ids[0] == tok.bos_id and ids[1] == ord("a")
  with pytest.raises(DataError, match="truncation_side must be one of"):
    tokenize_example(ex, tok, truncation_side="middle")
  with pytest.raises(DataError, match="source_max_len must be an int >= 1"):
    tokenize_example(ex, tok, source_max_len=0)
  batch = tokenize_examples([ex, Example("p", "r")], tok, source_max_len=4, target_max_len=5)
  single = tokenize_example(ex, tok, source_max_len=4, target_max_len=5)
  assert (batch[0][0] == single[0]).all() and (batch[0][1] == single[1]).all()


# -- batches --------------------------------------------------------------------------


def tokenized_counts(examples, tok=ByteTokenizer()):
  return Counter(tuple(ids) for ids, _ in tokenize_examples(examples, tok))


def test_batches_masks_buckets_and_coverage():
  examples = synthetic_task(103, seed=1) + [Example("x" * 40, "y" * 70)]
  it = Batches(examples, batch_size=8, seed=3)
  assert it.buckets == default_buckets(528) and it.steps_in_epoch(0) == 104 // 8
  seen = []
  for _ in range(it.steps_in_epoch(0)):
    b = next(it)
    T = b["input_ids"].shape[1]
    assert b["input_ids"].shape == (8, T) and T in it.buckets
    assert {k: v.dtype.name for k, v in b.items()} == {
        "input_ids": "int32", "loss_mask": "bool", "attention_mask": "int32",
        "position_ids": "int32", "segment_ids": "int32"}
    pads = b["attention_mask"] == 0
    assert not b["loss_mask"][pads].any() and (b["input_ids"][pads] == 256).all()
    assert (b["position_ids"] == np.arange(T)).all()  # unpacked: plain positions
    assert not b["loss_mask"][:, 0].any()
    for r in range(8):
      seen.append(tuple(b["input_ids"][r][b["attention_mask"][r] == 1]))
    # bucketing picks the smallest T that fits the batch's longest row
    longest = b["attention_mask"].sum(1).max()
    assert T == min(t for t in it.buckets if t >= longest)
  assert len(seen) == 104 and Counter(seen) <= tokenized_counts(examples)  # no repeats
  assert it.epoch == 0 and next(it) is not None and it.epoch == 1  # wraps around


def test_group_by_length_pads_less():
  examples = synthetic_task(400, seed=2) + [Example("p", "r" * n) for n in range(40, 200, 4)]

  def pad_fraction(**kw):
    it = Batches(examples, batch_size=8, seed=0, **kw)
    bs = [next(it) for _ in range(it.steps_in_epoch(0))]
    mask = np.concatenate([b["attention_mask"].ravel() for b in bs])
    return 1 - mask.mean()

  assert pad_fraction(group_by_length=True) < pad_fraction(group_by_length=False)


def test_seeds_and_epochs_shuffle_deterministically():
  examples = synthetic_task(64, seed=0)

  def first(seed, skip=0):
    it = Batches(examples, batch_size=8, seed=seed)
    for _ in range(skip):
      next(it)
    return next(it)["input_ids"]

  assert np.array_equal(first(0), first(0))
  assert not np.array_equal(first(0), first(1))
  assert not np.array_equal(first(0), first(0, skip=8))  # epoch 1 is another order


def test_packing_segments_and_positions():
  examples = synthetic_task(60, seed=4)
  it = Batches(examples, batch_size=2, seed=0, pack=True, pack_length=64)
  seen = []
  for _ in range(it.steps_in_epoch(0)):
    b = next(it)
    assert b["input_ids"].shape == (2, 64)
    for r in range(2):
      seg, pos, ids = b["segment_ids"][r], b["position_ids"][r], b["input_ids"][r]
      assert (b["attention_mask"][r] == (seg > 0)).all()
      assert not b["loss_mask"][r][seg == 0].any()
      for s in range(1, seg.max() + 1):
        span = np.flatnonzero(seg == s)
        assert (np.diff(span) == 1).all() and (pos[span] == np.arange(len(span))).all()
        assert ids[span[0]] == 256 + 1 and not b["loss_mask"][r][span[0]]  # BOS, no target
        seen.append(tuple(ids[span]))
  assert len(seen) > 2 * it.steps_in_epoch(0)  # several examples per row
  assert Counter(seen) <= tokenized_counts(examples)
  m = segment_mask(np.array([[1, 1, 2, 2, 0]]))[0]
  assert m[3, 2] and not m[2, 1] and not m[1, 2] and not m[4].any()


def test_resume_gives_identical_batches():
  examples = synthetic_task(50, seed=5)
  for pack in (False, True):
    kw = dict(batch_size=4, seed=7, pack=pack, pack_length=48)
    it = Batches(examples, **kw)
    for _ in range(it.steps_in_epoch(0) + 2):  # past an epoch boundary
      next(it)
    state = json.loads(json.dumps(it.state()))
    expected = [next(it) for _ in range(15)]
    for resumed in (Batches(examples, state=state, **kw), Batches(examples, **kw).restore(state)):
      for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_resume_rejects_other_runs():
  examples = synthetic_task(50, seed=5)
  state = Batches(examples, batch_size=4, seed=7).state()
  with pytest.raises(DataError, match="resume state has seed=7 but this run has 8"):
    Batches(examples, batch_size=4, seed=8, state=state)
  with pytest.raises(DataError, match="resume state has num_examples=50 but this run has 49"):
    Batches(examples[:49], batch_size=4, seed=7, state=state)
  with pytest.raises(DataError, match="resume state has batch_size=4"):
    Batches(examples, batch_size=2, seed=7, state=state)
  with pytest.raises(DataError, match="not a Batches state"):
    Batches(examples, batch_size=4, state={"step": 1})


def test_process_sharding_partitions_global_batch():
  examples = synthetic_task(64, seed=6)
  for pack in (False, True):
    glob = Batches(examples, batch_size=8, seed=1, pack=pack, pack_length=48)
    parts = [Batches(examples, batch_size=8, seed=1, pack=pack, pack_length=48,
                     process_index=p, process_count=4) for p in range(4)]
    for _ in range(5):
      want = next(glob)
      got = [next(p) for p in parts]
      assert all(g["input_ids"].shape[0] == 2 for g in got)
      for k in want:
        assert np.array_equal(np.concatenate([g[k] for g in got]), want[k])
    assert parts[3].state() == glob.state()  # the state is global


def test_batches_errors():
  examples = synthetic_task(10)
  with pytest.raises(DataError, match="batch_size 6 is not divisible by process_count 4"):
    Batches(examples, batch_size=6, process_count=4)
  with pytest.raises(DataError, match="process_index must be in"):
    Batches(examples, batch_size=4, process_index=2, process_count=2)
  with pytest.raises(DataError, match="10 examples are fewer than one global batch of 16"):
    Batches(examples, batch_size=16)
  with pytest.raises(DataError, match="fewer than one global batch of 8"):
    Batches(examples, batch_size=8, pack=True)
  with pytest.raises(DataError, match="more than the largest bucket 16"):
    Batches(examples + [Example("p" * 30, "r")], batch_size=2, buckets=[16])
  with pytest.raises(DataError, match="no examples"):
    Batches([], batch_size=2)
  with pytest.raises(DataError, match="seed must be a non-negative int"):
    Batches(examples, batch_size=2, seed=-1)
  with pytest.raises(DataError, match="example 1: input_ids .* must be equal"):
    Batches([([1, 2], [0, 1]), ([1, 2, 3], [0, 1])], batch_size=2)


def test_batches_from_tokenized_pairs():
  pairs = [(np.array([5, 6, 7]), np.array([0, 0, 1])), (np.array([8, 9]), np.array([0, 1]))]
  b = next(Batches(pairs, batch_size=2, group_by_length=False, buckets=[4]))
  assert b["input_ids"].shape == (2, 4) and b["loss_mask"].sum() == 2
  assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()  # pad_id 0 by default


# -- synthetic task ---------------------------------------------------------------------


def test_synthetic_task_deterministic_and_short():
  a = synthetic_task(300, seed=3)
  assert a == synthetic_task(300, seed=3) and a[:50] == synthetic_task(50, seed=3)
  assert a != synthetic_task(300, seed=4)
  assert max(len(e.prompt.encode()) for e in a) <= 15
  assert max(len(e.response.encode()) for e in a) <= 6
  kinds = {"add": 0, "copy": 0, "reverse": 0, "recall": 0, "last": 0}
  for e in a:
    if "+" in e.prompt:
      x, y = e.prompt[:-1].split("+")
      assert int(e.response) == int(x) + int(y)
      kinds["add"] += 1
    elif e.prompt.startswith(("copy ", "reverse ", "last ")):
      kind, word = e.prompt[:-1].split()
      assert e.response == {"copy": word, "reverse": word[::-1], "last": word[-1]}[kind]
      kinds[kind] += 1
    else:
      assert synthetic_kind(e) == "recall"
      *pairs, query = e.prompt.split()
      assert dict(p.split("=") for p in pairs)[query[:-1]] == e.response
      kinds["recall"] += 1
  assert min(kinds.values()) > 40
  assert all("+" in e.prompt for e in synthetic_task(20, kinds=("add",)))
  with pytest.raises(DataError, match="kinds must be a non-empty subset"):
    synthetic_task(3, kinds=("mul",))


def test_exact_match():
  add = Example("12+35=", "47")
  assert exact_match("47", add) and exact_match(" 47 \n", add) and exact_match("+047", add)
  assert not exact_match("48", add) and not exact_match("47 apples", add)
  word = Example("reverse abc:", "cba")
  assert exact_match("cba\n", word) and not exact_match("CBA", word)


def test_encode_prompt_matches_training_prefix():
  ex = Example("reverse abcdefghij:", "jihgfedcba")
  ids, mask = tokenize_example(ex, source_max_len=8)
  prompt = encode_prompt(ex.prompt, source_max_len=8)
  assert prompt.dtype == np.int32 and ids[:len(prompt)].tolist() == prompt.tolist()
  assert mask[len(prompt)] and not mask[:len(prompt)].any()


def test_mistyped_local_paths_fail_without_network(tmp_path, monkeypatch, tok_folder):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "models").mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer folder not found: models/llama"):
    load_tokenizer("models/llama")  # "models" exists here: a local path, not a hub name
  with pytest.raises(FileNotFoundError, match="data path not found: models/data"):
    load_examples("models/data")
  assert load_tokenizer(str(tok_folder / "tokenizer.json")).eos_id is not None
  with pytest.raises(DataError, match="is a file; pass the folder"):
    load_tokenizer(str(write_jsonl(tmp_path / "x.jsonl", [])))


def test_oasst_without_turns_says_so(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [{"text": "just some text"}])
  with pytest.raises(DataError, match="no '### Assistant:' turn with a non-empty reply"):
    load_examples(str(path))
