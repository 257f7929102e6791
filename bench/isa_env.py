"""Forcing one CPU instruction-set tier for a whole benchmark process: kernswap's kernels through
``kernswap._C.set_isa`` and torch's baselines (ATen's vectorised kernels, oneDNN, MKL) through the environment
variables they read when torch is imported. ``apply_env`` must therefore run before the first ``import torch``
(bench/run.py calls it at the top, before it imports the harness); ``apply_kernswap`` after kernswap is imported.
No torch import here."""
import os
from typing import Dict, Optional

# tier -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): the closest setting each library has
TORCH_ENV: Dict[str, tuple] = {
    "scalar": ("default", "SSE41", "SSE4_2"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx_vnni": ("avx2", "AVX2_VNNI", "AVX2"),
    "avx512": ("avx512", "AVX512_CORE", "AVX512"),
    "avx512_vnni": ("avx512", "AVX512_CORE_VNNI", "AVX512_E1"),
    "amx": ("avx512", "AVX512_CORE_AMX", "AVX512_E4"),
}
_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def apply_env(isa: Optional[str]) -> Dict[str, str]:
    """Set torch's variables for tier ``isa`` (None: leave them); returns what was set. Raises on an unknown tier."""
    if not isa:
        return {}
    if isa not in TORCH_ENV:
        raise SystemExit(f"--isa: expected one of {sorted(TORCH_ENV)}, got {isa!r}")
    env = dict(zip(_VARS, TORCH_ENV[isa]))
    os.environ.update(env)
    return env


def apply_kernswap(isa: Optional[str]) -> None:
    """Force kernswap's kernels to tier ``isa`` for this process (a tier above the CPU's raises)."""
    if not isa:
        return
    from kernswap import _ext

    C = _ext.get_C()
    if C is None:
        raise SystemExit(f"--isa {isa}: kernswap._C is not loaded ({_ext.cpu_ext_reason()})")
    try:
        C.set_isa(isa)
    except ValueError as e:
        raise SystemExit(f"--isa {isa}: this CPU cannot run it ({e}); supported: {C.supported_isas()}")


def forced_from_argv(argv) -> Optional[str]:
    """The value of --isa NAME / --isa=NAME in argv, else None (read before argparse, which runs after torch)."""
    for i, arg in enumerate(argv):
        if arg == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--isa="):
            return arg.split("=", 1)[1]
    return None
