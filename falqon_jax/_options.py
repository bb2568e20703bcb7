"""FALQON's options: the allowed values, one frozen type that checks them, two presets.

:data:`REFERENCE` reproduces the official code; :data:`RECOMMENDED`, the default of every
entry point (``meld``, ``proxy_update``, ``nnx``, ``linen``, ``models.load``, the CLI),
is the setting that kept the most of bf16 LoRA's gain in ``benchmarks/RESULTS.md``.

Example:
  >>> import falqon_jax
  >>> falqon_jax.RECOMMENDED.replace(rank=16).rank
  16
  >>> falqon_jax.FalqonOptions(reset="none")
  Traceback (most recent call last):
  ...
  falqon_jax.errors.UserInputError: reset must be one of ('all', 'merged', 'residual'), got 'none'
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Literal, Optional, Sequence, Union

from falqon_jax.errors import UserInputError

Init = Literal["svd", "random"]
Scaling = Literal["tensor", "row"]
Reset = Literal["all", "merged", "residual"]
Rounding = Literal["nearest", "stochastic"]
Implementation = Union[str, Sequence[str]]

INITS = ("svd", "random")
SCALINGS = ("tensor", "row")
RESETS = ("all", "merged", "residual")
ROUNDINGS = ("nearest", "stochastic")
IMPLEMENTATIONS = ("xla", "pallas")


def _is_int(x) -> bool:
  """A Python or numpy integer (numpy registers them as Integral), not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_implementation(implementation: Implementation) -> Union[str, tuple[str, ...]]:
  """A name, or a non-empty sequence of names tried in order (returned as a tuple)."""
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  if not names:
    raise UserInputError(f"implementation must name at least one of {IMPLEMENTATIONS}")
  for n in names:
    if n not in IMPLEMENTATIONS:
      raise UserInputError(f"implementation must be one of {IMPLEMENTATIONS}, got {n!r}")
  return implementation if isinstance(implementation, str) else names


def _choice(name: str, value, allowed: tuple) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise UserInputError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FalqonOptions:
  """Everything that selects a FALQON variant; constructing one checks every value.

  The field defaults are :data:`RECOMMENDED`'s. Entry points take ``options=`` plus
  keyword overrides of these fields (``meld(params, rank=16, init="random")``).

  Attributes:
    rank: the LoRA rank r of each melded kernel.
    init: how A starts: ``"svd"`` of the quantization error (the reference), or
      ``"random"`` (``Normal(mean W, std W)``, clipped to W's range).
    scaling: one FP8 scale per ``"tensor"`` (the reference) or per ``"row"``.
    top_k: rows merged per kernel per step: an int, ``"all"``, or ``None`` for ``rank``
      rows (what the reference code does).
    topk_warmup_steps: for this many steps merge ``rank`` rows, then ``top_k``.
    reset: ΔBuffer rows zeroed after a merge: ``"all"`` (the reference), ``"merged"``,
      or ``"residual"`` (merged, keeping what the FP8 grid could not hold).
    rounding: ``"nearest"`` (the reference) or ``"stochastic"`` onto the FP8 grid.
    implementation: the merge's ``"xla"`` or ``"pallas"``, or a sequence tried in order.
    seed: with no explicit ``key``, random init and stochastic rounding use
      ``jax.random.key(seed)`` (each layer folds in its own index).
    fused_groups: melding a ``falqon_jax.models`` model keeps the groups that serving
      engines fuse into one GEMM (q/k/v and gate/up of a layer) whole: they share one
      per-tensor scale, so vLLM serves the trained FP8 bytes unchanged, and targets that
      meld part of a group are refused. False (the reference, which has no groups): every
      kernel has its own scale.
    live_delta: the forward and ``dx`` include the pending ΔBuffer (``y = x (W + BA)ᵀ``,
      at the cost of one thin GEMM each way), so updates that wait for a merge still act.
      False (the reference): both ignore it, which is exact only while it is zero.
    merge_every: merge once every this many optimizer steps (1: every step, the
      reference); in between, updates accumulate exactly in the f32 ΔBuffer and reach
      the FP8 rows in one rounding. Needs ``live_delta``.
  """

  rank: int = 64
  init: Init = "svd"
  scaling: Scaling = "tensor"
  top_k: Optional[Union[int, str]] = "all"
  topk_warmup_steps: int = 0
  reset: Reset = "merged"
  rounding: Rounding = "stochastic"
  implementation: Implementation = "xla"
  seed: int = 0
  fused_groups: bool = True
  live_delta: bool = False
  merge_every: int = 1

  def __post_init__(self):
    if not _is_int(self.rank):
      raise TypeError(f"rank must be an int, got {self.rank!r}")
    if self.rank < 1:
      raise UserInputError(f"rank must be a positive int, got {self.rank!r}")
    _choice("init", self.init, INITS)
    _choice("scaling", self.scaling, SCALINGS)
    if self.top_k is not None and self.top_k != "all" and (
        not _is_int(self.top_k) or self.top_k < 1):
      raise UserInputError(f'top_k must be None, "all" or a positive int, got {self.top_k!r}')
    if not _is_int(self.topk_warmup_steps) or self.topk_warmup_steps < 0:
      raise UserInputError(
          f"topk_warmup_steps must be a non-negative int, got {self.topk_warmup_steps!r}")
    _choice("reset", self.reset, RESETS)
    _choice("rounding", self.rounding, ROUNDINGS)
    # jax.random.key keeps 32 bits: 2**32 would silently repeat seed 0.
    if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise UserInputError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
    if not isinstance(self.fused_groups, bool):
      raise TypeError(f"fused_groups must be a bool, got {self.fused_groups!r}")
    if not isinstance(self.live_delta, bool):
      raise TypeError(f"live_delta must be a bool, got {self.live_delta!r}")
    if not _is_int(self.merge_every) or self.merge_every < 1:
      raise UserInputError(f"merge_every must be a positive int, got {self.merge_every!r}")
    if self.merge_every > 1 and not self.live_delta:
      raise UserInputError(
          f"merge_every={self.merge_every} needs live_delta=True: otherwise the forward and dx"
          " ignore the updates that wait for a merge")
    # Python ints (static shapes, hashable), and a tuple for a sequence of implementations.
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("rank", int(self.rank))
    set_("top_k", self.top_k if self.top_k in (None, "all") else int(self.top_k))
    set_("topk_warmup_steps", int(self.topk_warmup_steps))
    set_("seed", int(self.seed))
    set_("merge_every", int(self.merge_every))
    set_("implementation", check_implementation(self.implementation))

  def replace(self, **overrides) -> "FalqonOptions":
    """These options with some fields changed (checked like a new one)."""
    names = [f.name for f in dataclasses.fields(self)]
    for k in overrides:
      if k not in names:
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; options are {tuple(names)}"
        raise TypeError(f"unknown FALQON option {k!r}{hint}")
    return dataclasses.replace(self, **overrides) if overrides else self


def resolve(options: FalqonOptions, overrides: dict) -> FalqonOptions:
  """``options`` with ``overrides`` applied; a non-FalqonOptions is a one-line error."""
  if not isinstance(options, FalqonOptions):
    raise TypeError("options must be a falqon_jax.FalqonOptions (e.g. falqon_jax.RECOMMENDED"
                    f" or falqon_jax.REFERENCE), got {type(options).__name__}")
  return options.replace(**overrides)


RECOMMENDED = FalqonOptions()
"""The best measured setting (``benchmarks/RESULTS.md``): SVD init, every row merged each
step, only merged rows reset, stochastic rounding, fused groups sharing a scale (what vLLM
serves). The default everywhere."""

REFERENCE = FalqonOptions(top_k=None, reset="all", rounding="nearest", fused_groups=False)
"""The official code's semantics: SVD init, per-tensor scale (one per kernel, fused groups
not shared), ``rank`` rows merged per step, the whole ΔBuffer reset, round to nearest,
the XLA merge."""
