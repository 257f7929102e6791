"""kernswap benchmarks, the main job: every suite (bench/bench_*.py, end to end included) with its default grid,
sized to finish in about 10 minutes on a 2-core machine of either CPU tier.

    python bench/run.py                      # default grids (~10 min on 2 cores)
    python bench/run.py --full               # full grids (16k-token attention, 8,192-token perplexity, ...)
    python bench/run.py --isa avx2           # force kernswap's and torch's CPU tier (measure a lower tier)
    python bench/run.py --only quantized_linear
    python bench/run.py --all                # also suites outside the default run (e2e: ~20 min)
    python bench/run.py --quick              # tiny shapes, seconds: smoke test, numbers meaningless
    python bench/run.py --self-check         # harness + suite self-checks (asserts), then exit

Prints a table per case plus a PASS/MISS "targets" summary per suite, and writes
bench/results/<suite>-<machine>.json (``{"meta": ..., "rows": [...], "targets": [...]}``).
--quick writes under $TMPDIR/kernswap-bench-quick/ (its numbers are not results).
A suite is a module bench/bench_<name>.py defining NAME, run(ctx) -> (rows, targets),
print_results(rows, targets) and self_check().
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import glob
import importlib
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import isa_env  # noqa: E402  (no torch import: it sets torch's ISA variables before torch is imported)

FORCED_ISA = isa_env.forced_from_argv(sys.argv[1:])
TORCH_ISA_ENV = isa_env.apply_env(FORCED_ISA)
try:  # the installed package (with its compiled module) wins; the source tree is only a fallback
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(1, os.path.join(os.path.dirname(HERE), "python"))
import harness as H  # noqa: E402


# Every suite is part of the main job; `--only NAME` runs one. A suite can opt out itself with
# `IN_DEFAULT_RUN = False`.
NOT_IN_DEFAULT_RUN = set()


def in_default_run(mod) -> bool:
    return getattr(mod, "IN_DEFAULT_RUN", mod.NAME not in NOT_IN_DEFAULT_RUN)


def discover():
    suites = {}
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        mod = importlib.import_module(os.path.splitext(os.path.basename(path))[0])
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            suites[mod.NAME] = mod
    return suites


def main(argv=None) -> int:
    faulthandler.enable()  # a crash in a compiled kernel still says where it happened
    suites = discover()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(suites), help="run only this suite (repeatable)")
    p.add_argument("--all", action="store_true", help="also the suites kept out of the default run (e2e)")
    p.add_argument("--full", action="store_true", help="full grid (slow)")
    p.add_argument("--quick", action="store_true", help="tiny shapes in seconds (smoke test)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default=None, help="results folder (default bench/results; --quick: a temp folder)")
    p.add_argument("--machine", default=None, help="machine name used in result file names")
    p.add_argument("--max-time", type=float, default=None, help="seconds of timed calls per row")
    p.add_argument("--l3-mib", type=float, default=None, help="last-level cache size for the cold rotation")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--self-check", action="store_true", help="run the harness and suite self-checks and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-row progress on stderr")
    p.add_argument("--isa", default=None, choices=sorted(isa_env.TORCH_ENV),
                   help="force one CPU tier: kernswap's kernels (kernswap._C.set_isa) and torch's baselines "
                        "(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS); recorded in every row")
    a = p.parse_args(argv)
    names = a.only or sorted(n for n, m in suites.items() if a.all or in_default_run(m))

    if a.self_check:
        t0 = time.perf_counter()
        H.self_check()
        print("harness: OK")
        for n in names:
            suites[n].self_check()
            print(f"{n}: OK")
        print(f"self-check passed in {time.perf_counter() - t0:.1f} s")
        return 0

    isa_env.apply_kernswap(a.isa)
    kw = {"forced_isa": a.isa, "torch_isa_env": TORCH_ISA_ENV}
    if a.l3_mib:
        kw["l3_bytes"] = int(a.l3_mib * 2**20)
    ctx = H.make_context(threads=a.threads, quick=a.quick, full=a.full, verbose=not a.quiet, **kw)
    if a.max_time is not None:
        ctx.max_time = a.max_time
    out_dir = a.out or (os.path.join(tempfile.gettempdir(), "kernswap-bench-quick") if a.quick
                        else os.path.join(HERE, "results"))
    machine = a.machine or H.machine_name(ctx) + (f"-{a.isa}" if a.isa else "")
    dev = ctx.meta["device"]
    print(f"kernswap {ctx.meta['kernswap']} ({ctx.meta['kernswap_cpu_backend']}), torch {ctx.meta['torch']}, "
          f"git {ctx.meta['git_sha']}")
    print(f"device: {dev['cpu']}, {dev['cores']} cores, {ctx.threads} threads, L3 {dev['l3_bytes'] / 2**20:.0f} MiB, "
          f"{' '.join(dev['isa_flags'])}; grid: {'quick' if a.quick else 'full' if a.full else 'default'}")
    if (ctx.meta.get("loadavg_start") or [0])[0] > 0.5:
        print(f"warning: load average {ctx.meta['loadavg_start']} before start: other processes share the CPU, "
              f"timings will be noisy")
    t_all = time.perf_counter()
    bw = H.measure_bandwidth(ctx)
    print(f"DRAM read bandwidth: {bw['gbps']:.1f} GB/s best, {bw['gbps_median']:.1f} GB/s median ({bw['method']})")
    failed = []
    for n in names:
        t0 = time.perf_counter()
        try:
            rows, tgts = suites[n].run(ctx)
        except Exception:  # noqa: BLE001 - one broken suite must not hide the others
            traceback.print_exc()
            failed.append(n)
            continue
        elapsed = time.perf_counter() - t0
        suites[n].print_results(rows, tgts)
        print(f"[{n}] {len(rows)} rows in {elapsed:.0f} s")
        if not a.no_write:
            path = os.path.join(out_dir, f"{n}-{machine}.json")
            H.write_json(path, ctx, rows, tgts, n, elapsed)
            print(f"[{n}] wrote {os.path.relpath(path)}")
        gc.collect()  # a suite's models and weight copies (reference cycles included) go before the next suite's
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
