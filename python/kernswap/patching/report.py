"""PatchReport: what ``kernswap.patch`` swapped, what it skipped and why, and memory before/after."""
import dataclasses
import re
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Tuple

from torch import nn

__all__ = ["PatchReport", "module_memory"]


def module_memory(model: nn.Module) -> int:
    """Bytes of parameters + buffers (each tensor counted once, tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t)
        if t.device.type != "meta":
            try:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            except (RuntimeError, NotImplementedError):
                pass
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _layer_pattern(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.*.mlp.up_proj' (groups repeated layers)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


@dataclasses.dataclass
class PatchReport:
    model_type: Optional[str]
    family: str
    requested: Dict[str, str]
    swapped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, role, kind)
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)
    notes: List[str] = dataclasses.field(default_factory=list)
    memory_before: int = 0
    memory_after: int = 0
    seconds: float = 0.0
    # quantized layer -> relative weight error ||dequant(Wq) - W|| / ||W|| (fused layers under their fused name)
    weight_errors: Dict[str, float] = dataclasses.field(default_factory=dict)

    # ---- summaries -------------------------------------------------------------------------------
    @property
    def counts(self) -> Dict[Tuple[str, str], int]:
        """(role, kind) -> number of modules swapped."""
        return dict(Counter((role, kind) for _, role, kind in self.swapped))

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def count(self, kind_contains: str = "", role: Optional[str] = None) -> int:
        return sum(1 for _, r, k in self.swapped if kind_contains in k and (role is None or r == role))

    @property
    def skipped_by_reason(self) -> Dict[str, List[str]]:
        """reason -> grouped name patterns (layer indices folded into '*')."""
        out: Dict[str, List[str]] = defaultdict(list)
        for name, reason in self.skipped:
            pat = _layer_pattern(name)
            if pat not in out[reason]:
                out[reason].append(pat)
        return dict(out)

    @property
    def memory_saved(self) -> int:
        return self.memory_before - self.memory_after

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type, "family": self.family, "requested": dict(self.requested),
            "swapped": {f"{r}: {k}": c for (r, k), c in sorted(self.counts.items())},
            "skipped": {reason: len([n for n, r in self.skipped if r == reason])
                        for reason in self.skipped_by_reason},
            "notes": list(self.notes), "memory_before": self.memory_before,
            "memory_after": self.memory_after, "seconds": round(self.seconds, 3),
            "weight_errors": dict(self.weight_errors),
        }

    # ---- printing --------------------------------------------------------------------------------
    def __str__(self) -> str:
        req = ", ".join(f"{k}={v}" for k, v in self.requested.items() if v not in (None, "None"))
        lines = [f"kernswap patch report: model_type={self.model_type!r} family={self.family} ({req or 'nothing'})"]
        rows = [(role, kind, str(n)) for (role, kind), n in sorted(self.counts.items())]
        lines += _table(("swapped: role", "kind", "count"), rows or [("-", "nothing swapped", "0")])
        skip_rows = []
        for reason, pats in self.skipped_by_reason.items():
            n = sum(1 for _, r in self.skipped if r == reason)
            shown = ", ".join(pats[:3]) + (f", ... (+{len(pats) - 3})" if len(pats) > 3 else "")
            skip_rows.append((shown, str(n), reason))
        if skip_rows:
            lines += _table(("skipped: modules", "count", "reason"), skip_rows)
        ratio = self.memory_before / self.memory_after if self.memory_after else float("nan")
        lines += _table(("memory (params+buffers)", "value"), [
            ("before", _mib(self.memory_before)), ("after", _mib(self.memory_after)),
            ("ratio", f"{ratio:.2f}x"), ("patch time", f"{self.seconds:.2f} s")])
        if self.weight_errors:
            by: Dict[str, List[float]] = defaultdict(list)
            for name, e in self.weight_errors.items():
                by[_layer_pattern(name)].append(e)
            lines += _table(("weight error: layers", "count", "mean", "max"), [
                (pat, str(len(v)), f"{sum(v) / len(v):.4f}", f"{max(v):.4f}") for pat, v in sorted(by.items())])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PatchReport(family={self.family!r}, swapped={self.num_swapped}, skipped={len(self.skipped)}, "
                f"memory {_mib(self.memory_before)} -> {_mib(self.memory_after)})")


def _table(header, rows) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths[-1] = min(widths[-1], 100)

    def fmt(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    return ["", fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]

