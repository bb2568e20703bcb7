"""Evaluate causal LMs, melded or not: perplexity, MMLU-style multiple choice, exact
match, and text generation. :mod:`falqon_jax.lm_eval` runs lm-eval-harness tasks on
these functions (it needs ``pip install "falqon-jax[lm-eval]"``).

Every function takes ``(model, params, tokenizer, ...)``: a
:class:`falqon_jax.models.Functional` and its params tree (plain arrays, or
:class:`~falqon_jax.MeldedKernel` leaves), e.g. ``models.split(models.load(folder).model)``,
and a tokenizer: any object with ``encode(text, add_bos=..., add_eos=...) -> list[int]``,
``decode(ids) -> str``, ``pad_id``, ``bos_id``, ``eos_id`` and ``vocab_size`` (e.g.
``falqon_jax.data.ByteTokenizer``).

Melded layers quantize their input with one scale per tensor (FALQON's forward, and
vLLM's dynamic FP8), so a whole ``[batch, seq]`` block shares the scale: a melded model's
scores shift slightly with ``batch_size`` and padding (its activations round to FP8 under
another scale), and its cached generation, which quantizes each step's new tokens alone,
can differ slightly from a full recomputation. Plain params are unaffected.

Forwards are jitted with fixed shapes: each call pads its rows to one width and its last
batch to ``batch_size``, so a call compiles once, and a repeated call with the same model
object and shapes (periodic eval during training) compiles nothing.

Example:
  >>> from flax import nnx
  >>> from falqon_jax import eval as fe, models, nnx as fnnx
  >>> class Bytes:  # any object with this interface, e.g. falqon_jax.data.ByteTokenizer
  ...   pad_id, bos_id, eos_id, vocab_size = 256, 257, 258, 259
  ...   def encode(self, text, add_bos=False, add_eos=False):
  ...     return [self.bos_id] * add_bos + list(text.encode()) + [self.eos_id] * add_eos
  ...   def decode(self, ids):
  ...     return bytes(i for i in ids if i < 256).decode(errors="replace")
  >>> lm = models.CausalLM(models.tiny_config("llama", vocab_size=259), rngs=nnx.Rngs(0))
  >>> _ = fnnx.meld(lm, rank=16)
  >>> model, params = models.split(lm)
  >>> result = fe.perplexity(model, params, Bytes(), ["hello world", "melded FP8"])
  >>> result["tokens"], 200 < result["perplexity"] < 500  # untrained: near the vocab size
  (21, True)
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from falqon_jax import models
from falqon_jax._melded_kernel import is_int
from falqon_jax.errors import UserInputError

__all__ = [
    "perplexity",
    "loglikelihoods",
    "multiple_choice",
    "exact_match",
    "generate",
    "generate_ids",
    "read_mmlu",
    "mmlu_prompt",
]


LETTERS = ("A", "B", "C", "D")
_WIDTH_MULTIPLE = 16  # row widths round up to this, so nearby lengths share one compile


# ----------------------------------------------------------------------------- helpers


def _max_positions(model) -> int:
  return int(model.config.max_position_embeddings)


def _check_tokenizer(model, tokenizer) -> None:
  if not isinstance(model, models.Functional):
    raise TypeError(
        f"model must be a falqon_jax.models.Functional, got {type(model).__name__}; pass"
        " model, params = falqon_jax.models.split(causal_lm)"
    )
  for attr in ("encode", "decode", "pad_id", "bos_id", "eos_id", "vocab_size"):
    if not hasattr(tokenizer, attr):
      raise TypeError(
          f"tokenizer {type(tokenizer).__name__} has no {attr!r}; pass an object with"
          " encode(text, add_bos=, add_eos=), decode(ids), pad_id, bos_id, eos_id, vocab_size"
      )
  # Out-of-range ids do not fail in JAX: the embedding gather clamps them silently.
  if tokenizer.vocab_size > model.config.vocab_size:
    raise UserInputError(
        f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is"
        f" {model.config.vocab_size}; use the tokenizer the model was trained with"
    )


def _fill_id(tokenizer) -> int:
  """The id written into padded positions (masked out, so any in-range id works)."""
  for i in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id):
    if i is not None:
      return int(i)
  return 0


def _round_width(n: int, cap: int) -> int:
  return min(cap, -(-max(n, 1) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE)


def _check_batch_size(batch_size: int) -> None:
  if not is_int(batch_size) or batch_size < 1:
    raise UserInputError(f"batch_size must be a positive int, got {batch_size!r}")


@functools.partial(jax.jit, static_argnums=0)
def _row_logprobs(model, params, ids, attn, weights):
  """Per row: sum over t of ``weights[t] * log p(ids[t] | ids[:t])``, in float32.

  Rows are right padded (``attn`` 0 on pads), so the default positions 0..T-1 are the
  true ones and the causal mask keeps pads out of every real token's context.
  """
  logits = model.apply(params, ids, attention_mask=attn)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(tok * weights[:, 1:].astype(jnp.float32), axis=-1)


def _score_rows(model, params, rows, *, width, batch_size, fill) -> np.ndarray:
  """Scores ``rows`` (``(token ids, per-token 0/1 weights)``) in fixed ``[batch, width]``
  batches; returns each row's summed weighted log-likelihood (float32)."""
  out = np.zeros(len(rows), np.float32)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    ids = np.full((batch_size, width), fill, np.int32)
    attn = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for r, (toks, w) in enumerate(chunk):
      ids[r, :len(toks)] = toks
      attn[r, :len(toks)] = 1
      weights[r, :len(toks)] = w
    # Padding rows (the last batch) are all-zero weight, so they add nothing.
    got = _row_logprobs(model, params, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(weights))
    out[start:start + len(chunk)] = np.asarray(got)[:len(chunk)]
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _target_scores(model, n_vocab, params, inputs, attn, targets, weights):
  """Per row: sum over t of ``weights[t] * log p(targets[t] | inputs[:t+1])`` (float32), and
  whether every weighted target is the argmax of the first ``n_vocab`` logits."""
  logits = model.apply(params, inputs, attention_mask=attn)
  logp = jax.nn.log_softmax(logits, axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits[..., :n_vocab], axis=-1) == targets) | (weights == 0)
  return jnp.sum(tok * weights, axis=-1), jnp.all(greedy, axis=-1)


def loglikelihoods(
    model,
    params,
    tokenizer,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_len: Optional[int] = None,
) -> list[tuple[float, bool]]:
  """Log-likelihood of each continuation given its context, on token ids.

  ``requests`` holds ``(context_ids, continuation_ids)`` pairs, both non-empty (a context
  may be just BOS). The model reads at most ``max_len`` tokens (default and cap: its
  positions): a longer context loses tokens on the left, as lm-eval-harness truncates.
  Rows are sorted by length and padded per batch to a power-of-two width (at least 16),
  so a call compiles a few shapes at most, whatever the mix of lengths.

  Returns:
    per request ``(sum of the continuation tokens' log-probabilities, is_greedy)``:
    lm-eval's ``loglikelihood`` result; ``is_greedy`` says every continuation token is
    the argmax over the tokenizer's ids. Log-probabilities are float32.

  Example:
    >>> fe.loglikelihoods(model, params, tok, [([tok.bos_id], tok.encode("hi"))])  # doctest: +SKIP
    [(-11.2, False)]
  """
  _check_tokenizer(model, tokenizer)
  _check_batch_size(batch_size)
  positions = _max_positions(model)
  if max_len is not None and (not is_int(max_len) or not 1 <= max_len <= positions):
    raise UserInputError(
        f"max_len must be an int from 1 to the model's {positions} positions, got {max_len!r}")
  max_len = positions if max_len is None else int(max_len)
  rows = []
  for i, (context, continuation) in enumerate(requests):
    context, continuation = list(context), list(continuation)
    if not context or not continuation or len(continuation) > max_len:
      raise UserInputError(
          f"request {i}: {len(context)} context and {len(continuation)} continuation tokens;"
          f" both must be non-empty and the continuation at most max_len={max_len} tokens")
    rows.append(((context + continuation)[-(max_len + 1):], len(continuation)))
  fill = _fill_id(tokenizer)
  sums = np.zeros(len(rows), np.float32)
  greedy = np.zeros(len(rows), bool)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    n = len(rows[chunk[0]][0]) - 1  # the longest row's inputs: all but its last token
    width = min(max_len, max(_WIDTH_MULTIPLE, 1 << (n - 1).bit_length()))
    inputs = np.full((batch_size, width), fill, np.int32)
    targets = np.full((batch_size, width), fill, np.int32)
    attn = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for r, i in enumerate(chunk):
      toks, n_cont = rows[i]
      inputs[r, :len(toks) - 1] = toks[:-1]
      targets[r, :len(toks) - 1] = toks[1:]
      attn[r, :len(toks) - 1] = 1
      weights[r, len(toks) - 1 - n_cont:len(toks) - 1] = 1
    got, hit = _target_scores(model, int(tokenizer.vocab_size), params, jnp.asarray(inputs),
                              jnp.asarray(attn), jnp.asarray(targets), jnp.asarray(weights))
    sums[chunk] = np.asarray(got)[:len(chunk)]
    greedy[chunk] = np.asarray(hit)[:len(chunk)]
  return [(float(s), bool(g)) for s, g in zip(sums, greedy)]


# --------------------------------------------------------------------------- perplexity


def _read_texts(source, text_field: str) -> list[str]:
  if isinstance(source, (list, tuple)):
    if not all(isinstance(t, str) for t in source):
      raise TypeError("source list must hold strings only")
    return list(source)
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"source must be a .txt/.jsonl path or a list of strings, got {source!r}")
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such file; pass a .txt or .jsonl path (or a list of strings for raw text)"
    )
  if path.endswith(".txt"):
    with open(path, encoding="utf-8") as f:
      return [_read_utf8(path, f.read)]
  if path.endswith(".jsonl"):
    texts = []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(_read_utf8(path, f.readlines), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserInputError(
              f"{path}:{n}: not valid JSON ({e.msg}); one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
          raise UserInputError(
              f"{path}:{n}: no string {text_field!r} field; pass text_field= to name the field"
          )
        texts.append(record[text_field])
    return texts
  raise UserInputError(f"{path}: expected a .txt or .jsonl file")


def _read_utf8(path: str, read: Callable[[], Any]):
  """``read()`` of a file opened as UTF-8; other bytes are a one-line user error."""
  try:
    return read()
  except UnicodeDecodeError as e:
    raise UserInputError(f"{path}: not UTF-8 text (byte {e.start}); pass a UTF-8 file") from None


def _windows(tokens: Sequence[int], seq_len: int):
  """Splits one document into rows of at most ``seq_len`` tokens that overlap by one, so
  every token after the first is scored exactly once (each row's first token is context)."""
  rows = []
  for start in range(0, max(len(tokens) - 1, 0), seq_len - 1):
    row = list(tokens[start:start + seq_len])
    rows.append((row, [0.0] + [1.0] * (len(row) - 1)))
  return rows


def perplexity(
    model,
    params,
    tokenizer,
    source: Union[str, os.PathLike, Sequence[str]],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    add_bos: bool = True,
    text_field: str = "text",
) -> dict:
  """Token-weighted perplexity of ``source`` under the model.

  Each document (a ``.txt`` file is one document; a ``.jsonl`` file gives one per line,
  from ``text_field``; a list gives one per string) is encoded with BOS when ``add_bos``
  and cut into rows of ``seq_len`` tokens (at most the model's positions) overlapping by
  one token, so every token after
  the first is predicted exactly once; a row never sees the previous row's context.
  Rows are right padded into fixed ``[batch_size, width]`` batches (``width`` is
  ``seq_len``, or less when every row is shorter), pads masked out of the loss.

  Returns:
    ``dict(loss=mean NLL per scored token (nats), perplexity=exp(loss), tokens=count)``.
    The per-token log-likelihoods are float32 (log-softmax of float32 logits).

  Example:
    >>> fe.perplexity(model, params, tok, "valid.jsonl", seq_len=512)  # doctest: +SKIP
    {'loss': 2.31, 'perplexity': 10.07, 'tokens': 81920}
  """
  _check_tokenizer(model, tokenizer)
  _check_batch_size(batch_size)
  if not is_int(seq_len) or seq_len < 2:
    raise UserInputError(
        f"seq_len must be an int of at least 2 (a context and a scored token), got {seq_len!r}")
  # A longer window would index past the position table (GPT-2) or past the lengths a
  # RoPE model was trained on, so windows shrink to the model's positions.
  seq_len = min(seq_len, _max_positions(model))
  texts = _read_texts(source, text_field)
  rows = []
  for text in texts:
    rows += _windows(tokenizer.encode(text, add_bos=add_bos, add_eos=False), seq_len)
  if not rows:
    raise UserInputError(f"{source if not isinstance(source, (list, tuple)) else 'source'}: no"
                     " tokens to score (empty text, or single-token documents without BOS)")
  width = _round_width(max(len(r) for r, _ in rows), seq_len)
  scores = _score_rows(model, params, rows, width=width, batch_size=batch_size,
                       fill=_fill_id(tokenizer))
  tokens = int(sum(sum(w) for _, w in rows))
  loss = -float(np.sum(scores, dtype=np.float64)) / tokens
  return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


# ---------------------------------------------------------------------- multiple choice


def _read_csv(path: str) -> list[tuple[str, ...]]:
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(_read_utf8(path, f.readlines))
    line = 1
    for record in reader:
      start, line = line, reader.line_num + 1  # a quoted field may span several lines
      if not record:
        continue
      if len(record) != 6:
        raise UserInputError(
            f"{path}:{start}: expected 6 columns (question, A, B, C, D, answer), got"
            f" {len(record)}; MMLU CSVs have no header row"
        )
      answer = record[5].strip()
      if answer not in LETTERS:
        raise UserInputError(f"{path}:{start}: answer must be one of A, B, C, D, got {record[5]!r}")
      rows.append((*record[:5], answer))
  return rows


def read_mmlu(folder, *, split: Optional[str] = None, subjects=None, need_dev: bool = True):
  """Reads an MMLU-format folder: ``{subject: (dev_rows, eval_rows)}``, sorted by subject.

  The folder holds ``dev/<subject>_dev.csv`` and ``test/<subject>_test.csv`` (or
  ``val/<subject>_val.csv``), header-less rows ``question, A, B, C, D, answer letter``
  (the layout of the original ``data.tar``). ``split`` picks ``"test"`` or ``"val"``;
  None takes ``test/`` when present, else ``val/``. Rows are tuples of 6 strings.

  Example:
    >>> data = fe.read_mmlu("data/mmlu", subjects=["anatomy"])  # doctest: +SKIP
  """
  folder = os.fspath(folder)
  layout = ("pass an MMLU folder holding dev/<subject>_dev.csv and test/<subject>_test.csv"
            " (or val/<subject>_val.csv)")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such folder; {layout}")
  if split is None:
    split = "test" if os.path.isdir(os.path.join(folder, "test")) else "val"
  if split not in ("test", "val"):
    raise UserInputError(f"split must be 'test' or 'val', got {split!r}")
  eval_dir = os.path.join(folder, split)
  if not os.path.isdir(eval_dir):
    raise FileNotFoundError(f"{folder}: no {split}/ subfolder; {layout}")
  suffix = f"_{split}.csv"
  found = sorted(f[:-len(suffix)] for f in os.listdir(eval_dir) if f.endswith(suffix))
  if not found:
    raise FileNotFoundError(f"{eval_dir}: no *{suffix} files; {layout}")
  if subjects is None:
    subjects = found
  elif isinstance(subjects, str):
    subjects = [subjects]
  unknown = [s for s in subjects if s not in found]
  if unknown:
    raise UserInputError(f"unknown subject {unknown[0]!r}; {eval_dir} has: {', '.join(found)}")
  data = {}
  for subject in sorted(subjects):
    dev = []
    if need_dev:
      dev_path = os.path.join(folder, "dev", f"{subject}_dev.csv")
      if not os.path.isfile(dev_path):
        raise FileNotFoundError(
            f"{dev_path}: missing; few-shot examples come from dev/ (or pass k_shot=0)"
        )
      dev = _read_csv(dev_path)
    data[subject] = (dev, _read_csv(os.path.join(eval_dir, subject + suffix)))
  return data


def _format_question(row, answer: bool) -> str:
  question, *choices, letter = row
  text = question.strip() + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, choices)) + "\nAnswer:"
  return text + f" {letter}" if answer else text


def mmlu_prompt(subject: str, shots: Sequence[Sequence[str]], row: Sequence[str]) -> str:
  """The prompt for one question: lm-eval-harness's ``mmlu`` (default) task format.

  ``"The following are multiple choice questions (with answers) about <subject with
  spaces>.\\n\\n"``, then each shot as ``"<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD.
  <d>\\nAnswer: <letter>\\n\\n"``, then the question the same way, ending ``"Answer:"``.
  Questions are stripped, choices kept verbatim (as lm-eval's template does).

  Example:
    >>> from falqon_jax.eval import mmlu_prompt
    >>> print(mmlu_prompt("high_school_math", [], ("1+1?", "1", "2", "3", "4", "B")))
    The following are multiple choice questions (with answers) about high school math.
    <BLANKLINE>
    1+1?
    A. 1
    B. 2
    C. 3
    D. 4
    Answer:
  """
  topic = subject.replace("_", " ")
  head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
  shots = "".join(_format_question(s, True) + "\n\n" for s in shots)
  return head + shots + _format_question(row, False)


def multiple_choice(
    model,
    params,
    tokenizer,
    folder,
    *,
    k_shot: int = 5,
    subjects=None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    split: Optional[str] = None,
    add_bos: bool = True,
    max_len: Optional[int] = None,
    details: bool = False,
) -> dict:
  """k-shot multiple-choice accuracy on an MMLU-format folder (see :func:`read_mmlu`).

  Matches lm-eval-harness's ``mmlu`` task (``lm_eval/tasks/mmlu/default``, the
  ``output_type: multiple_choice`` variant, metric ``acc``):

  * prompt: :func:`mmlu_prompt`: its ``description``, the first ``k_shot`` rows of the
    subject's dev CSV (sampler ``first_n``) joined by ``"\\n\\n"``, then the question in
    ``doc_to_text``'s format ending ``"Answer:"``;
  * choices: ``doc_to_choice: ["A", "B", "C", "D"]`` with the default target delimiter,
    so the continuations scored are ``" A"``, ``" B"``, ``" C"``, ``" D"``;
  * score: the summed log-likelihood of the continuation's tokens given the prompt,
    tokenized as lm-eval does (continuation tokens = ``encode(prompt + " A")`` past
    ``encode(prompt)``); the prediction is the argmax (first on ties), ``acc`` the mean;
  * too-long prompts lose tokens on the left (lm-eval truncates the same way; the
    original MMLU code drops shots instead), to ``max_len`` (default: the model's
    positions);
  * ``accuracy`` is the micro average over all questions, as lm-eval's ``mmlu`` group
    (``weight_by_size: true``); ``per_subject`` gives each subject's own accuracy.

  One difference: lm-eval's HF backend adds BOS only for some models (``add_bos_token``,
  on for Gemma); here ``add_bos`` (default True) decides.

  Args:
    folder: the MMLU-format folder.
    k_shot: dev examples per prompt; more than the subject's dev set is an error.
    subjects: a subject name or list; None for every subject in the eval split.
    limit: at most this many questions per subject (the first ones).
    batch_size: rows per forward; each question takes 4 rows.
    split: ``"test"`` or ``"val"``; None takes test/ when present, else val/.
    details: also return ``samples``: per question ``subject``, ``index``, ``prompt``,
      ``scores`` (4 log-likelihoods), ``prediction``, ``answer``, ``correct``.

  Returns:
    ``dict(accuracy=..., per_subject={subject: accuracy}, n=questions)``.

  Example:
    >>> fe.multiple_choice(model, params, tok, "data/mmlu", k_shot=5)  # doctest: +SKIP
    {'accuracy': 0.25, 'per_subject': {'anatomy': 0.25, ...}, 'n': 14042}
  """
  _check_tokenizer(model, tokenizer)
  _check_batch_size(batch_size)
  if not is_int(k_shot) or k_shot < 0:
    raise UserInputError(f"k_shot must be a non-negative int, got {k_shot!r}")
  if limit is not None and (not is_int(limit) or limit < 1):
    raise UserInputError(f"limit must be a positive int or None, got {limit!r}")
  data = read_mmlu(folder, split=split, subjects=subjects, need_dev=k_shot > 0)
  for subject, (dev, _) in data.items():
    if k_shot > len(dev):
      dev_path = os.path.join(os.fspath(folder), "dev", f"{subject}_dev.csv")
      raise UserInputError(
          f"k_shot={k_shot} but {dev_path} has only {len(dev)} questions; lower k_shot"
          f" to at most {len(dev)}"
      )
  max_len = min(max_len or _max_positions(model), _max_positions(model))
  rows, questions = [], []
  prompts = []
  for subject, (dev, test) in data.items():
    for index, row in enumerate(test[:limit]):
      prompt = mmlu_prompt(subject, dev[:k_shot], row)
      prompts.append(prompt)
      context = tokenizer.encode(prompt, add_bos=add_bos, add_eos=False)
      for letter in LETTERS:
        whole = tokenizer.encode(prompt + " " + letter, add_bos=add_bos, add_eos=False)
        cont = whole[len(context):]
        if not cont or len(cont) >= max_len:
          raise UserInputError(f"choice {letter!r} of {subject} question {index} has"
                           f" {len(cont)} continuation tokens; max_len={max_len}")
        whole = whole[-max_len:]
        rows.append((whole, [0.0] * (len(whole) - len(cont)) + [1.0] * len(cont)))
      questions.append((subject, index, LETTERS.index(row[5])))
  if not questions:
    raise UserInputError(f"{folder}: no questions in the selected subjects")
  width = _round_width(max(len(r) for r, _ in rows), max_len)
  scores = _score_rows(model, params, rows, width=width, batch_size=batch_size,
                       fill=_fill_id(tokenizer)).reshape(-1, len(LETTERS))
  preds = np.argmax(scores, axis=-1)
  correct: dict = {}
  samples = []
  for (subject, index, answer), pred, score, prompt in zip(questions, preds, scores, prompts):
    correct.setdefault(subject, []).append(bool(pred == answer))
    if details:
      samples.append(dict(subject=subject, index=index, prompt=prompt,
                          scores=[float(s) for s in score],
                          prediction=LETTERS[pred], answer=LETTERS[answer],
                          correct=bool(pred == answer)))
  total = sum(sum(c) for c in correct.values())
  result = {
      "accuracy": total / len(questions),
      "per_subject": {s: sum(c) / len(c) for s, c in correct.items()},
      "n": len(questions),
  }
  if details:
    result["samples"] = samples
  return result


# --------------------------------------------------------------------------- generation


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(model, static, params, prompt, prompt_mask, done, limit, temperature, top_k, key):
  """Prefill the left-padded ``prompt`` into a KV cache, then decode up to ``limit`` tokens.

  The loop is a ``lax.while_loop`` over a preallocated ``[B, max_new]`` buffer, stopping
  after ``limit`` steps or once every row has emitted EOS. ``limit``, ``temperature`` and
  ``top_k`` are traced, so they change without a recompile. Positions count real tokens
  only (``cumsum(mask) - 1``), so left padding does not shift them.
  """
  max_new, sample, n_vocab, eos_id, fill = static
  batch, plen = prompt.shape
  cache = model.init_cache(params, batch, plen + max_new)
  pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  step_mask = jnp.ones((batch, 1), jnp.int32)  # every decoded token is valid

  def forward(ids, mask, pos, cache):
    # The cache remembers which slots are pads, so the mask covers the new tokens only.
    logits, cache = model.apply(params, ids, attention_mask=mask, positions=pos, cache=cache)
    return logits[:, -1], cache

  def choose(logits, key):
    vocab = logits.shape[-1]
    if n_vocab < vocab:  # the model's padded vocab rows are never emitted
      logits = jnp.where(jnp.arange(vocab) < n_vocab, logits, -jnp.inf)
    if not sample:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    # top_k is traced (no lax.top_k, whose k is static): the k-th largest from a sort.
    kth = lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), vocab - top_k, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  logits, cache = forward(prompt, prompt_mask, pos, cache)
  buf = jnp.full((batch, max_new), fill, jnp.int32)

  def cond(state):
    i, _, _, _, _, done, _ = state
    return (i < limit) & ~jnp.all(done)

  def body(state):
    i, buf, logits, cache, next_pos, done, key = state
    key, sub = jax.random.split(key)
    tok = jnp.where(done, fill, choose(logits, sub))
    buf = buf.at[:, i].set(tok)
    done = done | (tok == eos_id)
    logits, cache = forward(tok[:, None], step_mask, next_pos[:, None], cache)
    return i + 1, buf, logits, cache, next_pos + 1, done, key

  state = (jnp.int32(0), buf, logits, cache, pos[:, -1] + 1, done, key)
  return lax.while_loop(cond, body, state)[1]


def generate_ids(
    model,
    params,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[int]]:
  """:func:`generate` on token ids: the new ids of each prompt, up to (without) EOS."""
  _check_tokenizer(model, tokenizer)
  _check_batch_size(batch_size)
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise UserInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not 0 <= temperature < math.inf:  # also refuses NaN
    raise UserInputError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}")
  if top_k is not None and not (is_int(top_k) and top_k >= 1):
    raise UserInputError(f"top_k must be a positive int or None, got {top_k!r}")
  max_new_tokens = int(max_new_tokens)  # it sets static shapes: a plain Python int
  positions = _max_positions(model)
  room = positions - max_new_tokens
  if room < 1:
    raise UserInputError(
        f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's"
        f" {positions} positions; lower max_new_tokens"
    )
  prompts = [list(p) for p in prompts]
  if not prompts:
    return []
  fill = _fill_id(tokenizer)
  eos = -1 if tokenizer.eos_id is None else int(tokenizer.eos_id)
  # Prompts longer than the room left lose tokens on the left, keeping the recent ones.
  prompts = [p[-room:] if p else [fill] for p in prompts]
  plen = _round_width(max(len(p) for p in prompts), room)
  # The buffer rounds up too (the loop stops at max_new_tokens), so nearby lengths share
  # one compile; greedy and sampled decoding compile separately.
  max_new = max(max_new_tokens, _round_width(max_new_tokens, positions - plen))
  static = (max_new, temperature > 0, int(tokenizer.vocab_size), eos, fill)
  dynamic = (jnp.int32(max_new_tokens), jnp.float32(max(temperature, 1e-6)),
             jnp.int32(min(top_k or tokenizer.vocab_size, tokenizer.vocab_size)))
  key = jax.random.key(seed)
  out = []
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = prompts[start:start + batch_size]
    ids = np.full((batch_size, plen), fill, np.int32)
    mask = np.zeros((batch_size, plen), np.int32)
    done = np.ones((batch_size,), bool)  # padding rows start done: they never hold the loop
    for r, p in enumerate(chunk):
      ids[r, plen - len(p):] = p
      mask[r, plen - len(p):] = 1
      done[r] = False
    mask[len(chunk):, -1] = 1  # padding rows get one visible token: no all-masked rows
    buf = np.asarray(_decode(model, static, params, jnp.asarray(ids), jnp.asarray(mask),
                             jnp.asarray(done), *dynamic, jax.random.fold_in(key, b)))
    buf = buf[:, :max_new_tokens]
    for row in buf[:len(chunk)].tolist():
      out.append(row[:row.index(eos)] if eos in row else row)
  return out


def generate(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 8,
    add_bos: bool = True,
    encode: Optional[Callable[[str], Sequence[int]]] = None,
) -> list[str]:
  """Completes each prompt: greedy (``temperature=0``) or sampled; returns the new text.

  One jitted function per shape prefills the left-padded prompts into the model's KV
  cache (``model.init_cache``), then runs a ``lax.while_loop`` over a preallocated
  ``[batch_size, max_new_tokens]`` buffer, one token per step, until every row has
  emitted EOS or the buffer is full. Sampling divides the logits by ``temperature``,
  keeps the ``top_k`` largest (all when None), and draws from ``jax.random.key(seed)``
  (folded with the batch index). Ids past ``tokenizer.vocab_size`` (a padded embedding
  table) are never emitted. Prompts are encoded with BOS when ``add_bos``, or by
  ``encode(prompt) -> ids`` when given (e.g. to truncate them as training did); those too
  long for the model's positions lose tokens on the left. The text returned stops before
  EOS.

  Example:
    >>> fe.generate(model, params, tok, ["2+2="], max_new_tokens=4)  # doctest: +SKIP
    ['4']
  """
  _check_tokenizer(model, tokenizer)
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of strings, not one string")
  if encode is None:
    ids = [tokenizer.encode(p, add_bos=add_bos, add_eos=False) for p in prompts]
  else:
    ids = [encode(p) for p in prompts]
  new = generate_ids(model, params, tokenizer, ids, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size)
  return [tokenizer.decode(n) for n in new]


def _default_match(prediction: str, example) -> bool:
  return prediction.strip() == str(example.response).strip()


def exact_match(
    model,
    params,
    tokenizer,
    examples: Sequence[Any],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    match: Optional[Callable[[str, Any], bool]] = None,
    add_bos: bool = True,
    encode: Optional[Callable[[str], Sequence[int]]] = None,
) -> dict:
  """Greedy-decodes each ``example.prompt`` and compares it with ``example.response``.

  ``match(prediction, example) -> bool`` decides; the default is equality after
  ``str.strip()`` on both sides. The prediction is the text up to EOS or
  ``max_new_tokens``. ``add_bos`` and ``encode`` are as for :func:`generate`.

  Returns:
    ``dict(exact_match=fraction correct, n=examples, samples=[dict(prompt, response,
    prediction, correct), ...])``.

  Example:
    >>> fe.exact_match(model, params, tok, examples)["exact_match"]  # doctest: +SKIP
    0.97
  """
  examples = list(examples)
  if not examples:
    raise UserInputError("exact_match: no examples; the dataset is empty")
  for i, ex in enumerate(examples):
    if not (hasattr(ex, "prompt") and hasattr(ex, "response")):
      raise TypeError(f"example {i} ({type(ex).__name__}) has no .prompt/.response")
  match = match or _default_match
  preds = generate(model, params, tokenizer, [ex.prompt for ex in examples],
                   max_new_tokens=max_new_tokens, batch_size=batch_size, add_bos=add_bos,
                   encode=encode)
  samples = [
      dict(prompt=ex.prompt, response=ex.response, prediction=p, correct=bool(match(p, ex)))
      for ex, p in zip(examples, preds)
  ]
  hits = sum(s["correct"] for s in samples)
  return {"exact_match": hits / len(samples), "n": len(samples), "samples": samples}
