"""pyproject.toml's dependency ranges admit only (jax, flax) pairs that work together."""

import importlib.metadata
import pathlib
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHONS = ("3.11", "3.12", "3.13", "3.14")

# (jax, flax) pairs that flax's own metadata allows but where `import flax` fails:
# flax 0.12.8 subclasses hijax.MutableHiType (gone in jax 0.11.1), 0.12.9 uses
# hijax.HiPrimitive (gone in jax 0.11.2).
KNOWN_BAD = [(jax, "0.12.8") for jax in ("0.11.1", "0.11.2", "0.12.0", "0.12.0.1")]
KNOWN_BAD += [(jax, "0.12.9") for jax in ("0.11.2", "0.12.0", "0.12.0.1")]
# (python, jax, flax) sets the suite passes on: CI's pinned set, and the GPU machines'.
KNOWN_GOOD = [
    ("3.11", "0.10.2", "0.12.8"),
    ("3.12", "0.11.2", "0.12.12"),
    ("3.12", "0.12.0.1", "0.12.12"),
]


def _project():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _ranges(python, extras=True):
  """{name: [SpecifierSet, ...]} of the requirements whose markers hold on `python`."""
  project = _project()
  lines = list(project["dependencies"])
  if extras:
    lines += [r for extra in project["optional-dependencies"].values() for r in extra]
  env = {"python_version": python, "python_full_version": python + ".0", "extra": ""}
  ranges = {}
  for req in map(Requirement, lines):
    if req.marker is None or req.marker.evaluate(env):
      ranges.setdefault(canonicalize_name(req.name), []).append(req.specifier)
  return ranges


def _admits(ranges, name, version):
  return all(Version(version) in spec for spec in ranges.get(name, []))


@pytest.mark.parametrize("python", PYTHONS)
def test_ranges_exclude_known_bad_pairs(python):
  ranges = _ranges(python)
  admitted = [(jax, flax) for jax, flax in KNOWN_BAD
              if _admits(ranges, "jax", jax) and _admits(ranges, "flax", flax)]
  assert not admitted, f"Python {python}: pyproject admits broken (jax, flax) {admitted}"


@pytest.mark.parametrize("python,jax,flax", KNOWN_GOOD)
def test_ranges_admit_known_good_sets(python, jax, flax):
  ranges = _ranges(python)
  for name, version in (("jax", jax), ("jaxlib", jax), ("flax", flax)):
    assert _admits(ranges, name, version), f"Python {python}: {name} {version} excluded"


def test_ci_constraints_satisfy_ranges():
  # CI installs with -c .ci/constraints.txt on Python 3.11; a pin outside the ranges
  # would make that install fail.
  ranges = _ranges("3.11")
  for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
      continue
    name, version = line.split("==")
    name = canonicalize_name(name)
    assert _admits(ranges, name, version), f"{name}=={version} is outside pyproject's range"


def test_installed_versions_satisfy_ranges():
  # The suite's result speaks for the ranges only if it ran on a set they admit.
  python = "%d.%d" % sys.version_info[:2]
  for name, specs in _ranges(python, extras=False).items():
    version = importlib.metadata.version(name)
    assert all(Version(version) in spec for spec in specs), f"installed {name} {version}"
