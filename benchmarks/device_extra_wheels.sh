#!/usr/bin/env bash
# Downloads the wheels (Python 3.12, x86_64) of dali_kd's dependencies that the lent GPU machine lacks besides DALI
# — pydantic and its run-time needs — into .devwhl/extra (git-ignored), to be carried with benchmarks/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .devwhl/extra && mkdir -p .devwhl/extra
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .devwhl/extra \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions 2> >(grep -v 'is ignored' >&2)
ls -la .devwhl/extra
