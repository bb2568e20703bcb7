#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine lacks into .whl/ (git-ignored), for the
# device tool to carry: `run(carry=[".whl"], command="bash benchmarks/gpu_session.sh ...")`.
#
# The GPU image (Python 3.12, jax 0.11.2, flax, optax, orbax) has transformers 5.x, which
# has no Flax models, with huggingface_hub 1.x and tokenizers 0.23.2, which transformers
# 4.57.6 refuses at import. Everything else the benchmarks need is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2)
rm -rf .whl.partial
mkdir -p .whl.partial
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl.partial "${WHEELS[@]}"
# Replace .whl/ only once every wheel is in: a half download never travels.
rm -rf .whl
mv .whl.partial .whl
ls -l .whl
du -sh .whl
