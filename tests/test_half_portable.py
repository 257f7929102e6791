"""The portable fp16 <-> fp32 conversions (csrc/cpu/half.h, used where the compiler has no _Float16, e.g. on
aarch64 with g++ 12) give the same bits as the compiler's _Float16 on x86 (NaN: any quiet NaN)."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found (apt-get install g++)")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the _Float16 reference is checked on x86")
def test_portable_half_matches_float16(tmp_path):
    exe = tmp_path / "half_check"
    src = ROOT / "tests" / "cpp" / "half_portable_check.cpp"
    r = subprocess.run(["g++", "-O2", "-std=c++17", "-DKS_PORTABLE_HALF", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "0 mismatches" in r.stdout, r.stdout
