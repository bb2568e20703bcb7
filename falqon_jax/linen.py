"""Run unmodified Flax linen models on melded params.

:func:`meld` melds a linen params tree (it also handles kernels stored ``(out, in)``, such
as those of a ``FlaxConv1D``, the dense layer of transformers 4.x's Flax GPT-2). Inside
:func:`melded` (a context manager built on ``flax.linen.intercept_methods``), every
``nn.Dense`` and every module class named ``FlaxConv1D`` whose ``kernel`` is a
:class:`~falqon_jax.MeldedKernel` runs through :func:`~falqon_jax.melded_dense`, bias
included; every other module runs unchanged. The model's code is never edited. (The NNX
models of :mod:`falqon_jax.models` are melded by :func:`falqon_jax.nnx.meld` instead.)

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, falqon_jax
  >>> from falqon_jax import linen as fl
  >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
  >>> params, report = fl.meld(params, rank=16)
  >>> with fl.melded():
  ...   y = model.apply({"params": params}, jnp.ones((4, 32)))
  >>> y.shape
  (4, 32)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from falqon_jax._meld import meld as _core_meld
from falqon_jax._meld import path_str
from falqon_jax._melded_dense import melded_dense
from falqon_jax._melded_kernel import MeldedKernel, is_melded
from falqon_jax._options import RECOMMENDED, FalqonOptions

__all__ = [
    "GPT2_CONV1D",
    "TransposedMeldedKernel",
    "meld",
    "melded",
    "melded_fn",
    "is_melded",
]

GPT2_CONV1D = r"(^|/)(c_attn|q_attn|c_proj|c_fc)/kernel$"
"""Paths of GPT-2's ``FlaxConv1D`` kernels (c_attn, q_attn, c_proj, c_fc), stored ``(out, in)``."""


@dataclasses.dataclass(frozen=True)
class TransposedMeldedKernel(MeldedKernel):
  """A :class:`~falqon_jax.MeldedKernel` standing in for a kernel stored ``(out, in)``.

  GPT-2's ``FlaxConv1D`` keeps its kernel as ``(features, in)``. The melded data are
  exactly those of a ``MeldedKernel`` (``qweight`` is ``(out + rank, in)`` either way);
  only :attr:`shape` and :meth:`backbone` follow the module's ``(out, in)`` layout, so
  ``falqon_jax.unmeld`` gives back a tree the unmodified module can load. The distinct
  type also stops a square ``(out, in)`` kernel melded as ``(in, out)`` from running
  silently transposed.
  """

  @property
  def shape(self) -> tuple[int, int]:
    return (self.out_features, self.in_features)

  def backbone(self, dtype=jnp.float32) -> jax.Array:
    return jnp.swapaxes(super().backbone(dtype), -1, -2)


jax.tree_util.register_dataclass(TransposedMeldedKernel)

Pattern = Union[None, str, "re.Pattern[str]", Callable[[str, Any], bool]]


def _match(pattern: Pattern) -> Callable[[str, Any], bool]:
  if pattern is None:
    return lambda path, leaf: False
  if isinstance(pattern, (str, re.Pattern)):
    compiled = re.compile(pattern)
    return lambda path, leaf: compiled.search(path) is not None
  if callable(pattern):
    return pattern
  raise TypeError(
      f"transposed must be None, a regex or a predicate (path, leaf) -> bool, got {pattern!r}"
  )


def meld(params, rank: Optional[int] = None, *, options: FalqonOptions = RECOMMENDED,
         transposed: Pattern = None, **meld_kwargs):
  """:func:`falqon_jax.meld` for linen params, with ``(out, in)`` kernels handled.

  Args:
    params: a linen params tree.
    rank: the LoRA rank; None: ``options.rank``.
    options: a :class:`~falqon_jax.FalqonOptions` (default
      :data:`~falqon_jax.RECOMMENDED`), as for :func:`falqon_jax.meld`.
    transposed: which kernel paths are stored ``(out, in)``: a regex over the slash-joined
      path, a predicate ``(path, leaf) -> bool``, or ``None`` (all ``(in, out)``). For a
      GPT-2-style model built of ``FlaxConv1D`` pass :data:`GPT2_CONV1D`. Those
      kernels are melded as ``(in, out)`` and come back as
      :class:`TransposedMeldedKernel`; the ones left unmelded keep their layout.
    **meld_kwargs: ``targets``, ``key`` and option overrides (``init``, ``scaling``...),
      as for :func:`falqon_jax.meld`. Report shapes are the ``(in, out)`` kernel shapes.

  Returns:
    ``(melded_params, report)``.
  """
  is_t = _match(transposed)
  flip = set()

  def pre(kpath, leaf):
    path = path_str(kpath)
    if is_t(path, leaf) and getattr(leaf, "ndim", 0) == 2:
      flip.add(path)
      return jnp.swapaxes(leaf, 0, 1)
    return leaf

  params = jax.tree_util.tree_map_with_path(pre, params, is_leaf=is_melded)
  params, report = _core_meld(params, rank, options=options, **meld_kwargs)

  def post(kpath, leaf):
    if path_str(kpath) not in flip:
      return leaf
    if isinstance(leaf, MeldedKernel):
      fields = {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)}
      return TransposedMeldedKernel(**fields)
    return jnp.swapaxes(leaf, 0, 1)

  return jax.tree_util.tree_map_with_path(post, params, is_leaf=is_melded), report


def _module_path(module) -> str:
  return "/".join(module.path) or type(module).__name__


def _first_arg(args, kwargs, name="inputs"):
  if args:
    return args[0], args[1:], kwargs
  kwargs = dict(kwargs)
  if name not in kwargs:
    raise TypeError(f"expected the input as the first argument or {name}=")
  return kwargs.pop(name), (), kwargs


def _bias(module):
  if getattr(module, "use_bias", False) and module.has_variable("params", "bias"):
    return module.get_variable("params", "bias")
  return None


def _run_dense(module: nn.Dense, mk: MeldedKernel, args, kwargs):
  x, rest, extra = _first_arg(args, kwargs)
  if rest or extra:
    raise TypeError(f"nn.Dense at {_module_path(module)} got unexpected arguments")
  if isinstance(mk, TransposedMeldedKernel):
    raise TypeError(
        f"nn.Dense at {_module_path(module)} holds a TransposedMeldedKernel, but Dense"
        " kernels are (in, out): meld it without `transposed`"
    )
  x = jnp.asarray(x)
  bias = _bias(module)
  dtype = module.dtype
  if dtype is None:
    dtype = x.dtype if bias is None else jnp.promote_types(x.dtype, bias.dtype)
  if not jnp.issubdtype(dtype, jnp.floating) or jnp.dtype(dtype).itemsize < 2:
    dtype = jnp.float32
  return melded_dense(x.astype(dtype), mk, bias)


def _run_conv1d(module, mk: MeldedKernel, args, kwargs):
  x, rest, extra = _first_arg(args, kwargs)
  if rest or extra:
    raise TypeError(f"FlaxConv1D at {_module_path(module)} got unexpected arguments")
  if not isinstance(mk, TransposedMeldedKernel):
    raise TypeError(
        f"FlaxConv1D at {_module_path(module)} stores its kernel (out, in) but holds a"
        " plain MeldedKernel melded as (in, out); meld with falqon_jax.linen.meld(params,"
        " rank, transposed=falqon_jax.linen.GPT2_CONV1D)"
    )
  x = jnp.asarray(x, module.dtype)
  return melded_dense(x, mk, _bias(module))


def _is_conv1d(module) -> bool:
  return type(module).__name__ == "FlaxConv1D" and hasattr(module, "features")


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != "__call__" or module.scope is None:
    return next_fun(*args, **kwargs)
  if not module.has_variable("params", "kernel"):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  if not isinstance(kernel, MeldedKernel):
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.Dense):
    return _run_dense(module, kernel, args, kwargs)
  if _is_conv1d(module):
    return _run_conv1d(module, kernel, args, kwargs)
  raise TypeError(
      f"{type(module).__name__} at {_module_path(module)} holds a MeldedKernel, but only"
      " nn.Dense and FlaxConv1D can run melded; exclude it with meld(..., targets=...)"
  )


@contextlib.contextmanager
def melded():
  """Routes melded ``nn.Dense`` / ``FlaxConv1D`` calls to :func:`falqon_jax.melded_dense`.

  Interception happens while linen modules are *traced*, so put the ``with`` inside the
  function you ``jax.jit`` (or use :func:`melded_fn`). Modules whose kernel is a plain
  array are untouched. ``jax.checkpoint`` / ``nn.remat`` work through it: the melded GEMM
  saves only ``Ax`` (N x rank) for its backward, never ``x``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from falqon_jax import linen as fl
    >>> model = nn.Dense(32)
    >>> params, _ = fl.meld(model.init(jax.random.key(0), jnp.ones((1, 64)))["params"], 16)
    >>> with fl.melded():
    ...   model.apply({"params": params}, jnp.ones((2, 64))).shape
    (2, 32)
  """
  with nn.intercept_methods(_interceptor):
    yield


def melded_fn(fn: Callable) -> Callable:
  """Wraps ``fn`` so that it runs inside :func:`melded`; works under ``jax.jit``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from falqon_jax import linen as fl
    >>> model = nn.Dense(32)
    >>> params, _ = fl.meld(model.init(jax.random.key(0), jnp.ones((1, 64)))["params"], 16)
    >>> apply = jax.jit(fl.melded_fn(model.apply))
    >>> apply({"params": params}, jnp.ones((2, 64))).shape
    (2, 32)
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with melded():
      return fn(*args, **kwargs)

  return wrapped
