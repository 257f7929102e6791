"""Eager against torch.compile for a patched SmolLM2-135M (issue 10: the compiled path at least as fast as eager).

    python bench/e2e_compile.py              # int4+head: eager (decode-layer kernel, dynamic cache), eager with a
                                             # static cache (the kernel through ops.decode_layer_step), the same
                                             # with the kernel off (per-op), torch.compile(model.forward) with a
                                             # static cache; ~6 min on 2 cores
    python bench/e2e_compile.py --quick      # 8 new tokens, 1 round (numbers meaningless)

Greedy decode (batch 1, 32-token prompt, exactly --new tokens: e2e_peers.TorchLM), every model round robin
in one process, after one untimed generate each (the compiled one's compiles happen there: first_generate_s).
decode_tps is the median over --rounds rounds; the ratios are medians of each round's ratio (the variants of one
round run seconds apart, so the VM's drift over minutes cancels out of them). Writes
bench/results/e2e-compile-smollm2-<machine>.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(1, os.path.join(os.path.dirname(HERE), "python"))
import harness as H  # noqa: E402
from e2e_peers import TorchLM  # noqa: E402

PATCH = dict(quant="int4", lm_head=True)
VARIANTS = ("eager", "eager static cache", "eager static cache per-op", "compiled static cache")


def _models(base):
    import kernswap

    out = {}
    for name in VARIANTS:
        m = copy.deepcopy(base)
        kernswap.patch(m, progress=False, keep_originals=False, **PATCH)
        if "per-op" in name:
            kernswap.set_decode_path(m, False)
        if "static" in name:
            m.generation_config.cache_implementation = "static"
        if name.startswith("compiled"):
            m.forward = torch.compile(m.forward)
        out[name] = m
    return out


def run(ctx: H.Context, new_tokens: int, rounds: int):
    from kernswap.testing import load_smollm2

    torch.set_num_threads(ctx.threads)
    base = load_smollm2()
    prompt = torch.randint(100, 20000, (1, 32), generator=torch.Generator().manual_seed(0))
    models = {name: TorchLM(m, 0) for name, m in _models(base).items()}  # (exactly new_tokens greedy tokens)

    def gen(lm):
        return lm.generate(prompt, new_tokens)

    first, outs, tps = {}, {}, {n: [] for n in models}
    for name, m in models.items():
        t0 = time.perf_counter()
        outs[name] = gen(m)
        first[name] = time.perf_counter() - t0
        print(f"[e2e-compile] {name}: first generate {first[name]:.1f} s", file=sys.stderr)
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            gen(m)
            tps[name].append(new_tokens / (time.perf_counter() - t0))
    ref = outs["eager"]
    rows = []

    def ratio(a, b):  # median over the rounds of a's / b's tokens/s in the same round
        return statistics.median(x / y for x, y in zip(tps[a], tps[b]))

    for name in models:
        rows.append({"op": "e2e-compile", "model": "SmolLM2-135M-Instruct", "variant": f"int4+head {name}",
                     "decode_tps": statistics.median(tps[name]), "vs_eager": ratio(name, "eager"),
                     "vs_eager_static": ratio(name, "eager static cache"),
                     "first_generate_s": first[name], "same_tokens_as_eager": bool(torch.equal(outs[name], ref)),
                     "new_tokens": new_tokens, "threads": ctx.threads, "device": ctx.meta["device"]["cpu"],
                     "isa": ctx.meta.get("kernswap_cpu_backend")})
    tgt = [H.target("compiled decode >= eager", rows[-1]["vs_eager"], 1.0, "compiled static cache vs eager"),
           H.target("compiled decode >= eager (static cache)", rows[-1]["vs_eager_static"], 1.0,
                    "compiled static cache vs eager static cache")]
    return rows, tgt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64, help="new tokens per generate")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    ctx = H.make_context(threads=a.threads, quick=a.quick)
    t0 = time.perf_counter()
    rows, tgt = run(ctx, 8 if a.quick else a.new, 1 if a.quick else a.rounds)
    H.print_table(rows, ["variant", "decode_tps", "vs_eager", "vs_eager_static", "first_generate_s",
                         "same_tokens_as_eager"],
                  title=f"SmolLM2-135M int4+head, {ctx.meta['device']['cpu']}, {ctx.threads} threads")
    H.print_targets(tgt)
    if not (a.quick or a.no_write):
        path = os.path.join(HERE, "results", f"e2e-compile-smollm2-{H.machine_name(ctx)}.json")
        H.write_json(path, ctx, rows, tgt, "e2e-compile", time.perf_counter() - t0)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
