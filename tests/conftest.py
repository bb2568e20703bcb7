"""Shared test setup: 4 host CPU devices for data-parallel tests, and oracles."""

import os
import zlib

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test's name: fresh per test, reproducible."""
  seed = zlib.crc32(request.node.nodeid.encode())
  return np.random.default_rng(seed)
