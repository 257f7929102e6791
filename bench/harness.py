"""Shared benchmark harness: verify first, then time; hot and cold weights; machine-readable rows.

A suite describes each implementation as an :class:`Impl` (build its weights once, clone them for the
cold rotation, call it, and say what it should be compared against) and hands a list of them, a list of
inputs and a :class:`Context` to :func:`bench_impls`. Every row carries the device, the versions and the
git sha, so a row copied out of its file still says where it came from.

- hot:  the same weights every call (they stay in the caches once touched).
- cold: the impl's own set of weight copies, created once and freed afterwards, whose total size is at
  least ``cold_factor`` x the last-level cache; calls rotate through them, so every call streams its weights
  from DRAM.
- Timing: per-call wall time (``time.perf_counter``) after warm-up; p20/p50/p80 of the samples, the median is
  the headline. The number of samples adapts to the call time (``max_time`` per row, between
  ``min_repeats`` and ``repeats`` samples; 3 for calls slower than max_time/min_repeats, 1 above
  ``slow_call`` seconds).
- Verification: before timing, each output is compared with the impl's oracle (relative Frobenius error
  <= tolerance). A row that fails verification is recorded with status "wrong" and not timed.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_L3_BYTES = 260 * 2**20  # the machine of issue 2; detected from sysfs when possible
COLD_IMPLS = 16  # implementations of one case alive at once in the round robin (the quantized-linear suite's ~14)


# ----------------------------------------------------------------------------------------------- context
@dataclasses.dataclass
class Context:
    threads: int = 2
    quick: bool = False
    full: bool = False
    warmup_time: float = 0.05   # seconds of warm-up calls per row (at least one call)
    max_time: float = 0.4       # seconds of timed calls per row (soft bound)
    repeats: int = 50           # most samples per row
    min_repeats: int = 5        # fewest samples per row (1 when a single call takes > slow_call)
    slow_call: float = 2.0
    cold_factor: float = 2.0    # cold footprint >= cold_factor x L3 ...
    cold_ram_share: float = 0.4  # ... unless every impl of a case (up to COLD_IMPLS) would then need more than this
                                 # share of the available RAM: then >= max(1.05 x L3, the share / COLD_IMPLS)
    l3_bytes: int = DEFAULT_L3_BYTES
    bandwidth_bytes: int = 2**30
    bandwidth: Optional[Dict[str, Any]] = None  # filled by measure_bandwidth
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)
    verbose: bool = True
    rounds: int = 3             # bench_impls: each case times its impls round robin in this many rounds
    forced_isa: Optional[str] = None  # --isa: the tier kernswap and torch were forced to (None: each picks its best)
    torch_isa_env: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def dram_gbps(self) -> Optional[float]:
        return None if not self.bandwidth else self.bandwidth.get("gbps")

    def log(self, *a: Any) -> None:
        if self.verbose:
            print(*a, file=sys.stderr, flush=True)


def l3_bytes_detected() -> int:
    """Largest cache size the kernel reports (sysfs), else the 260 MiB of the reference machine."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return best or DEFAULT_L3_BYTES


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    want = ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx512f", "avx2", "avx_vnni", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def vnni_class(isa: Any) -> bool:
    """Whether a row's kernswap tier ("cpu (amx)", "cpu (avx512_vnni)", ...) is one of the VNNI-class tiers whose
    targets are the AVX-512 VNNI machine's (amx runs avx512_vnni's engine wherever it has no tile path)."""
    return any(t in str(isa or "") for t in ("avx512_vnni", "amx"))


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def kernswap_info() -> Dict[str, Any]:
    """kernswap version and which CPU backend ``auto`` can use (compiled module and ISA, or reference)."""
    out: Dict[str, Any] = {"version": "not importable", "cpu_backend": "unavailable"}
    try:
        import kernswap
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    ver = getattr(kernswap, "__version__", None)
    if ver is None:
        try:
            from importlib.metadata import version
            ver = version("kernswap")
        except Exception:  # noqa: BLE001
            ver = "unknown"
    out["version"] = str(ver)
    try:
        from kernswap import _C  # type: ignore[attr-defined]
        out["cpu_backend"] = f"cpu ({_C.cpu_isa()})"
    except Exception as e:  # noqa: BLE001
        out["cpu_backend"] = "reference"
        out["cpu_module"] = f"kernswap._C not loaded: {type(e).__name__}: {e}"
    return out


def device_description(threads: int) -> Dict[str, Any]:
    return {
        "kind": "cpu",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "isa_flags": cpu_flags(),
        "l3_bytes": l3_bytes_detected(),
        "machine": platform.machine(),
    }


def machine_name(ctx: Context) -> str:
    """Short slug naming the machine for result file names, e.g. 'xeon-2c-2t'."""
    model = cpu_model().lower()
    for junk in ("(r)", "(tm)", "cpu", "processor", "@"):
        model = model.replace(junk, " ")
    words = [w for w in model.replace("-", " ").split() if w and not w.endswith("ghz") and w != "intel"]
    slug = "-".join(words[:3]) or "cpu"
    if "amd" in words and "avx512f" in cpu_flags():  # the EPYCs lent here are AVX2-only or AVX-512 (Zen 4)
        slug += "-avx512"
    return f"{slug}-{os.cpu_count()}c-{ctx.threads}t"


def make_context(threads: int = 2, quick: bool = False, full: bool = False, **kw: Any) -> Context:
    torch.set_num_threads(threads)
    ctx = Context(threads=threads, quick=quick, full=full, **kw)
    if quick:
        ctx.warmup_time, ctx.max_time, ctx.repeats, ctx.min_repeats = 0.005, 0.02, 10, 3
        ctx.l3_bytes, ctx.bandwidth_bytes = 2 * 2**20, 64 * 2**20
    else:
        ctx.l3_bytes = kw.get("l3_bytes") or l3_bytes_detected()
    ks = kernswap_info()
    ctx.meta = {
        "device": device_description(threads),
        "torch": torch.__version__,
        "kernswap": ks["version"],
        "kernswap_cpu_backend": ks["cpu_backend"],
        "kernswap_detail": {k: v for k, v in ks.items() if k not in ("version", "cpu_backend")},
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
        "quick": quick,
        "full": full,
        "forced_isa": ctx.forced_isa,
        "torch_isa_env": ctx.torch_isa_env,
        "cold_bytes_min": int(cold_bytes(ctx)),
    }
    return ctx


def _available_ram() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cold_bytes(ctx: Context) -> float:
    """The weight bytes one implementation rotates through in a cold case: cold_factor x L3, less where the round
    robin's COLD_IMPLS sets would not fit in cold_ram_share of the RAM (a 480 MiB L3 asks ~1 GB per impl), never
    less than 1.05 x L3 (a cyclic rotation through more than the cache misses it on every call)."""
    want = ctx.cold_factor * ctx.l3_bytes
    ram = _available_ram()
    if ram is None:
        return want
    return max(1.05 * ctx.l3_bytes, min(want, ctx.cold_ram_share * ram / COLD_IMPLS))


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(ctx: Context, repeats: int = 7) -> Dict[str, Any]:
    """STREAM-style read bandwidth: torch.sum over a >= 1 GiB fp32 tensor with ctx.threads threads.

    Reports the best of ``repeats`` runs as ``gbps`` (STREAM's convention; it makes the roofline the
    strictest) and the median as ``gbps_median``.
    """
    n = ctx.bandwidth_bytes // 4
    t = torch.empty(n, dtype=torch.float32)
    t.fill_(1.0)  # touch every page before timing
    t.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    del t
    gc.collect()
    times.sort()
    bw = {
        "method": f"torch.sum over {ctx.bandwidth_bytes / 2**30:.2f} GiB fp32, {ctx.threads} threads, "
                  f"best of {repeats}",
        "bytes": ctx.bandwidth_bytes,
        "gbps": ctx.bandwidth_bytes / times[0] / 1e9,
        "gbps_median": ctx.bandwidth_bytes / times[len(times) // 2] / 1e9,
    }
    ctx.bandwidth = bw
    ctx.meta["bandwidth"] = bw
    return bw


# ------------------------------------------------------------------------------------------------ timing
def percentiles(samples: Sequence[float]) -> Dict[str, float]:
    s = sorted(samples)

    def q(p: float) -> float:  # linear interpolation, numpy's default
        if len(s) == 1:
            return s[0]
        x = p * (len(s) - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"p20": q(0.2), "p50": q(0.5), "p80": q(0.8)}


def time_calls(ctx: Context, calls: Sequence[Callable[[], Any]], first_call_s: float, warm: bool = True) -> List[float]:
    """Time ``calls`` in rotation (one call = one sample). ``first_call_s`` is a rough cost estimate; ``warm``:
    warm up first (a later round of the same calls needs none)."""
    est = max(first_call_s, 1e-6)
    # the verification call already warmed the code path up: slow calls get no further warm-up
    n_warm = min(len(calls), int(ctx.warmup_time / est)) if warm else 0
    if len(calls) > 1:  # cold: never re-touch a copy shortly before its timed call
        n_warm = min(n_warm, len(calls) // 2)
    idx = 1 if len(calls) > 1 else 0  # cold: copy 0 was just used by the verification call
    for _ in range(n_warm):
        calls[idx % len(calls)]()
        idx += 1
    lo = 1 if est > ctx.slow_call else (min(3, ctx.min_repeats) if est > ctx.max_time / ctx.min_repeats else ctx.min_repeats)
    n = int(max(lo, min(ctx.repeats, ctx.max_time / est)))
    samples = []
    for _ in range(n):
        f = calls[idx % len(calls)]
        t0 = time.perf_counter()
        f()
        samples.append(time.perf_counter() - t0)
        idx += 1
    return samples


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64; inf when shapes differ or y has non-finite values ref lacks."""
    if tuple(y.shape) != tuple(ref.shape):
        return float("inf")
    y64, r64 = y.detach().double(), ref.detach().double()
    if not torch.isfinite(y64).all() and torch.isfinite(r64).all():
        return float("inf")
    den = r64.norm().item()
    return (y64 - r64).norm().item() / (den if den > 0 else 1.0)


# -------------------------------------------------------------------------------------------- impl model
@dataclasses.dataclass
class Impl:
    """One implementation of an op, as a suite describes it.

    build() -> state            prepares weights once (quantize / pack); raises => row 'unavailable'
    call(state, x) -> Tensor    the timed call
    clone(state) -> state       an independent copy of the weights (for the cold rotation)
    oracle(state, x) -> Tensor  what call() must match (the kernswap reference, or a float product)
    tol                         max relative Frobenius error vs the oracle
    weight_bytes(state) -> int  bytes of weights one call streams (for the roofline)
    enter()                     run before build (e.g. select a quantized engine); None = nothing
    skip(shape, x) -> str|None  reason to skip a case (e.g. known >1 s calls outside --full)
    """

    name: str
    backend: str
    dtype: torch.dtype
    build: Callable[[], Any]
    call: Callable[[Any, torch.Tensor], torch.Tensor]
    clone: Callable[[Any], Any]
    oracle: Callable[[Any, torch.Tensor], torch.Tensor]
    tol: float
    weight_bytes: Callable[[Any], int]
    enter: Optional[Callable[[], None]] = None
    skip: Optional[Callable[[Dict[str, int], str], Optional[str]]] = None
    fmt: str = ""


@dataclasses.dataclass
class Case:
    """One input: shape dict (e.g. M, N, K), mode ('hot' | 'cold') and the fp32 activations (cast to each
    impl's dtype)."""

    shape: Dict[str, int]
    mode: str
    x: torch.Tensor
    flops: Optional[float] = None
    check_rows: Optional[torch.Tensor] = None  # verify only these rows of x / y (row-wise ops, large M)


def base_row(ctx: Context, op: str, impl: Impl, case: Case) -> Dict[str, Any]:
    row: Dict[str, Any] = {"op": op, "impl": impl.name, "backend": impl.backend, "format": impl.fmt}
    row.update(case.shape)
    row.update({"dtype": str(impl.dtype).replace("torch.", ""), "mode": case.mode, "status": "ok",
                "p20": None, "p50": None, "p80": None, "samples": 0, "rel_err": None,
                "baseline": None, "ratio": None, "roofline_frac": None, "weight_bytes": None,
                "gops": None, "note": "",
                "device": "{cpu}, {cores} cores, {threads} threads".format(**ctx.meta["device"]),
                "kernswap": ctx.meta["kernswap"], "torch": ctx.meta["torch"],
                "git_sha": ctx.meta["git_sha"], "isa": ctx.meta["kernswap_cpu_backend"],
                "forced_isa": ctx.forced_isa})
    return row


def bench_impls(ctx: Context, op: str, impls: Sequence[Impl], cases: Sequence[Case]) -> List[Dict[str, Any]]:
    """Run every impl on every case. Each impl is built once and verified on every case first; then each case
    times its impls round robin (ctx.rounds rounds, each impl a share of its time budget per round), so load that
    drifts during the run (a shared machine) hits every impl of a case alike and their ratios stay paired."""
    preps = [_prepare_impl(ctx, op, impl, cases) for impl in impls]
    rctx = dataclasses.replace(ctx, max_time=ctx.max_time / ctx.rounds, repeats=max(1, ctx.repeats // ctx.rounds),
                               min_repeats=max(1, ctx.min_repeats // ctx.rounds))
    for ci, case in enumerate(cases):
        live = [p for p in preps if ci in p.calls]
        samples: Dict[int, List[float]] = {id(p): [] for p in live}
        for rnd in range(ctx.rounds):
            for p in live:
                calls, first = p.calls[ci]
                try:
                    if p.impl.enter is not None:
                        p.impl.enter()
                    samples[id(p)] += time_calls(rctx if rnd else dataclasses.replace(rctx, warmup_time=ctx.warmup_time),
                                                 calls, first, warm=rnd == 0)
                except Exception as e:  # noqa: BLE001
                    p.rows[ci].update(status="error", note=_short(e))
                    p.calls.pop(ci)
                    break
        for p in live:
            row = p.rows[ci]
            if row["status"] != "ok" or not samples[id(p)]:
                continue
            row.update(percentiles(samples[id(p)]))
            row["samples"] = len(samples[id(p)])
            if case.flops:
                row["gops"] = case.flops / row["p50"] / 1e9
            ctx.log(f"  {p.impl.name:<28} {_fmt_shape(case.shape)} {case.mode:<4} p50={row['p50'] * 1e3:9.3f} ms"
                    f"  n={row['samples']}")
    rows = [r for p in preps for r in p.rows]
    preps = None
    gc.collect()
    return rows


@dataclasses.dataclass
class _Prepared:
    impl: Impl
    rows: List[Dict[str, Any]]
    calls: Dict[int, Tuple[List[Callable[[], Any]], float]]  # case index -> (calls in rotation, first call's s)
    state: Any = None
    copies: Optional[List[Any]] = None


def _prepare_impl(ctx: Context, op: str, impl: Impl, cases: Sequence[Case]) -> _Prepared:
    """Build the impl, verify it on every case against its oracle and prepare the timed calls (one per hot case,
    a rotation over weight copies per cold case). Rows of cases it cannot run say why."""
    p = _Prepared(impl, [base_row(ctx, op, impl, case) for case in cases], {})
    try:
        if impl.enter is not None:
            impl.enter()
        p.state = impl.build()
    except Exception as e:  # noqa: BLE001 - an impl missing on this machine is a row, not a crash
        for row in p.rows:
            row.update(status="unavailable", note=_short(e))
        ctx.log(f"  {impl.name:<28} unavailable: {_short(e)}")
        return p
    wbytes = _safe(lambda: int(impl.weight_bytes(p.state)))
    for ci, (case, row) in enumerate(zip(cases, p.rows)):
        row["weight_bytes"] = wbytes
        reason = impl.skip(case.shape, case.mode) if impl.skip else None
        if reason:
            row.update(status="skipped", note=reason)
            continue
        x = case.x.to(impl.dtype)
        try:
            t0 = time.perf_counter()
            y = impl.call(p.state, x)
            first = time.perf_counter() - t0
            if case.check_rows is not None:
                err = rel_error(y[case.check_rows], impl.oracle(p.state, x[case.check_rows]))
            else:
                err = rel_error(y, impl.oracle(p.state, x))
            del y
            row["rel_err"] = err
            if not err <= impl.tol:
                row.update(status="wrong", note=f"rel_err {err:.3g} > tol {impl.tol:g}")
                ctx.log(f"  {impl.name:<28} {_fmt_shape(case.shape)} WRONG rel_err={err:.3g}")
                continue
            if case.mode == "cold":
                if p.copies is None:
                    p.copies = _cold_copies(ctx, impl, p.state, wbytes)
                p.calls[ci] = ([functools.partial(impl.call, s, x) for s in p.copies], first)
                row["note"] = f"{len(p.copies)} weight copies"
            else:
                p.calls[ci] = ([functools.partial(impl.call, p.state, x)], first)
        except Exception as e:  # noqa: BLE001
            row.update(status="error", note=_short(e))
            ctx.log(f"  {impl.name:<28} {_fmt_shape(case.shape)} ERROR {_short(e)}")
    return p


def _cold_copies(ctx: Context, impl: Impl, state: Any, wbytes: Optional[int]) -> List[Any]:
    need = cold_bytes(ctx)
    n = max(2, math.ceil(need / max(wbytes or 1, 1)) + 1)
    return [state] + [impl.clone(state) for _ in range(n - 1)]


def _safe(f: Callable[[], Any]) -> Any:
    try:
        return f()
    except Exception:  # noqa: BLE001
        return None


def _short(e: BaseException, n: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _fmt_shape(shape: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# ------------------------------------------------------------------------------------- ratios / output
def add_ratios(rows: List[Dict[str, Any]], baseline: Callable[[Dict[str, Any]], bool], name: str,
               keys: Sequence[str], only: Optional[Callable[[Dict[str, Any]], bool]] = None) -> None:
    """Set row['ratio'] = baseline p50 / row p50 (> 1 = faster) for rows matching ``only``, matching the
    baseline row on ``keys`` (e.g. M, N, K, mode)."""
    base = {tuple(r[k] for k in keys): r for r in rows if baseline(r) and r["p50"]}
    for r in rows:
        if not r["p50"] or (only is not None and not only(r)):
            continue
        b = base.get(tuple(r[k] for k in keys))
        if b is not None:
            r["baseline"] = name
            r["ratio"] = b["p50"] / r["p50"]


def add_roofline(ctx: Context, rows: List[Dict[str, Any]], where: Callable[[Dict[str, Any]], bool]) -> None:
    """roofline_frac = (weight bytes / DRAM bandwidth) / measured median, for rows matching ``where``."""
    bw = ctx.dram_gbps
    if not bw:
        return
    for r in rows:
        if r["p50"] and r["weight_bytes"] and where(r):
            r["roofline_frac"] = (r["weight_bytes"] / (bw * 1e9)) / r["p50"]


_TEXT_COLS = {"op", "impl", "backend", "format", "dtype", "mode", "status", "note", "baseline", "device"}


def print_table(rows: Sequence[Dict[str, Any]], cols: Sequence[str], title: str = "",
                file: Any = None) -> None:
    file = file or sys.stdout
    fmt = {
        "p20": lambda v: f"{v * 1e3:.3f}", "p50": lambda v: f"{v * 1e3:.3f}", "p80": lambda v: f"{v * 1e3:.3f}",
        "ratio": lambda v: f"{v:.2f}x", "roofline_frac": lambda v: f"{v * 100:.0f}%",
        "gops": lambda v: f"{v:.0f}", "rel_err": lambda v: f"{v:.1e}",
    }
    heads = {"p20": "p20 ms", "p50": "p50 ms", "p80": "p80 ms", "roofline_frac": "roof",
             "rel_err": "err", "gops": "GOP/s", "ratio": "vs base"}
    table = [[heads.get(c, c) for c in cols]]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None or v == "":
                cells.append("-" if c != "note" else "")
            else:
                cells.append(fmt[c](v) if c in fmt else str(v))
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    if title:
        print(f"\n{title}", file=file)
    for j, row in enumerate(table):
        print("  ".join(c.ljust(w) if cols[i] in _TEXT_COLS else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip(), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def write_json(path: str, ctx: Context, rows: Sequence[Dict[str, Any]], targets: Sequence[Dict[str, Any]],
               suite: str, elapsed: float) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = dict(ctx.meta, suite=suite, elapsed_s=round(elapsed, 1), loadavg_end=_loadavg(),
                cold_factor=ctx.cold_factor, l3_bytes=ctx.l3_bytes,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": list(rows), "targets": list(targets)}, f, indent=1, default=str)
        f.write("\n")


# ---------------------------------------------------------------------------------------------- targets
def target(name: str, value: Optional[float], need: float, detail: str = "", unit: str = "x") -> Dict[str, Any]:
    """A PASS/MISS line; value None => 'n/a' (a side of the comparison did not run)."""
    status = "n/a" if value is None else ("PASS" if value >= need else "MISS")
    return {"target": name, "detail": detail, "value": value, "need": need, "unit": unit, "status": status}


def print_targets(targets: Sequence[Dict[str, Any]], file: Any = None) -> None:
    file = file or sys.stdout
    if not targets:
        return
    print("\ntargets", file=file)
    w = max(len(t["target"]) for t in targets)
    wd = max(len(t["detail"]) for t in targets)
    for t in targets:
        if t["value"] is None:
            val = "n/a"
        elif t["unit"] == "%":
            val = f"{t['value'] * 100:.0f}% (need {t['need'] * 100:.0f}%)"
        else:
            val = f"{t['value']:.2f}x (need {t['need']:g}x)"
        print(f"  {t['status']:<4}  {t['target']:<{w}}  {t['detail']:<{wd}}  {val}", file=file)
    n = {s: sum(t["status"] == s for t in targets) for s in ("PASS", "MISS", "n/a")}
    print(f"  -- {n['PASS']} PASS, {n['MISS']} MISS, {n['n/a']} n/a", file=file)


# -------------------------------------------------------------------------------------------- self-check
def self_check() -> None:
    """Seconds-long check of the harness itself on a trivial op (no kernswap needed). Raises on failure."""
    assert percentiles([3.0, 1.0, 2.0]) == {"p20": 1.4, "p50": 2.0, "p80": 2.6}
    ctx = make_context(threads=1, quick=True, verbose=False)
    bw = measure_bandwidth(ctx, repeats=2)
    assert bw["gbps"] > 0
    w = torch.randn(64, 32)

    def mk(name: str, scale: float) -> Impl:
        return Impl(name=name, backend="torch", dtype=torch.float32, build=lambda: w.clone(),
                    call=lambda s, x: x @ s.t() * scale, clone=lambda s: s.clone(),
                    oracle=lambda s, x: x @ s.t(), tol=1e-5, weight_bytes=lambda s: s.numel() * 4)

    cases = [Case({"M": 3, "N": 64, "K": 32}, m, torch.randn(3, 32), flops=2 * 3 * 64 * 32)
             for m in ("hot", "cold")]
    bad = Impl(name="missing", backend="x", dtype=torch.float32, build=lambda: 1 / 0,
               call=None, clone=None, oracle=None, tol=0, weight_bytes=lambda s: 0)  # type: ignore[arg-type]
    rows = bench_impls(ctx, "selfcheck", [mk("good", 1.0), mk("wrong", 1.5), bad], cases)
    st = {(r["impl"], r["mode"]): r["status"] for r in rows}
    assert st == {("good", "hot"): "ok", ("good", "cold"): "ok", ("wrong", "hot"): "wrong",
                  ("wrong", "cold"): "wrong", ("missing", "hot"): "unavailable",
                  ("missing", "cold"): "unavailable"}, st
    good = [r for r in rows if r["impl"] == "good"]
    assert all(r["p20"] <= r["p50"] <= r["p80"] and r["samples"] >= 3 for r in good)
    add_ratios(rows, lambda r: r["impl"] == "good", "good", ("M", "N", "K", "mode"))
    assert all(abs(r["ratio"] - 1.0) < 1e-9 for r in good)
    json.dumps(rows)


if __name__ == "__main__":
    self_check()
    print("harness self-check OK")
