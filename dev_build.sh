#!/usr/bin/env bash
# Developer build: compiles the extension modules into build/dev and copies them next to the sources,
# so `PYTHONPATH=python` runs the package from the tree. Users install with `pip install .` instead.
set -euo pipefail
cd "$(dirname "$0")"
B="${KS_BUILD_DIR:-build/dev}"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKERNSWAP_CUDA="${KERNSWAP_CUDA:-OFF}" \
  -DKERNSWAP_ASAN="${KERNSWAP_ASAN:-OFF}" \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$B" -j 2
for f in "$B"/_C*.so; do  # copy then rename: a running process keeps its mapped old file
  b=$(basename "$f"); cp "$f" "python/kernswap/.$b.tmp" && mv "python/kernswap/.$b.tmp" "python/kernswap/$b"
done
