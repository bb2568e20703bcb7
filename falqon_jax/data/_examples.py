"""Instruction examples: loading Alpaca / OASST / chat data, and the built-in synthetic task.

Every source is normalized to :class:`Example` ``(prompt, response)``: the model reads the
prompt and is trained on the response only (see :func:`falqon_jax.data.tokenize_example`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence

import numpy as np

from falqon_jax._melded_kernel import is_int
from falqon_jax.data._tokenizer import DataError, looks_like_hub_name


@dataclasses.dataclass(frozen=True)
class Example:
  """One normalized instruction example: train on ``response`` given ``prompt``."""

  prompt: str
  response: str


# The Alpaca prompt formats, exactly as QLoRA (and so the FALQON reference) uses them:
# the prompt ends with "### Response: " (a space, no newline) and the output follows.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides"
    " further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately"
    " completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)
OASST_HUMAN = "### Human:"
OASST_ASSISTANT = "### Assistant:"
# Without a tokenizer chat template, chat messages render as "<|role|>\n{content}\n" each,
# and the prompt ends with "<|assistant|>\n"; the response is the assistant's content.
CHAT_FALLBACK_TURN = "<|{role}|>\n{content}\n"

# Hub names of the reference's two data sets (falqon-reference.md section 6).
DATASET_ALIASES = {"alpaca": "tatsu-lab/alpaca", "oasst1": "timdettmers/openassistant-guanaco"}

FORMATS = ("auto", "alpaca", "oasst", "chat", "prompt")
_FIELDS = {  # required fields per format, in the order auto-detection tries them
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt": ("prompt", "response"),
    "oasst": ("text",),
}


def alpaca_prompt(instruction: str, input: str = "") -> str:
  """The Alpaca/QLoRA prompt, with or without an input.

  >>> alpaca_prompt("Say hi.").endswith("### Instruction:\\nSay hi.\\n\\n### Response: ")
  True
  """
  if input:
    return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
  return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def oasst_examples(text: str) -> list[Example]:
  """One example per assistant turn of a guanaco-style ``### Human: ... ### Assistant: ...``.

  The prompt is the text before the turn (exactly as written, through the marker and the
  space after it), so earlier assistant turns are context, each one trained in its own
  example. Text without an assistant marker gives no example.

  >>> oasst_examples("### Human: Hi### Assistant: Hello!### Human: Bye### Assistant: Ciao")
  ... # doctest: +NORMALIZE_WHITESPACE
  [Example(prompt='### Human: Hi### Assistant: ', response='Hello!'),
   Example(prompt='### Human: Hi### Assistant: Hello!### Human: Bye### Assistant: ',
           response='Ciao')]
  """
  out = []
  for m in re.finditer(re.escape(OASST_ASSISTANT) + r" ?", text):
    end = text.find(OASST_HUMAN, m.end())
    response = text[m.end():None if end < 0 else end].rstrip()
    out.append(Example(text[:m.end()], response))
  return out


def render_chat_fallback(messages, add_generation_prompt: bool = False) -> str:
  """The built-in chat format used when the tokenizer has no chat template.

  >>> render_chat_fallback([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
  '<|user|>\\n2+2?\\n<|assistant|>\\n'
  """
  text = "".join(CHAT_FALLBACK_TURN.format(role=m["role"], content=m["content"]) for m in messages)
  return text + ("<|assistant|>\n" if add_generation_prompt else "")


def chat_examples(messages, tokenizer=None) -> list[Example]:
  """One example per assistant message; the prompt is the rendered conversation before it.

  With a tokenizer chat template, the response is what the template adds for that message
  (end-of-turn markers included), found as the difference between rendering with and
  without it; if the template does not render that way as a prefix, the response is the
  bare content. Without a template, :func:`render_chat_fallback` is used.
  """
  template = getattr(tokenizer, "chat_template", None)
  out = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    if template is None:
      out.append(Example(render_chat_fallback(messages[:i], True), m["content"]))
      continue
    prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[:i + 1])
    response = full[len(prompt):] if full.startswith(prompt) else m["content"]
    out.append(Example(prompt, response.rstrip()))
  return out


def _text(value) -> str:
  return "" if value is None else str(value)


def _check_messages(messages, where):
  ok = isinstance(messages, list) and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
  )
  if not ok:
    raise DataError(
        f"{where}: 'messages' must be a list of {{role, content}} objects; got"
        f" {str(messages)[:60]!r}"
    )
  return [{"role": m["role"], "content": _text(m["content"])} for m in messages]


def _convert(fmt, row, tokenizer, where) -> list[Example]:
  if fmt == "alpaca":
    prompt = alpaca_prompt(_text(row.get("instruction")), _text(row.get("input")))
    return [Example(prompt, _text(row.get("output")))]
  if fmt == "prompt":
    return [Example(_text(row.get("prompt")), _text(row.get("response")))]
  if fmt == "oasst":
    return oasst_examples(_text(row.get("text")))
  return chat_examples(_check_messages(row.get("messages"), where), tokenizer)


def _detect(columns, where) -> str:
  for fmt, fields in _FIELDS.items():
    if all(f in columns for f in fields):
      return fmt
  raise DataError(
      f"{where}: cannot detect the data format from fields {sorted(columns)}; expected"
      " messages (chat), instruction+output (alpaca), prompt+response, or text (oasst):"
      " rename the fields or pass format="
  )


def _load_rows(source, split: str):
  """A ``datasets.Dataset`` and a name for messages, from a path, hub name, list or Dataset."""
  try:
    import datasets
  except ImportError:
    raise DataError(
        "loading data files needs the datasets package: pip install 'falqon-jax[hf]'"
    ) from None
  if isinstance(source, datasets.Dataset):
    return source, "dataset"
  if isinstance(source, (list, tuple)):
    return datasets.Dataset.from_list(list(source)), "list"
  source = os.fspath(source)
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    # datasets' own split inference (train*.jsonl, test*.json, ...; one split "train" when
    # no name says otherwise), restricted to JSON files so READMEs and caches are ignored.
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
      files = DataFilesDict.from_patterns(
          get_data_patterns(path), base_path=path, allowed_extensions=[".json", ".jsonl"])
    except FileNotFoundError:
      files = {}
    files = {str(k): list(v) for k, v in files.items() if len(v)}
    if not files:
      raise DataError(
          f"{path}: no .json or .jsonl files in this folder; pass a JSON/JSONL file or folder")
    kwargs, where = dict(data_files=files), path
  elif os.path.isfile(path):
    # A single file is the requested split, whatever its name.
    kwargs, where = dict(data_files={split: path}), path
  elif looks_like_hub_name(source) and not os.path.exists(path):
    name = DATASET_ALIASES.get(source, source)
    try:
      return datasets.load_dataset(name, split=split), name
    except Exception as e:  # noqa: BLE001  (offline, missing, private: all one message)
      raise DataError(
          f"{source!r} is not a local file or folder, and loading hub dataset {name!r} failed"
          f" ({type(e).__name__}: {_first_line(e)}); pass a JSON/JSONL path, or go online"
      ) from None
  else:
    raise FileNotFoundError(
        f"data path not found: {path}; pass an existing JSON/JSONL file or folder"
    )
  try:
    return datasets.load_dataset("json", split=split, **kwargs), where
  except ValueError as e:
    if "split" in str(e).lower():
      raise DataError(f"{where}: {_first_line(e)}; pass split=") from None
    raise DataError(f"{where}: cannot read as JSON/JSONL ({_first_line(e)})") from None
  except Exception as e:  # noqa: BLE001  (datasets wraps parse errors in several types)
    cause = e.__cause__ or e
    raise DataError(
        f"{where}: cannot read as JSON/JSONL ({type(cause).__name__}: {_first_line(cause)});"
        " fix the file (one JSON object per line, or one JSON list)"
    ) from None


def _first_line(e) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def load_examples(
    source,
    *,
    format: str = "auto",
    split: str = "train",
    limit: Optional[int] = None,
    tokenizer=None,
) -> list[Example]:
  """Loads instruction data as a list of :class:`Example`.

  ``source``: a local JSON/JSONL file (read as split ``split``) or folder of them (splits
  from file names, as ``datasets`` infers them), a hub dataset name (online only;
  ``"alpaca"`` and ``"oasst1"`` name the reference's data sets), a list of dicts, or a
  ``datasets.Dataset``. Formats, detected from the fields when ``format="auto"``:

  * ``"alpaca"``: ``instruction``, ``output``, optional ``input``; the QLoRA prompts.
  * ``"oasst"``: guanaco ``text`` with ``### Human:`` / ``### Assistant:`` turns; one
    example per assistant turn (:func:`oasst_examples`).
  * ``"chat"``: ``messages`` = ``[{role, content}, ...]``; one example per assistant
    message, rendered with ``tokenizer``'s chat template if it has one, else with
    :func:`render_chat_fallback`.
  * ``"prompt"``: ``prompt`` and ``response`` taken verbatim.

  Examples whose response is empty or blank are dropped; ``limit`` keeps the first ones.

  >>> rows = [{"instruction": "Add 2 and 3.", "output": "5"}, {"instruction": "x", "output": " "}]
  >>> [e.response for e in load_examples(rows)]
  ['5']
  """
  if format not in FORMATS:
    raise DataError(f"format must be one of {FORMATS}, got {format!r}")
  if limit is not None and (not is_int(limit) or limit < 1):
    raise DataError(f"limit must be a positive int or None, got {limit!r}")
  ds, where = _load_rows(source, split)
  columns = list(ds.column_names)
  if format == "auto":
    format = _detect(columns, where)
  else:
    missing = [f for f in _FIELDS[format] if f not in columns]
    if missing:
      raise DataError(
          f"{where}: format {format!r} needs fields {list(_FIELDS[format])}, found"
          f" {sorted(columns)}; rename the fields or pick another format"
      )
  examples = []
  for i, row in enumerate(ds):
    for ex in _convert(format, row, tokenizer, f"{where} row {i}"):
      if ex.response.strip():
        examples.append(ex)
    if limit is not None and len(examples) >= limit:
      examples = examples[:limit]
      break
  if not examples:
    what = {"oasst": f"no '{OASST_ASSISTANT}' turn with a non-empty reply",
            "chat": "no assistant message with non-empty content"}.get(format, "all empty")
    raise DataError(
        f"{where}: no examples left after dropping empty responses ({len(ds)} rows,"
        f" format {format!r}: {what}); check the data's contents and format"
    )
  return examples


SYNTHETIC_KINDS = ("add", "copy", "reverse", "recall", "last")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def synthetic_task(
    n: int, *, seed: int = 0, kinds: Sequence[str] = SYNTHETIC_KINDS
) -> list[Example]:
  """The built-in task: ``n`` short examples made in code, the same for the same seed.

  Kinds (each example draws one uniformly):

  * ``add``: ``"12+35="`` -> ``"47"`` (two numbers in 0..99);
  * ``copy``: ``"copy kqz:"`` -> ``"kqz"``; ``reverse``: ``"reverse kqz:"`` -> ``"zqk"``;
    ``last``: ``"last kqz:"`` -> ``"z"`` (3 to 6 lowercase letters);
  * ``recall``: ``"a=4 q=1 m=7 q?"`` -> ``"1"`` (three distinct keys, digit values).

  Every prompt is at most 15 bytes, so with the byte tokenizer BOS + prompt fits the
  reference's ``source_max_len=16`` untruncated; responses are at most 6 bytes. Examples
  are drawn one after another from one generator, so ``synthetic_task(m)`` is a prefix of
  ``synthetic_task(n)`` for m <= n; use another seed for held-out data.

  >>> [(e.prompt, e.response) for e in synthetic_task(3, seed=0, kinds=("add",))]
  [('85+63=', '148'), ('51+26=', '77'), ('30+4=', '34')]
  """
  kinds = tuple(kinds)
  bad = [k for k in kinds if k not in SYNTHETIC_KINDS]
  if bad or not kinds:
    raise DataError(f"kinds must be a non-empty subset of {SYNTHETIC_KINDS}, got {kinds}")
  if not is_int(n) or n < 0:
    raise DataError(f"n must be a non-negative int, got {n!r}")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "add":
      a, b = (int(v) for v in rng.integers(0, 100, size=2))
      out.append(Example(f"{a}+{b}=", str(a + b)))
    elif kind in ("copy", "reverse", "last"):
      word = "".join(rng.choice(list(_LETTERS), size=int(rng.integers(3, 7))))
      answer = {"copy": word, "reverse": word[::-1], "last": word[-1]}[kind]
      out.append(Example(f"{kind} {word}:", answer))
    else:
      keys = rng.choice(list(_LETTERS), size=3, replace=False)
      values = rng.integers(0, 10, size=3)
      query = int(rng.integers(3))
      pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
      out.append(Example(f"{pairs} {keys[query]}?", str(values[query])))
  return out


def synthetic_kind(example: Example) -> str:
  """Which kind of :func:`synthetic_task` ``example`` is.

  >>> [synthetic_kind(e) for e in synthetic_task(4, seed=1)]
  ['reverse', 'last', 'copy', 'last']
  """
  first = example.prompt.split(" ", 1)[0]
  if first in ("copy", "reverse", "last"):
    return first
  return "add" if "+" in example.prompt else "recall"


_INT = re.compile(r"[+-]?\d+")


def exact_match(prediction: str, example: Example) -> bool:
  """Whether ``prediction`` answers ``example``: equal after stripping whitespace; when
  the reference answer is an integer, equal as numbers.

  >>> ex = Example("12+35=", "47")
  >>> exact_match(" 47\\n", ex), exact_match("047", ex), exact_match("48", ex)
  (True, True, False)
  >>> exact_match("zqk", Example("reverse kqz:", "zqk"))
  True
  """
  pred, target = prediction.strip(), example.response.strip()
  if _INT.fullmatch(target):
    return bool(_INT.fullmatch(pred)) and int(pred) == int(target)
  return pred == target
