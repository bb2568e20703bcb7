"""Tokenizers: the built-in byte-level one, and a thin adapter over a local HF tokenizer.

Both expose one small interface, the only one the rest of ``falqon_jax.data`` uses:
``encode(text, add_bos=False, add_eos=False) -> list[int]``, ``encode_batch(texts)``,
``decode(ids) -> str`` (special ids skipped), ``vocab_size``, ``pad_id``, ``bos_id`` (may
be None for an HF tokenizer without one), ``eos_id`` and ``chat_template`` (None when
there is none).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from falqon_jax.errors import UserInputError


class DataError(UserInputError):
  """Bad data or tokenizer input. The message is one line naming the problem and the fix."""


class ByteTokenizer:
  """The default tokenizer: UTF-8 bytes are ids 0..255; then pad 256, bos 257, eos 258.

  ``vocab_size`` is 272, not 259: it is rounded up to a multiple of 16 so that an
  embedding or LM head of this size has FP8-GEMM-friendly shapes. Ids 259..271 are
  never produced; ``decode`` skips them like the special ids.

  >>> tok = ByteTokenizer()
  >>> tok.encode("hé", add_bos=True, add_eos=True)
  [257, 104, 195, 169, 258]
  >>> tok.decode([257, 104, 195, 169, 258, 256])
  'hé'
  >>> tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
  (272, 256, 257, 258)
  """

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 272
  chat_template = None
  name = "byte"

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(t.encode("utf-8")) for t in texts]

  def decode(self, ids) -> str:
    # A prefix of a multi-byte character (a truncated generation) becomes U+FFFD.
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer(vocab_size=272)"


class HFTokenizer:
  """Adapter over a ``transformers`` fast tokenizer loaded from a local folder.

  Special tokens are never added implicitly: ``encode`` adds BOS / EOS only when asked,
  so :func:`falqon_jax.data.tokenize_example` controls them the same way for every
  tokenizer. ``vocab_size`` counts added tokens (``len(tokenizer)``); a model's embedding
  may be larger. ``pad_id`` falls back to ``eos_id`` when the tokenizer has no pad token
  (pads are masked everywhere, so their id only has to be valid).
  """

  def __init__(self, tokenizer, name: str):
    self.hf = tokenizer
    self.name = name
    if tokenizer.eos_token_id is None:
      raise DataError(
          f"tokenizer {name!r} has no eos token; set eos_token in its tokenizer_config.json"
      )
    self.eos_id = int(tokenizer.eos_token_id)
    self.bos_id = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
    pad = tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad is None else int(pad)
    self.vocab_size = len(tokenizer)
    self.chat_template = getattr(tokenizer, "chat_template", None) or None

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self.hf.encode(text, add_special_tokens=False)
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids + [self.eos_id] if add_eos else ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
      return []
    # One call into the Rust tokenizer (parallel) instead of one per text.
    return self.hf(list(texts), add_special_tokens=False)["input_ids"]

  def decode(self, ids) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
    """Renders ``messages`` (a list of ``{role, content}``) with the folder's chat template."""
    if self.chat_template is None:
      raise DataError(
          f"tokenizer {self.name!r} has no chat template; add chat_template to its"
          " tokenizer_config.json, or leave tokenizer=None for the built-in chat format"
      )
    try:
      import jinja2  # noqa: F401  (transformers renders templates with it)
    except ImportError:
      raise DataError(
          "rendering a chat template needs jinja2: pip install 'jinja2>=3.1'"
      ) from None
    return self.hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )

  def __repr__(self):
    return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# "owner/name" or "name": what the hub accepts; anything else is meant as a local path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_name(source: str) -> bool:
  """True for ``owner/name`` (or ``name``) strings that are not meant as local paths.

  ``models/llama`` where ``models`` is a local folder is a mistyped local path, not a hub
  name: failing at once beats a minute of network retries offline.
  """
  if not _HUB_NAME.match(source) or re.search(r"\.(jsonl?|csv|parquet|txt)$", source, re.I):
    return False
  return not ("/" in source and os.path.isdir(source.split("/")[0]))


def check_vocabulary(tokenizer, vocab_size: int, model: str) -> None:
  """Refuses a tokenizer whose ids can reach past the model's embedding table, where JAX's
  gather would silently clamp them to the last row.

  >>> check_vocabulary(ByteTokenizer(), 256, "tiny")
  Traceback (most recent call last):
  ...
  falqon_jax.data._tokenizer.DataError: the tokenizer has 272 ids but tiny's vocabulary has 256: larger ids would be silently clamped; use the model's own tokenizer (--tokenizer)
  """
  if tokenizer.vocab_size > vocab_size:
    raise DataError(
        f"the tokenizer has {tokenizer.vocab_size} ids but {model}'s vocabulary has"
        f" {vocab_size}: larger ids would be silently clamped; use the model's own tokenizer"
        " (--tokenizer)")


def load_tokenizer(path_or_name=None):
  """The byte tokenizer for ``None`` (or ``"byte"``), else an :class:`HFTokenizer`.

  A local folder needs ``tokenizer.json`` (loaded with ``PreTrainedTokenizerFast``, which
  also reads the special tokens and chat template of ``tokenizer_config.json``) or a
  ``tokenizer_config.json`` that ``AutoTokenizer`` can load without downloading. A string
  that is not an existing path but looks like ``owner/name`` is tried on the hub (works
  only online). A tokenizer object with ``encode``/``decode`` is returned unchanged.

  >>> load_tokenizer()
  ByteTokenizer(vocab_size=272)
  >>> load_tokenizer("/no/such/folder")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  FileNotFoundError: tokenizer folder not found: /no/such/folder; pass a folder with ...
  """
  if path_or_name is None or path_or_name == "byte":
    return ByteTokenizer()
  if hasattr(path_or_name, "encode") and hasattr(path_or_name, "eos_id"):
    return path_or_name
  path = os.path.expanduser(os.fspath(path_or_name))
  if os.path.isfile(path) and os.path.basename(path) in _TOKENIZER_FILES:
    path = os.path.dirname(path) or "."  # a tokenizer.json path means its folder
  if os.path.isdir(path):
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
      raise DataError(
          f"{path} has neither tokenizer.json nor tokenizer_config.json; pass a tokenizer"
          " (or model) folder, or omit it for the byte tokenizer"
      )
    return HFTokenizer(_load_hf(path, local=True), path)
  if os.path.exists(path):
    raise DataError(f"{path} is a file; pass the folder that holds tokenizer.json")
  if not looks_like_hub_name(os.fspath(path_or_name)):
    raise FileNotFoundError(
        f"tokenizer folder not found: {path}; pass a folder with tokenizer.json, or omit"
        " it for the byte tokenizer"
    )
  return HFTokenizer(_load_hf(os.fspath(path_or_name), local=False), os.fspath(path_or_name))


def _load_hf(source: str, *, local: bool):
  try:
    import transformers
  except ImportError:
    raise DataError(
        "loading an HF tokenizer needs transformers: pip install 'falqon-jax[hf]'"
    ) from None
  try:
    if local and os.path.isfile(os.path.join(source, "tokenizer.json")):
      return transformers.PreTrainedTokenizerFast.from_pretrained(source, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(source, local_files_only=local, use_fast=True)
  except Exception as e:  # noqa: BLE001  (many failure types; all mean "cannot load")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if local:
      raise DataError(f"cannot load the tokenizer in {source}: {first}") from None
    raise DataError(
        f"{source!r} is not a local folder, and loading it from the hub failed ({first});"
        " pass a folder with tokenizer.json, or go online"
    ) from None
