"""Tokenized examples with loss masks, and fixed-shape, bucketed, resumable batches.

Shift convention. ``loss_mask[t]`` is True when token ``t`` is a *target*: it is predicted
from the tokens before it. With logits of shape ``[B, T, V]``::

  loss = sum(ce(logits[:, :-1], input_ids[:, 1:]) * loss_mask[:, 1:]) / sum(loss_mask[:, 1:])

``loss_mask[:, 0]`` is always False (nothing predicts the first token). Targets are the
response tokens and the EOS after them; never the BOS, the prompt (unless
``train_on_source``) or pads. The reference also takes its loss on pads; here pads are
masked.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np

from falqon_jax._melded_kernel import is_int
from falqon_jax.data._examples import Example
from falqon_jax.data._tokenizer import ByteTokenizer, DataError

TRUNCATION_SIDES = ("left", "right")


def _check_lengths(source_max_len, target_max_len, truncation_side):
  if not (is_int(source_max_len) and source_max_len >= 1):
    raise DataError(f"source_max_len must be an int >= 1, got {source_max_len!r}")
  if not (is_int(target_max_len) and target_max_len >= 1):
    raise DataError(f"target_max_len must be an int >= 1, got {target_max_len!r}")
  if truncation_side not in TRUNCATION_SIDES:
    raise DataError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")


def _source(prompt_ids, tokenizer, source_max_len, truncation_side):
  """BOS + prompt ids, cut to ``source_max_len`` tokens (the BOS always stays)."""
  bos = tokenizer.bos_id
  prompt_ids = list(prompt_ids)
  # Chat templates often write the BOS text themselves: never add a second one.
  lead = [] if bos is None or prompt_ids[:1] == [bos] else [bos]
  source = lead + prompt_ids
  if len(source) > source_max_len:
    head = 1 if bos is not None and source[0] == bos else 0
    keep = max(source_max_len - head, 0)
    if truncation_side == "left":  # drop the start, keep the end of the prompt
      source = source[:head] + (source[len(source) - keep:] if keep else [])
    else:  # the reference (QLoRA): keep the start
      source = source[:source_max_len]
  return source


def _assemble(prompt_ids, response_ids, tokenizer, source_max_len, target_max_len,
              train_on_source, truncation_side):
  source = _source(prompt_ids, tokenizer, source_max_len, truncation_side)
  eos, response_ids = tokenizer.eos_id, list(response_ids)
  target = response_ids if response_ids[-1:] == [eos] else response_ids + [eos]
  # As in the reference, a response cut by target_max_len loses its EOS: the model is not
  # taught to stop mid-answer.
  target = target[:target_max_len]
  ids = np.asarray(source + target, dtype=np.int32)
  mask = np.zeros(len(ids), dtype=np.bool_)
  mask[len(source):] = True
  if train_on_source:
    mask[:len(source)] = True
  mask[0] = False
  return ids, mask


def tokenize_example(
    example: Example,
    tokenizer=None,
    *,
    source_max_len: int = 16,
    target_max_len: int = 512,
    train_on_source: bool = False,
    truncation_side: str = "left",
):
  """``(input_ids int32[L], loss_mask bool[L])`` for one example.

  ``input_ids`` = BOS + prompt (at most ``source_max_len`` tokens, BOS included) +
  response + EOS (at most ``target_max_len`` tokens, EOS included), so L <= 16 + 512 by
  default, as in the reference. A long prompt keeps its *end* by default
  (``truncation_side="left"``, HF's name for dropping tokens on the left): that keeps the
  question and the ``### Response:`` marker right before the answer. The reference
  (QLoRA) keeps the start (``truncation_side="right"``), which with 16 tokens leaves only
  the Alpaca preamble. A tokenizer without BOS gets none; a prompt that already starts with
  BOS (chat templates) gets no second one. ``tokenizer=None`` is the byte tokenizer.

  >>> ids, mask = tokenize_example(Example("1+2=", "3"))
  >>> ids.tolist(), mask.astype(int).tolist()
  ([257, 49, 43, 50, 61, 51, 258], [0, 0, 0, 0, 0, 1, 1])
  """
  _check_lengths(source_max_len, target_max_len, truncation_side)
  tokenizer = tokenizer or ByteTokenizer()
  return _assemble(tokenizer.encode(example.prompt), tokenizer.encode(example.response),
                   tokenizer, source_max_len, target_max_len, train_on_source, truncation_side)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer=None,
    *,
    source_max_len: int = 16,
    target_max_len: int = 512,
    train_on_source: bool = False,
    truncation_side: str = "left",
):
  """:func:`tokenize_example` over a list, encoding prompts and responses in two batch calls."""
  _check_lengths(source_max_len, target_max_len, truncation_side)
  tokenizer = tokenizer or ByteTokenizer()
  prompts = tokenizer.encode_batch([e.prompt for e in examples])
  responses = tokenizer.encode_batch([e.response for e in examples])
  return [_assemble(p, r, tokenizer, source_max_len, target_max_len, train_on_source,
                    truncation_side) for p, r in zip(prompts, responses)]


def encode_prompt(
    prompt: str,
    tokenizer=None,
    *,
    source_max_len: int = 16,
    truncation_side: str = "left",
):
  """The prompt exactly as training shows it (BOS + truncated prompt), for generation.

  Decoding from these ids and stopping at EOS is how a trained model answers an example.

  >>> encode_prompt("1+2=").tolist()
  [257, 49, 43, 50, 61]
  """
  _check_lengths(source_max_len, 1, truncation_side)
  tokenizer = tokenizer or ByteTokenizer()
  ids = _source(tokenizer.encode(prompt), tokenizer, source_max_len, truncation_side)
  return np.asarray(ids, dtype=np.int32)


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` rounded up
  to a multiple of 16 (so B*T stays a multiple of 16, as FP8 GEMMs need).

  >>> default_buckets(528)
  (16, 32, 64, 128, 256, 512, 528)
  """
  top = -(-max_length // 16) * 16
  out, t = [], smallest
  while t < top:
    out.append(t)
    t *= 2
  return tuple(out) + (top,)


def segment_mask(segment_ids):
  """Block-diagonal causal attention mask ``bool[B, T, T]`` from packed ``segment_ids``.

  Query t may attend key s when s <= t and both lie in the same example (pads, segment 0,
  attend nothing). Works on numpy and jax arrays alike, so it can run inside ``jit``.

  >>> segment_mask(np.array([[1, 1, 2, 0]]))[0].astype(int).tolist()
  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
  """
  q, k = segment_ids[:, :, None], segment_ids[:, None, :]
  t = segment_ids.shape[-1]
  pos = np.arange(t)
  causal = pos[:, None] >= pos[None, :]
  return (q == k) & (q > 0) & causal


class Batches:
  """Infinite iterator of fixed-shape numpy batches, deterministic per seed and resumable.

  Each batch is ``{"input_ids": int32[b, T], "loss_mask": bool[b, T], "attention_mask":
  int32[b, T], "position_ids": int32[b, T], "segment_ids": int32[b, T]}`` with ``b =
  batch_size // process_count`` (this process's rows of the global batch) and T from
  ``buckets``. Rows are right-padded with ``pad_id``; pads have ``attention_mask`` 0,
  ``loss_mask`` False and segment 0.

  ``examples``: :class:`Example` objects (tokenized here with ``tokenizer``, default the
  byte tokenizer, and the length options of :func:`tokenize_example`), or already
  tokenized ``(input_ids, loss_mask)`` pairs (then ``pad_id`` defaults to 0, and the
  default buckets to those of ``source_max_len + target_max_len``).

  Order. Each epoch shuffles the examples with ``default_rng([seed, epoch])``. With
  ``group_by_length`` (QLoRA's ``group_by_length``), each group of ``group_size`` global
  batches is sorted by length before being cut into batches, and the batches are then
  shuffled, so a batch holds similar lengths and pads little. The last partial global
  batch of an epoch is dropped (fixed shapes); a different subset is dropped each epoch.

  Buckets. T is the smallest bucket that holds the longest row of the *global* batch, so
  every process gets the same T and jit compiles at most ``len(buckets)`` shapes.

  Packing (``pack=True``): the shuffled examples fill rows of ``pack_length`` tokens
  (default: the largest bucket) one after another; an example that does not fit starts a
  new row. ``position_ids`` restart at 0 for each example and ``segment_ids`` number the
  examples of a row 1, 2, ... The attention is the model's choice: a model that accepts
  a block-diagonal mask should use :func:`segment_mask`, so examples never see each other;
  a model that takes only a ``[B, T]`` padding mask (HF Flax Llama) runs plain causal
  attention over the row, so an example also sees the earlier ones in its row. Targets are
  unaffected either way: every example starts with BOS, which is never a target, so no
  loss term predicts across a boundary. ``group_by_length`` does not apply to packing.

  Multi-host. Every process holds the same (tokenized) examples and builds the same global
  order, but materializes only its rows ``[i*b, (i+1)*b)`` of each global batch, i =
  ``process_index``. Knowing the global batch is what gives every process the same T; the
  token ids of an instruction set are small (Alpaca: ~52k x ~150 ids). ``batch_size`` must
  divide by ``process_count``.

  Resume. ``state()`` is a small JSON-able dict (the same on every process): the position
  of the next batch. ``Batches(..., state=s)`` or ``restore(s)`` continues exactly where
  it was, after checking that the state comes from the same data, batch size and seed.

  >>> from falqon_jax.data import synthetic_task
  >>> it = Batches(synthetic_task(64), batch_size=8, seed=0)
  >>> batch = next(it)
  >>> batch["input_ids"].shape, it.buckets[:2], it.state()["step"]
  ((8, 16), (16, 32), 1)
  >>> resumed = Batches(synthetic_task(64), batch_size=8, seed=0, state=it.state())
  >>> bool((next(resumed)["input_ids"] == next(it)["input_ids"]).all())
  True
  """

  def __init__(
      self,
      examples,
      *,
      batch_size: int,
      tokenizer=None,
      seed: int = 0,
      source_max_len: int = 16,
      target_max_len: int = 512,
      train_on_source: bool = False,
      truncation_side: str = "left",
      buckets: Optional[Sequence[int]] = None,
      group_by_length: bool = True,
      group_size: int = 50,
      pack: bool = False,
      pack_length: Optional[int] = None,
      pad_id: Optional[int] = None,
      process_index: int = 0,
      process_count: int = 1,
      state: Optional[dict] = None,
  ):
    if not is_int(batch_size) or batch_size < 1:
      raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (is_int(process_count) and process_count >= 1):
      raise DataError(f"process_count must be a positive int, got {process_count!r}")
    if not (is_int(process_index) and 0 <= process_index < process_count):
      raise DataError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
      raise DataError(
          f"global batch_size {batch_size} is not divisible by process_count {process_count};"
          f" use a multiple of {process_count}"
      )
    if not is_int(seed) or seed < 0:
      raise DataError(f"seed must be a non-negative int, got {seed!r}")
    if not is_int(group_size) or group_size < 1:
      raise DataError(f"group_size must be a positive int, got {group_size!r}")
    examples = list(examples)
    if not examples:
      raise DataError("Batches got no examples; pass a non-empty list")
    if isinstance(examples[0], Example):
      tokenizer = tokenizer or ByteTokenizer()
      examples = tokenize_examples(
          examples, tokenizer, source_max_len=source_max_len, target_max_len=target_max_len,
          train_on_source=train_on_source, truncation_side=truncation_side)
    self._data = [(np.asarray(i, np.int32), np.asarray(m, np.bool_)) for i, m in examples]
    for k, (ids, mask) in enumerate(self._data):
      if ids.ndim != 1 or ids.shape != mask.shape or not len(ids):
        raise DataError(
            f"example {k}: input_ids {ids.shape} and loss_mask {mask.shape} must be equal,"
            " non-empty 1-D arrays; pass Example objects or tokenize_examples() output")
    self._lengths = np.array([len(i) for i, _ in self._data], dtype=np.int64)
    if pad_id is None:
      pad_id = tokenizer.pad_id if tokenizer is not None else 0
    self.pad_id = int(pad_id)
    if buckets is None:
      buckets = default_buckets(max(source_max_len + target_max_len, int(self._lengths.max())))
    self.buckets = tuple(sorted(int(b) for b in buckets))
    if self._lengths.max() > self.buckets[-1]:
      raise DataError(
          f"an example has {self._lengths.max()} tokens, more than the largest bucket"
          f" {self.buckets[-1]}; add a larger bucket or shorten the examples"
      )
    self.pack = bool(pack)
    self.pack_length = int(pack_length or self.buckets[-1])
    if self.pack and self._lengths.max() > self.pack_length:
      raise DataError(
          f"an example has {self._lengths.max()} tokens, more than pack_length"
          f" {self.pack_length}; raise pack_length"
      )
    # Python ints: batch_size and seed go into the JSON-able state().
    self.batch_size, self.seed = int(batch_size), int(seed)
    self.group_by_length, self.group_size = bool(group_by_length), int(group_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self._local = self.batch_size // self.process_count
    self._epoch, self._step, self._plan_cache = 0, 0, (None, None)
    self._fingerprint = zlib.crc32(self._lengths.tobytes())  # same data, same lengths
    if not self._plan(0):
      what = (f"packing {len(self._data)} examples into rows of {self.pack_length} tokens gives"
              f" {len(self._rows(0))} rows," if self.pack else f"{len(self._data)} examples are")
      raise DataError(
          f"{what} fewer than one global batch of {batch_size}; lower batch_size or add data"
      )
    if state is not None:
      self.restore(state)

  # -- order ------------------------------------------------------------------------

  def _rng(self, epoch):
    return np.random.default_rng([self.seed, epoch])

  def _rows(self, epoch):
    """Packed rows of an epoch: lists of example indices."""
    rows, row, used = [], [], 0
    for i in self._rng(epoch).permutation(len(self._data)):
      n = int(self._lengths[i])
      if used + n > self.pack_length:
        rows.append(row)
        row, used = [], 0
      row.append(int(i))
      used += n
    return rows + [row]

  def _plan(self, epoch):
    """The epoch's global batches: lists of rows, a row being a list of example indices."""
    if self._plan_cache[0] == epoch:
      return self._plan_cache[1]
    B = self.batch_size
    if self.pack:
      rows = self._rows(epoch)
      plan = [rows[j:j + B] for j in range(0, len(rows) // B * B, B)]
    else:
      rng = self._rng(epoch)
      order = rng.permutation(len(self._data))
      if self.group_by_length:
        g = self.group_size * B
        # Longest first within each group (stable, so ties keep the shuffled order).
        order = np.concatenate([
            chunk[np.argsort(-self._lengths[chunk], kind="stable")]
            for chunk in np.split(order, range(g, len(order), g))
        ])
      n = len(order) // B
      batches = order[:n * B].reshape(n, B)
      if self.group_by_length:
        batches = batches[rng.permutation(n)]
      plan = [[[int(i)] for i in b] for b in batches]
    self._plan_cache = (epoch, plan)
    return plan

  def steps_in_epoch(self, epoch: int) -> int:
    """Global batches in ``epoch`` (constant unless packing)."""
    return len(self._plan(epoch))

  # -- iteration --------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self):
    plan = self._plan(self._epoch)
    while self._step >= len(plan):
      self._epoch, self._step = self._epoch + 1, 0
      plan = self._plan(self._epoch)
    rows = plan[self._step]
    self._step += 1
    return self._make(rows)

  def _bucket(self, rows):
    if self.pack:
      return self.pack_length
    longest = max(int(self._lengths[r[0]]) for r in rows)
    return next(b for b in self.buckets if b >= longest)

  def _make(self, rows):
    T, b = self._bucket(rows), self._local
    ids = np.full((b, T), self.pad_id, np.int32)
    loss = np.zeros((b, T), np.bool_)
    attn = np.zeros((b, T), np.int32)
    pos = np.zeros((b, T), np.int32)
    seg = np.zeros((b, T), np.int32)
    local = rows[self.process_index * b:(self.process_index + 1) * b]
    for r, row in enumerate(local):
      at = 0
      for s, i in enumerate(row, start=1):
        tok, mask = self._data[i]
        n = len(tok)
        ids[r, at:at + n], loss[r, at:at + n] = tok, mask
        attn[r, at:at + n], seg[r, at:at + n] = 1, s
        pos[r, at:at + n] = np.arange(n)
        at += n
      # Trailing pads continue the last example's positions: harmless (they are masked)
      # and, unpacked, makes position_ids == arange(T), what HF models assume by default.
      pos[r, at:] = np.arange(T - at) + (n if row else 0)
    return {"input_ids": ids, "loss_mask": loss, "attention_mask": attn,
            "position_ids": pos, "segment_ids": seg}

  # -- resume -----------------------------------------------------------------------

  @property
  def epoch(self) -> int:
    return self._epoch

  def state(self) -> dict:
    """Where the next batch comes from: ``{"epoch", "step", "seed", ...}`` (JSON-able)."""
    return {"epoch": self._epoch, "step": self._step, "seed": self.seed,
            "batch_size": self.batch_size, "pack": self.pack,
            "num_examples": len(self._data), "fingerprint": self._fingerprint}

  def restore(self, state: dict) -> "Batches":
    """Continues from ``state`` (from :meth:`state`, possibly via JSON). Returns self."""
    try:
      epoch, step = int(state["epoch"]), int(state["step"])
    except (KeyError, TypeError, ValueError):
      raise DataError(
          f"not a Batches state: {str(state)[:80]!r}; pass the dict that state() returned"
      ) from None
    mine = self.state()
    for key in ("seed", "batch_size", "pack", "num_examples", "fingerprint"):
      if key in state and state[key] != mine[key]:
        raise DataError(
            f"resume state has {key}={state[key]!r} but this run has {mine[key]!r}; resume"
            " with the same data, batch size, packing and seed"
        )
    if epoch < 0 or step < 0 or step > self.steps_in_epoch(epoch):
      raise DataError(f"resume state position epoch={epoch} step={step} is out of range")
    self._epoch, self._step = epoch, step
    return self
