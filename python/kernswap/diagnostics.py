"""kernswap.info(): what was found on this machine, and which backend `auto` picks."""
import os
import platform
import sys
from typing import Any, Dict, List

import torch

from . import _ext

__all__ = ["info", "format_info"]

# formats reported in the auto-choice table: name -> (bits, group_size, dynamic_act)
_FORMATS = {"int8": (8, None, False), "w8a8": (8, None, True), "int4-g128": (4, 128, False),
            "w4a8-g128": (4, 128, True)}


def _triton_version():
    try:
        import triton

        return getattr(triton, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001
        return None if isinstance(e, ImportError) else f"broken ({type(e).__name__})"


def _cuda() -> Dict[str, Any]:
    out: Dict[str, Any] = {"torch_cuda_version": torch.version.cuda, "available": torch.cuda.is_available()}
    if out["available"]:
        out["device_count"] = torch.cuda.device_count()
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
    else:
        out["reason"] = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
    out["ext_C_cuda"] = _ext.have_cuda_ext()
    if not out["ext_C_cuda"]:
        out["ext_C_cuda_reason"] = _ext.cuda_ext_reason()
    return out


def _op_backends() -> Dict[str, Dict[str, Any]]:
    """Per op other than quantized_linear: each backend's availability and the auto order per device."""
    out: Dict[str, Dict[str, Any]] = {}
    try:
        from .ops._moe_common import MOE_TABLE
        from .ops.block_sparse_attention import TABLE as ATTN_TABLE
    except Exception as e:  # noqa: BLE001 - diagnostics never fail
        return {"error": {"reason": f"{type(e).__name__}: {e}"}}
    for op, table in (("block_sparse_attention", ATTN_TABLE), ("moe (route/align/experts/combine)", MOE_TABLE)):
        avail = {}
        for name in list(table.modules) + ["reference"]:
            ok, reason = table.available(name)
            avail[name] = {"available": ok, "reason": reason}
        out[op] = {"backends": avail, "auto": {d: list(o) + ["reference"] for d, o in table.auto.items()}}
    return out


def info() -> Dict[str, Any]:
    """Versions, compiled modules (and why not), CPU ISA, threads, GPU backends, and the auto choices."""
    from . import __version__
    from .ops.quantized_linear import AUTO_TABLE, auto_backend, backend_available

    backends = {}
    for name in ("cpu", "cuda", "triton", "reference"):
        ok, reason = backend_available(name)
        backends[name] = {"available": ok, "reason": reason}
    auto: Dict[str, Dict[str, Any]] = {}
    for device in ("cpu", "cuda"):
        picks = {}
        for fname, (bits, g, dyn) in _FORMATS.items():
            for m in ((1, 128) if device == "cuda" else (1,)):
                key = fname if device == "cpu" else f"{fname}/M={m}"
                try:
                    pick, skipped = auto_backend(device, bits, g or 256, dyn, m=m)
                except Exception as e:  # noqa: BLE001 - diagnostics never fail
                    pick, skipped = "error", [f"{type(e).__name__}: {e}"]
                picks[key] = {"backend": pick, "skipped": skipped}
        auto[device] = {"order": list(AUTO_TABLE.get(device, ())) + ["reference"], "quantized_linear": picks}
    cuda = _cuda()
    return {
        "fallbacks": _fallbacks(auto, cuda["available"]),
        "op_backends": _op_backends(),
        "kernswap": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "triton": _triton_version(),
        "platform": platform.platform(),
        "compiled_cpu_module": {"found": _ext.have_cpu_ext(), "reason": _ext.cpu_ext_reason(),
                                "cpu_isa": _ext.cpu_isa(), "best_isa": _ext.best_isa(),
                                "supported_isas": _ext.supported_isas(), "cpu_features": _ext.cpu_features(),
                                "parallel": _ext.parallel_backend(), "dispatch": _ext.dispatch_report()},
        "threads": {"torch": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "cuda": cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "backends": backends,
        "auto": auto,
    }


def _fallbacks(auto: Dict[str, Any], have_cuda: bool) -> List[str]:
    """Where `auto` runs the pure-PyTorch reference (slower than torch's own ops) on this machine: never silent.
    The CUDA rows only where a GPU is present (without one nothing runs there)."""
    from .patching.api import QUANT_EXPERTS_CUDA_NOTE

    out = []
    if not _ext.have_cpu_ext():
        out.append(f"cpu: auto runs the pure-PyTorch reference of every op, slower than the unpatched model "
                   f"(kernswap._C: {_ext.cpu_ext_reason()})")
    for device in ("cpu", "cuda") if have_cuda else ("cpu",):
        refs = [k for k, p in auto[device]["quantized_linear"].items() if p["backend"] == "reference"]
        if refs and (device == "cuda" or _ext.have_cpu_ext()):
            out.append(f"{device}: quantized_linear runs the pure-PyTorch reference for {', '.join(refs)}")
    if have_cuda:
        out.append(f"cuda: {QUANT_EXPERTS_CUDA_NOTE}")
    return out


def _format_cpu_dispatch(c: Dict[str, Any]) -> List[str]:
    """The CPU features and, per CPU op, its tier and why each higher tier was not taken."""
    feats = c.get("cpu_features") or {}
    if not feats:
        return []
    have = [n for n, ok in feats.items() if ok]
    lines = [f"  CPU features: {' '.join(have) or '-'}   missing: {' '.join(n for n, ok in feats.items() if not ok) or '-'}",
             "  CPU kernels per op (tier in use [tiers compiled]):"]
    for op, r in (c.get("dispatch") or {}).items():
        lines.append(f"    {op:<24} {r['tier']:<12} [{', '.join(r['compiled'])}]")
        lines += [f"      not {tier}: {why}" for tier, why in r["not_taken"].items()]
    return lines


def format_info(d: Dict[str, Any] = None) -> str:
    """Human-readable printout of info()."""
    d = info() if d is None else d
    c = d["compiled_cpu_module"]
    lines = [
        f"kernswap {d['kernswap']}  torch {d['torch']}  python {d['python']}  triton {d['triton'] or 'not installed'}",
        f"platform: {d['platform']}",
        f"compiled CPU module kernswap._C: " + ("found" if c["found"] else f"NOT found ({c['reason']})"),
        f"  CPU ISA in use: {c['cpu_isa'] or '-'}   best: {c.get('best_isa') or '-'}   "
        f"supported: {', '.join(c['supported_isas']) or '-'}",
        *_format_cpu_dispatch(c),
        f"  CPU kernels' threads: {c.get('parallel') or '-'}",
        f"threads: torch={d['threads']['torch']} cpu_count={d['threads']['cpu_count']}",
    ]
    cu = d["cuda"]
    lines.append("CUDA: " + (f"{cu.get('device_name')} (sm_{''.join(map(str, cu['capability']))})"
                             if cu["available"] else f"unavailable ({cu['reason']})"))
    lines.append("  kernswap._C_cuda: " + ("found" if cu["ext_C_cuda"] else f"not found ({cu['ext_C_cuda_reason']})"))
    lines.append(f"TRITON_INTERPRET={int(d['triton_interpret'])}")
    lines.append("backends:")
    for name, b in d["backends"].items():
        lines.append(f"  {name:<10} " + ("available" if b["available"] else f"unavailable: {b['reason']}"))
    lines.append("auto choice for quantized_linear:")
    for device, a in d["auto"].items():
        lines.append(f"  on {device} (order: {' > '.join(a['order'])}):")
        skipped = []
        for key, p in a["quantized_linear"].items():
            lines.append(f"    {key:<16} -> {p['backend']}")
            skipped += [s for s in p["skipped"] if s not in skipped]
        lines += [f"    skipped {s}" for s in skipped]
    fb = d.get("fallbacks") or []
    lines.append("auto falls back to the pure-PyTorch reference: " + ("nowhere on this machine" if not fb else ""))
    lines += [f"  {f}" for f in fb]
    for op, o in d.get("op_backends", {}).items():
        if "backends" not in o:
            lines.append(f"{op}: {o.get('reason')}")
            continue
        order = "; ".join(f"{dev}: {' > '.join(names)}" for dev, names in o["auto"].items())
        lines.append(f"{op} (auto order {order}):")
        for name, b in o["backends"].items():
            lines.append(f"  {name:<10} " + ("available" if b["available"] else f"unavailable: {b['reason']}"))
    return "\n".join(lines)
