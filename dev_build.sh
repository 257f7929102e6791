#!/usr/bin/env bash
# Developer build: compiles the extension modules into build/dev and copies them next to the sources,
# so `PYTHONPATH=python` runs the package from the tree. Users install with `pip install .` instead.
set -euo pipefail
cd "$(dirname "$0")"
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DKERNSWAP_CUDA="${KERNSWAP_CUDA:-OFF}" \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build build/dev -j 2
for f in build/dev/_C*.so; do  # copy then rename: a running process keeps its mapped old file
  b=$(basename "$f"); cp "$f" "python/kernswap/.$b.tmp" && mv "python/kernswap/.$b.tmp" "python/kernswap/$b"
done
