"""Where a compiled decode step's time goes for a patched SmolLM2-135M (issue 10's compiled target; the speeds are in
bench/e2e_compile.py): the model's forward, timed per call inside generate (int4+head, static cache, 64 greedy
tokens, one model instance), eager against torch.compile(model.forward) with Dynamo's guards as they are, with its
tensor guards only, and with no guards at all (torch.compiler.keep_tensor_guards_unsafe / skip_all_guards_unsafe:
a diagnostic, never a way to run a model: a graph without its guards runs on inputs it was not traced for); and
with the guards in place but not evaluated, torch.compiler.set_stance(skip_guard_eval_unsafe=True) around the
compiled variant's generate calls (torch's switch for a loop known to call one graph the same way every time).

    python bench/e2e_compile_split.py            # ~5 min on 2 cores
    python bench/e2e_compile_split.py --quick    # 8 tokens, 1 round (numbers meaningless)

Only the decode steps are compiled (the prefill runs eager in every variant). Each compiled variant runs in its
own process (so no variant's cache entry can answer another's call), in rounds with eager on the same instance;
eager_forward_us / compiled_forward_us are the medians over the rounds of each round's median decode-step forward
call (prefill excluded), extra_us the median over the rounds of (compiled - eager) of those round medians. Writes
bench/results/e2e-compile-split-smollm2-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"guards as they are": None, "tensor guards only": "keep_tensor_guards_unsafe",
            "no guards": "skip_all_guards_unsafe", "guards skipped by set_stance": "stance"}


def child(variant: str, new_tokens: int, rounds: int) -> None:
    """One process: eager and one compiled variant round robin on one instance; prints a JSON line."""
    import torch

    sys.path.insert(0, HERE)
    from e2e_compile import decode_steps_compiled, patched_smollm2, prompt
    from e2e_peers import TorchLM

    torch.set_num_threads(2)
    model = patched_smollm2()
    flt = VARIANTS[variant]
    opts = {} if flt in (None, "stance") else {"options": {"guard_filter_fn": getattr(torch.compiler, flt)}}
    eager = model.forward
    # (the prefill eager: a graph without guards would answer every shape)
    calls = {"eager": eager, "compiled": decode_steps_compiled(eager, torch.compile(eager, **opts))}
    lm = TorchLM(model, 0, "static")
    ids = prompt()
    times = {name: [] for name in calls}

    def timed(f, out):
        def call(*a, **k):
            t0 = time.perf_counter_ns()
            r = f(*a, **k)
            out.append(time.perf_counter_ns() - t0)
            return r
        return call

    for name, f in calls.items():  # (the compile happens here)
        model.forward = f
        lm.generate(ids, new_tokens)
    for _ in range(rounds):
        for name, f in calls.items():
            got = []
            model.forward = timed(f, got)
            if name == "compiled" and flt == "stance":  # the compiled entry's guards not evaluated while one fits
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    lm.generate(ids, new_tokens)
            else:
                lm.generate(ids, new_tokens)
            times[name].append(statistics.median(got[1:]) / 1e3)  # (the first call is the prefill)
    del model.forward
    print(json.dumps({"variant": variant, "eager_us": statistics.median(times["eager"]),
                      "compiled_us": statistics.median(times["compiled"]),
                      "extra_us": statistics.median(c - e for c, e in zip(times["compiled"], times["eager"]))}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--new", type=int, default=64, help="new tokens per generate")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    new, rounds = (8, 1) if a.quick else (a.new, a.rounds)
    if a.child:
        child(a.child, new, rounds)
        return 0
    sys.path.insert(0, HERE)
    import harness as H
    from e2e_compile import write_results

    ctx = H.make_context(threads=2, quick=a.quick)
    t0 = time.perf_counter()
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, "--new", str(new),
                              "--rounds", str(rounds)], capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            raise SystemExit(f"{variant}: the child process failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"op": "e2e-compile-split", "model": "SmolLM2-135M-Instruct", "variant": f"compiled, {variant}",
                     "eager_forward_us": r["eager_us"], "compiled_forward_us": r["compiled_us"],
                     "extra_us": r["extra_us"], "new_tokens": new, "rounds": rounds, "threads": 2,
                     "device": ctx.meta["device"]["cpu"], "isa": ctx.meta.get("kernswap_cpu_backend")})
    H.print_table(rows, ["variant", "eager_forward_us", "compiled_forward_us", "extra_us"],
                  title=f"SmolLM2-135M int4+head decode step, static cache, {ctx.meta['device']['cpu']}, 2 threads")
    if not (a.quick or a.no_write):
        write_results(ctx, "e2e-compile-split", rows, [], time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
