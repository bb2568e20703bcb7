"""falqon_jax: fast FP8 LoRA fine-tuning in JAX (FALQON, arXiv 2510.24061).

The public API is re-exported here; the implementation lives in private modules.

>>> import jax, optax, falqon_jax
>>> params = {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (64, 128))}}
>>> params, report = falqon_jax.meld(params, rank=16)   # options=falqon_jax.RECOMMENDED
>>> tx = falqon_jax.proxy_update(optax.adam(2e-3))     # options=falqon_jax.REFERENCE: the paper's code
"""

from falqon_jax import fp8
from falqon_jax._meld import DEFAULT_EXCLUDE, MeldedLayer, MeldReport, SkippedLeaf, meld, unmeld
from falqon_jax._melded_dense import dense, melded_dense
from falqon_jax._melded_kernel import MeldedKernel, is_melded, meld_kernel
from falqon_jax._options import RECOMMENDED, REFERENCE, FalqonOptions
from falqon_jax._merge import merge_top_k, rounding_residual, select_rows
from falqon_jax._merge_step import MergeState, delta_only, merge, merge_init
from falqon_jax._proxy_update import (
    MeldedUpdate,
    ProxyUpdateState,
    apply_updates,
    delta_tree,
    proxy_update,
)
from falqon_jax.errors import UserInputError

__version__ = "0.1.0"

__all__ = [
    "fp8",
    "FalqonOptions",
    "RECOMMENDED",
    "REFERENCE",
    "is_melded",
    "MeldedKernel",
    "MeldedUpdate",
    "MeldReport",
    "MeldedLayer",
    "SkippedLeaf",
    "ProxyUpdateState",
    "DEFAULT_EXCLUDE",
    "meld_kernel",
    "meld",
    "unmeld",
    "melded_dense",
    "dense",
    "merge_top_k",
    "rounding_residual",
    "select_rows",
    "proxy_update",
    "apply_updates",
    "delta_tree",
    "delta_only",
    "merge",
    "merge_init",
    "MergeState",
    "UserInputError",
]
