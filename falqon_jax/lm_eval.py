"""lm-evaluation-harness adapter: a falqon_jax model as an lm-eval ``LM`` named ``falqon_jax``.

``falqon_jax.lm_eval.LMEvalModel`` (this module's class, built on first use so that importing
falqon_jax never needs lm-eval) scores with :func:`falqon_jax.eval.loglikelihoods` and
generates with :func:`falqon_jax.eval.generate_ids` (KV cache, greedy unless a task samples):

* ``loglikelihood``: ``(sum of the continuation's log-probabilities, is_greedy)``, with
  lm-eval's tokenization (context and continuation encoded together, trailing spaces of
  the context moved to the continuation, an empty context replaced by BOS, or EOS when
  the tokenizer has no BOS) and its left truncation to ``max_length``;
* ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_length`` tokens, each
  token predicted once, the first from BOS (or EOS);
* ``generate_until``: greedy or sampled (``do_sample``, ``temperature``, ``top_k``) up to
  EOS or ``max_gen_toks`` tokens, the text cut before the first ``until`` string; prompts
  keep their last ``max_length - max_gen_toks`` tokens. Stop strings cut the text after
  generation, so a task with a short answer and a large ``max_gen_toks`` decodes them all.

The prompt gets BOS when ``add_bos_token`` (default: as the HF tokenizer's own default,
which lm-eval's ``hf`` backend follows; with the byte tokenizer, yes). A melded model's
scores shift slightly with ``batch_size`` (one FP8 activation scale per batch; see
:mod:`falqon_jax.eval`).

Registration: lm-eval 0.4.13 finds models only in its own registry, so
``falqon-jax-lm-eval`` (or ``python -m falqon_jax.lm_eval``) registers ``falqon_jax``
and runs lm-eval's command line with the arguments given. lm-eval releases that read the
``lm_eval.models`` entry-point group (declared in pyproject.toml) also take
``lm_eval --model falqon_jax`` directly.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from falqon_jax import eval as fe
from falqon_jax.errors import UserInputError

NAME = "falqon_jax"
_INSTALL = 'lm-eval is not installed: pip install "falqon-jax[lm-eval]"'
_ARGS = "pretrained, batch_size, max_length, max_gen_toks, add_bos_token, device, max_batch_size"
_SAMPLING_ONLY = ("top_k", "top_p", "min_p")  # ignored by greedy decoding


def _positive_int(value, name: str) -> int:
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserInputError(f"{name} must be a positive int, got {value!r}")
  return value


def _default_add_bos(tokenizer) -> bool:
  """An HF tokenizer's own default (lm-eval's ``hf`` backend keeps it); else True when
  there is a BOS id (the byte tokenizer), as falqon_jax.eval's ``add_bos``."""
  hf = getattr(tokenizer, "hf", None)
  if hf is not None:
    if hf.bos_token_id is None:
      return False
    ids = hf.encode("a")
    return bool(ids) and ids[0] == hf.bos_token_id
  return tokenizer.bos_id is not None


class _Adapter:
  """A falqon_jax model as an lm-eval ``LM``, registered as ``falqon_jax``.

  From lm-eval: ``--model falqon_jax --model_args pretrained=FOLDER[,max_length=N,
  max_gen_toks=N,add_bos_token=BOOL] --batch_size N``. FOLDER is an HF model folder
  (e.g. an export) or a ``falqon-jax finetune`` run folder (its latest checkpoint), loaded
  as ``falqon-jax eval`` does. In Python: ``LMEvalModel.from_model(model, params, tokenizer)``.

  Args:
    pretrained: the folder.
    batch_size: rows per forward (an int; lm-eval's ``auto`` is not supported).
    max_length: tokens the model reads at once (default and cap: its positions).
    max_gen_toks: default generation length, when a task sets none.
    add_bos_token: prepend BOS to encoded text; None follows the tokenizer (see above).
    device, max_batch_size: accepted for lm-eval's command line; JAX places the model
      on its default device.
  """

  def __init__(self, pretrained: Optional[str] = None, batch_size=8, max_length=None,
               max_gen_toks=256, add_bos_token: Optional[bool] = None, device=None,
               max_batch_size=None, _loaded=None, **unknown):
    super().__init__()
    if unknown:
      raise UserInputError(
          f"unknown falqon_jax model_args {', '.join(sorted(unknown))}; it takes {_ARGS}")
    if _loaded is None:
      if not pretrained:
        raise UserInputError("falqon_jax needs model_args pretrained=FOLDER (an HF model"
                             " folder or a falqon-jax run folder)")
      from falqon_jax import cli

      _loaded = cli.load_for_inference(str(pretrained))[:3]
    self.model, self.params, self.tokenizer = _loaded
    fe._check_tokenizer(self.model, self.tokenizer)
    if str(batch_size).startswith("auto"):
      raise UserInputError(f"batch_size={batch_size} is not supported; pass an int")
    self.batch_size = _positive_int(batch_size, "batch_size")
    positions = int(self.model.config.max_position_embeddings)
    max_length = positions if max_length is None else _positive_int(max_length, "max_length")
    if max_length > positions:
      raise UserInputError(f"max_length={max_length} exceeds the model's {positions}"
                           " positions; lower it")
    self._max_length = max_length
    self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
    if add_bos_token is not None and not isinstance(add_bos_token, bool):
      raise UserInputError(f"add_bos_token must be true or false, got {add_bos_token!r}")
    self.add_bos_token = (_default_add_bos(self.tokenizer) if add_bos_token is None
                          else add_bos_token)
    # Text that already starts with BOS (a chat template's) gets no second one.
    self._bos_text = getattr(getattr(self.tokenizer, "hf", None), "bos_token", None)

  @classmethod
  def from_model(cls, model, params, tokenizer, **options):
    """The adapter over a loaded model: a :class:`falqon_jax.models.Functional`, its params
    (melded or not) and a tokenizer as falqon_jax.eval takes; ``options`` as the class.

    Example:
      >>> import lm_eval  # doctest: +SKIP
      >>> lm = falqon_jax.lm_eval.LMEvalModel.from_model(model, params, tok)  # doctest: +SKIP
      >>> lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])  # doctest: +SKIP
    """
    return cls(_loaded=(model, params, tokenizer), **options)

  # lm-eval's TemplateLM interface ------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_id
    return self.eot_token_id if bos is None else int(bos)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__))

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    add_bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
    if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
      add_bos = False
    return list(self.tokenizer.encode(string, add_bos=add_bos, add_eos=False))

  def _scores(self, pairs) -> list[tuple[float, bool]]:
    return fe.loglikelihoods(self.model, self.params, self.tokenizer, pairs,
                             batch_size=self.batch_size, max_len=self.max_length)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    results = self._scores([(context, continuation) for _, context, continuation in requests])
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    from lm_eval import utils

    pairs, owner = [], []
    for i, request in enumerate(requests):
      tokens = self.tok_encode(request.args[0], add_special_tokens=False)
      for window in utils.get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1):
        pairs.append(utils.make_disjoint_window(window))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (score, _) in zip(owner, self._scores(pairs) if pairs else []):
      totals[i] += score
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def _generation(self, gen_kwargs: dict) -> tuple[list[str], dict]:
    """``(until, generate_ids keywords)`` from a task's generation kwargs."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
    until = [u for u in kwargs.pop("until") if u]
    if not all(isinstance(u, str) for u in until):
      raise UserInputError(f"until must be a string or a list of strings, got {until!r}")
    max_new = _positive_int(kwargs.pop("max_gen_toks"), "max_gen_toks")
    if max_new >= self.max_length:
      raise UserInputError(f"max_gen_toks={max_new} leaves no room for a prompt in"
                           f" max_length={self.max_length}; lower max_gen_toks")
    sample = bool(kwargs.pop("do_sample"))
    temperature, top_k = float(kwargs.pop("temperature", 0.0)), kwargs.pop("top_k", None)
    if not sample:  # greedy decoding ignores the sampling knobs
      temperature, top_k = 0.0, None
      for key in _SAMPLING_ONLY:
        kwargs.pop(key, None)
    elif kwargs.get("top_p") == 1:  # keeps every token: plain sampling
      kwargs.pop("top_p")
    if kwargs:
      raise UserInputError(
          f"unsupported generation kwargs {', '.join(sorted(kwargs))}; falqon_jax takes"
          " until, max_gen_toks, do_sample, temperature and top_k")
    return until, dict(max_new_tokens=max_new, temperature=temperature,
                       top_k=None if top_k is None else int(top_k))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from lm_eval.models.utils import postprocess_generated_text

    groups: dict = {}  # one generate_ids call per distinct set of generation kwargs
    for i, request in enumerate(requests):
      key = json.dumps(request.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(i)
    out: list = [None] * len(requests)
    for members in groups.values():
      until, options = self._generation(requests[members[0]].args[1])
      room = self.max_length - options["max_new_tokens"]
      prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in members]
      new = fe.generate_ids(self.model, self.params, self.tokenizer, prompts,
                            batch_size=self.batch_size, **options)
      for i, ids in zip(members, new):
        text = postprocess_generated_text(self.tokenizer.decode(ids), until, None)
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    if not hasattr(self.tokenizer, "apply_chat_template"):
      raise UserInputError(f"{self.tokenizer_name} has no chat template; drop"
                           " --apply_chat_template")
    return self.tokenizer.apply_chat_template(chat_history,
                                              add_generation_prompt=add_generation_prompt)

  def chat_template(self, chat_template=False) -> Optional[str]:
    return getattr(self.tokenizer, "chat_template", None) if chat_template else None


def _lm_eval_class():
  """The adapter as an lm-eval ``TemplateLM``, registered as ``falqon_jax``."""
  try:
    from lm_eval.api import registry
    from lm_eval.api.model import TemplateLM
    # get_model loads the built-in names only into an empty registry: load them first.
    import lm_eval.models  # noqa: F401
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] == "lm_eval":
      raise ImportError(_INSTALL) from None
    raise
  cls = type("LMEvalModel", (_Adapter, TemplateLM),
             {"__doc__": _Adapter.__doc__, "__module__": __name__})
  if NAME not in registry.model_registry:  # lm-eval's entry-point loading may hold it
    registry.register_model(NAME)(cls)
  return cls


def __getattr__(name):
  if name == "LMEvalModel":
    cls = globals()["LMEvalModel"] = _lm_eval_class()
    return cls
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv=None) -> int:
  """``falqon-jax-lm-eval``: lm-eval's command line, with ``--model falqon_jax`` available.

  Example:
    falqon-jax-lm-eval --model falqon_jax --model_args pretrained=out/fp8 --tasks hellaswag
  """
  from falqon_jax import cli

  try:
    getattr(sys.modules[__name__], "LMEvalModel")  # registers falqon_jax
  except ImportError as e:
    if str(e) != _INSTALL:
      raise
    print(f"falqon-jax-lm-eval: error: {e}", file=sys.stderr)
    return 2
  from lm_eval.__main__ import cli_evaluate

  if argv is not None:
    sys.argv = ["lm-eval", *argv]
  try:
    cli_evaluate()
  except cli.user_errors() as e:
    print(f"falqon-jax-lm-eval: error: {cli._one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from falqon_jax.lm_eval import main as _main  # the module's own copy, not __main__'s

  sys.exit(_main())
