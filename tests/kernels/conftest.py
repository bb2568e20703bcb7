import contextlib

import jax
import pytest


@pytest.fixture
def cuda_target():
  """A context that lets Triton kernels lower for CUDA on a machine without a GPU.

  jax >= 0.11 reads the target GPU from the abstract mesh's device (it no longer lowers
  Triton without one); older versions need nothing.
  """
  def target():
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    if abstract_device is None:
      return contextlib.nullcontext()
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), abstract_device=abstract_device("NVIDIA H100", None, "gpu"))
    return jax.sharding.use_abstract_mesh(mesh)
  return target
