"""The CPU kernels build off x86: a cross build for aarch64 (scalar tier only) with Debian's cross compiler.

Compiles every portable csrc/cpu/*.cpp (the *_avx*.cpp tier files must be left out) through CMake's kernels-only
target (no Python, no pybind11) and links them into a shared library that may leave no symbol undefined, then
checks that the objects are aarch64 code. Skips when `aarch64-linux-gnu-g++` is not installed.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = "aarch64-linux-gnu-g++"
EM_AARCH64 = 183  # ELF e_machine

needs_cross = pytest.mark.skipif(
    shutil.which(CXX) is None,
    reason=f"{CXX} not found: apt-get install g++-aarch64-linux-gnu (Debian/Ubuntu) to run the aarch64 cross build")
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")


def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


@needs_cmake
@needs_cross
def test_aarch64_cross_build(tmp_path):
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), *gen, "-DCMAKE_BUILD_TYPE=Release",
                 "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={CXX}",
                 "-DKERNSWAP_KERNELS_ONLY=ON", "-DKERNSWAP_CUDA=OFF"]
    env = {k: v for k, v in os.environ.items() if k not in ("CXXFLAGS", "CPPFLAGS", "LDFLAGS")}
    r = subprocess.run(configure, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scalar tier only" in r.stdout
    r = subprocess.run(["cmake", "--build", str(tmp_path), "-j", str(max(2, os.cpu_count() or 2))],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-8000:]
    assert "warning:" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-8000:]

    objs = sorted(tmp_path.rglob("*.o"))
    names = {o.name.split(".")[0] for o in objs}
    portable = {p.stem for p in (ROOT / "csrc" / "cpu").glob("*.cpp") if "_avx" not in p.stem}
    assert names == portable, f"built {sorted(names)}, expected the portable files {sorted(portable)}"
    for o in objs:
        assert _elf_machine(o) == EM_AARCH64, f"{o.name} is not aarch64 code"
    libs = list(tmp_path.glob("libkernswap_cpu_check.so"))
    assert libs and _elf_machine(libs[0]) == EM_AARCH64
