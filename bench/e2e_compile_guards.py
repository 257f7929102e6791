"""The guards torch.compile evaluates before every compiled decode step of a patched SmolLM2-135M (int4+head, static
cache; issue 10's compiled target), counted by kind and timed directly, against the eager step's own checks.

    python bench/e2e_compile_guards.py           # ~2 min on 2 cores
    python bench/e2e_compile_guards.py --quick   # fewer timed calls (numbers noisy)

Only the decode steps are compiled (as in e2e_compile_split). After a short generate, the compiled frame's cache
entry is taken from Dynamo and its guard tree's check is called on the last decode step's own arguments: "hot" back
to back, "cold" each right after a pass over a buffer the size of the model's weights (what a decode step streams
through the caches before the next step's guards run). The eager rows time the checks the eager step runs in their
place (the decode path's call-level checks and its static-cache layer checks) the same two ways. Guard counts by
kind come from the guard filter (one entry per guard Dynamo installs; a tensor's dimension-marking checks are part
of its TENSOR_MATCH). Times are medians over the calls; the counts do not depend on the machine. Writes
bench/results/e2e-compile-guards-smollm2-<machine>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from e2e_compile import decode_steps_compiled, patched_smollm2, prompt, write_results  # noqa: E402
import harness as H  # noqa: E402
from e2e_peers import TorchLM  # noqa: E402


def _median_us(f, n: int, before=None) -> float:
    ts = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter_ns()
        f()
        ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts) / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    ctx = H.make_context(threads=2, quick=a.quick)
    t_start = time.perf_counter()
    model = patched_smollm2()
    kinds = {}

    def count(entries):
        for e in entries:
            kinds[e.guard_type] = kinds.get(e.guard_type, 0) + 1
        return [True] * len(entries)

    last = {}
    model.forward = decode_steps_compiled(model.forward, torch.compile(model.forward,
                                                                       options={"guard_filter_fn": count}), last)
    TorchLM(model, 0, "static").generate(prompt(), 6)
    del model.forward
    fn = type(model).forward
    code, cells = fn.__code__, dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    entries = _debug_get_cache_entry_list(code)
    if len(entries) != 1:
        raise SystemExit(f"expected one compiled entry for {code.co_name}, found {len(entries)}")
    guards = entries[0].guard_manager
    frame = {"args": (model,), "kwargs": last["kwargs"], **{k: c.cell_contents for k, c in cells.items()}}
    torch.set_grad_enabled(False)  # (generate's grad mode: one of the guards)
    if not guards.check(frame):
        raise SystemExit(f"the guards refuse the step they were built for: {guards.check_verbose(frame)}")
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    sweep = torch.empty(weight_bytes // 4)
    sweep.fill_(1.0)

    def evict():
        sweep.add_(1.0)

    dmf = model.model.__dict__["forward"]
    kw = last["kwargs"]

    def eager_checks():
        ids, cache, mask, _ = dmf._common(kw)
        dmf._static_layers(ids, cache, mask)

    n_hot, n_cold = (500, 50) if a.quick else (5000, 400)
    rows = []
    for what, f in (("compiled: Dynamo's guards", lambda: guards.check(frame)),
                    ("eager: the decode path's checks", eager_checks)):
        hot, cold = _median_us(f, n_hot), _median_us(f, n_cold, evict)
        rows.append({"op": "e2e-compile-guards", "model": "SmolLM2-135M-Instruct", "variant": what,
                     "hot_us": round(hot, 1), "cold_us": round(cold, 1), "threads": 2,
                     "device": ctx.meta["device"]["cpu"], "isa": ctx.meta.get("kernswap_cpu_backend")})
    rows[0]["guards"] = sum(kinds.values())
    rows[0]["guards_by_kind"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    H.print_table(rows, ["variant", "hot_us", "cold_us"],
                  title=f"SmolLM2-135M int4+head decode step, static cache, {ctx.meta['device']['cpu']}, 2 threads "
                        f"({rows[0]['guards']} guards; cold: after a {weight_bytes / 2**20:.0f} MiB pass)")
    print("guards by kind:", ", ".join(f"{k} {v}" for k, v in rows[0]["guards_by_kind"].items()))
    if not (a.quick or a.no_write):
        write_results(ctx, "e2e-compile-guards", rows, [], time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
