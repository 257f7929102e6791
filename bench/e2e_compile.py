"""Eager against torch.compile for a patched SmolLM2-135M (issue 10: the compiled path at least as fast as eager).

    python bench/e2e_compile.py              # int4+head on ONE model instance: eager (decode-layer kernel, dynamic
                                             # cache), eager with a static cache (the kernel through
                                             # ops.decode_layer_step), the same with the kernel off (per-op),
                                             # torch.compile(model.forward) with a static cache; and a control: a
                                             # second instance, eager with a static cache; ~5 min on 2 cores
    python bench/e2e_compile.py --quick      # 8 new tokens, 1 round (numbers meaningless)

Greedy decode (batch 1, 32-token prompt, exactly --new tokens: e2e_peers.TorchLM). Every variant but the control
runs the same module instance, so the same weights at the same addresses: only the way it is called differs
(model.forward swapped for its torch.compile wrapper, the cache implementation, kernswap.set_decode_path). Two
deep copies of one patched model, run the same way, decode up to ~5% apart on this kind of VM (where their pages
landed); the control row ("second instance", vs_eager_static) shows that spread in the run itself. Each variant
runs one untimed generate first (the compiled one's compiles happen there: first_generate_s); then --rounds
rounds, each running every variant once in an order rotated by one per round. decode_tps is the median over the
rounds; the ratios are medians of each round's ratio (the variants of one round run seconds apart, so the VM's
drift over minutes cancels out of them). Writes bench/results/e2e-compile-smollm2-<machine>.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Optional

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
CONTROL = "eager static cache, second instance"
VARIANTS = ("eager", "eager static cache", "eager static cache per-op", "compiled static cache", CONTROL)


def prompt() -> torch.Tensor:
    """The decode benches' prompt: 32 token ids, the same every run."""
    return torch.randint(100, 20000, (1, 32), generator=torch.Generator().manual_seed(0))


def patched_smollm2():
    """SmolLM2-135M patched with PATCH (weights not kept)."""
    import kernswap
    from kernswap.testing import load_smollm2

    model = load_smollm2()
    kernswap.patch(model, progress=False, keep_originals=False, **PATCH)
    return model


def decode_steps_compiled(eager, compiled, seen: Optional[dict] = None):
    """A forward that runs ``compiled`` for decode steps (one token per sequence) and ``eager`` for the prefill
    (a graph traced for the prefill would answer it with another shape); the last decode step's keyword arguments
    go to seen["kwargs"] when given."""
    def forward(*args, **kw):
        ids = kw.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            if seen is not None:
                seen["kwargs"] = dict(kw)
            return compiled(*args, **kw)
        return eager(*args, **kw)
    return forward


def write_results(ctx: H.Context, suite: str, rows, targets, elapsed: float) -> None:
    """bench/results/<suite>-smollm2-<machine>.json."""
    path = os.path.join(HERE, "results", f"{suite}-smollm2-{H.machine_name(ctx)}.json")
    H.write_json(path, ctx, rows, targets, suite, elapsed)
    print(f"wrote {path}")


def _patched(base):
    import kernswap

    m = copy.deepcopy(base)
    kernswap.patch(m, progress=False, keep_originals=False, **PATCH)
    return m


def _variants(base):
    """name -> (TorchLM, setup): setup() puts the shared instance in the variant's mode before each generate."""
    import kernswap

    m, other = _patched(base), _patched(base)
    compiled = torch.compile(m.forward)

    def mode(forward, decode_path):
        def setup():
            m.__dict__.pop("forward", None)  # the class's forward
            if forward is not None:
                m.forward = forward
            kernswap.set_decode_path(m, decode_path)
        return setup

    eager = mode(None, True)
    return {"eager": (TorchLM(m, 0), eager),
            "eager static cache": (TorchLM(m, 0, "static"), eager),
            "eager static cache per-op": (TorchLM(m, 0, "static"), mode(None, False)),
            "compiled static cache": (TorchLM(m, 0, "static"), mode(compiled, True)),
            CONTROL: (TorchLM(other, 0, "static"), eager)}


def run(ctx: H.Context, new_tokens: int, rounds: int):
    from kernswap.testing import load_smollm2

    torch.set_num_threads(ctx.threads)
    ids = prompt()
    models = _variants(load_smollm2())
    assert tuple(models) == VARIANTS

    def gen(name):
        lm, setup = models[name]
        setup()
        t0 = time.perf_counter()
        out = lm.generate(ids, new_tokens)
        return out, time.perf_counter() - t0

    first, outs, tps = {}, {}, {n: [] for n in models}
    for name in models:
        outs[name], first[name] = gen(name)
        print(f"[e2e-compile] {name}: first generate {first[name]:.1f} s", file=sys.stderr)
    for r in range(rounds):
        names = list(models)
        for name in names[r % len(names):] + names[:r % len(names)]:
            tps[name].append(new_tokens / gen(name)[1])
    models["eager"][1]()  # leave the instance as patch() made it
    ref = outs["eager"]
    rows = []

    def ratio(a, b):  # median over the rounds of a's / b's tokens/s in the same round
        return statistics.median(x / y for x, y in zip(tps[a], tps[b]))

    for name in models:
        rows.append({"op": "e2e-compile", "model": "SmolLM2-135M-Instruct", "variant": f"int4+head {name}",
                     "decode_tps": statistics.median(tps[name]), "vs_eager": ratio(name, "eager"),
                     "vs_eager_static": ratio(name, "eager static cache"),
                     "first_generate_s": first[name], "same_tokens_as_eager": bool(torch.equal(outs[name], ref)),
                     "new_tokens": new_tokens, "rounds": rounds, "threads": ctx.threads,
                     "device": ctx.meta["device"]["cpu"], "isa": ctx.meta.get("kernswap_cpu_backend")})
    comp = rows[VARIANTS.index("compiled static cache")]
    tgt = [H.target("compiled decode >= eager", comp["vs_eager"], 1.0, "compiled static cache vs eager"),
           H.target("compiled decode >= eager (static cache)", comp["vs_eager_static"], 1.0,
                    "compiled static cache vs eager static cache, the same instance")]
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
        write_results(ctx, "e2e-compile", rows, tgt, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
