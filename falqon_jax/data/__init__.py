"""Data for fine-tuning: tokenizers, instruction examples, masked and bucketed batches.

The pieces, in the order a trainer uses them::

  tok = load_tokenizer(None)               # byte-level default, or a local HF folder
  examples = synthetic_task(2000, seed=0)  # or load_examples("data.jsonl", tokenizer=tok)
  batches = Batches(examples, batch_size=16, tokenizer=tok, seed=0)
  batch = next(batches)                    # numpy dict, fixed shapes from a few buckets
  saved = batches.state()                  # JSON-able; Batches(..., state=saved) resumes

The loss covers the response and its EOS only (``loss_mask``; pads masked, unlike the
reference); see :mod:`falqon_jax.data._batches` for the shift convention. Only the
synthetic task, the byte tokenizer and ``Batches`` work without the ``[hf]`` extra;
``datasets`` / ``transformers`` are imported when a file, hub dataset or HF tokenizer is
loaded.

>>> from falqon_jax.data import Batches, synthetic_task, exact_match
>>> batch = next(Batches(synthetic_task(32), batch_size=4))
>>> sorted(batch), batch["input_ids"].dtype.name
(['attention_mask', 'input_ids', 'loss_mask', 'position_ids', 'segment_ids'], 'int32')
"""

from falqon_jax.data._batches import (
    Batches,
    default_buckets,
    encode_prompt,
    segment_mask,
    tokenize_example,
    tokenize_examples,
)
from falqon_jax.data._examples import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    DATASET_ALIASES,
    FORMATS,
    SYNTHETIC_KINDS,
    Example,
    alpaca_prompt,
    chat_examples,
    exact_match,
    load_examples,
    oasst_examples,
    render_chat_fallback,
    synthetic_kind,
    synthetic_task,
)
from falqon_jax.data._tokenizer import (ByteTokenizer, DataError, HFTokenizer,
                                        check_vocabulary, load_tokenizer)

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "DATASET_ALIASES",
    "FORMATS",
    "SYNTHETIC_KINDS",
    "Batches",
    "ByteTokenizer",
    "DataError",
    "Example",
    "HFTokenizer",
    "alpaca_prompt",
    "check_vocabulary",
    "chat_examples",
    "default_buckets",
    "encode_prompt",
    "exact_match",
    "load_examples",
    "load_tokenizer",
    "oasst_examples",
    "render_chat_fallback",
    "segment_mask",
    "synthetic_kind",
    "synthetic_task",
    "tokenize_example",
    "tokenize_examples",
]
