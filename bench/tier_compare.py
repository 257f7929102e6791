"""Two CPU tiers of kernswap side by side in one process: the quantized-linear op on prefill-sized shapes, and the
prefill of 512 tokens of SmolLM2-135M patched with one config, against torch's fp32 in the same rounds (medians,
round robin: each round times every variant once).

    python bench/tier_compare.py                                  # amx vs avx512_vnni, w8a8+head+dense prefill
    python bench/tier_compare.py --tiers avx512_vnni avx2 --quant w4a8 --shapes-only

Prints one line per row; the README quotes them with the machine named. Tiers the CPU cannot run are skipped.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

SHAPES = ((512, 1536, 576), (512, 576, 1536), (512, 960, 576), (64, 1536, 576), (16, 1536, 576), (256, 4096, 4096))


def _median_time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def rounds(variants, n: int, repeats: int = 3):
    """name -> best of ``repeats`` round-robin medians of ``n`` calls (variants: name -> (set-up, call))."""
    best = {}
    for _ in range(repeats):
        for name, (setup, call) in variants.items():
            setup()
            call()
            best[name] = min(best.get(name, math.inf), _median_time(call, n))
    return best


def main(argv=None) -> int:
    import kernswap
    from kernswap import _ext
    from kernswap.formats import quantize
    from kernswap.ops import quantized_linear

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiers", nargs="+", default=["amx", "avx512_vnni"])
    ap.add_argument("--quant", default="w8a8", help="the format of the op rows and of the patched model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes-only", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    C = _ext.get_C()
    tiers = [t for t in a.tiers if t in _ext.supported_isas()]
    sys.path.insert(0, HERE)
    import harness as H

    print(f"CPU: {H.cpu_model()}, {a.threads} threads; tiers {tiers} (skipped: "
          f"{[t for t in a.tiers if t not in tiers]})")

    def on(tier):
        return lambda: C.set_isa(tier)

    cfg = kernswap.QuantConfig.from_any(a.quant)
    for m, n, k in SHAPES:
        torch.manual_seed(0)
        qw = quantize(torch.randn(n, k) / math.sqrt(k), cfg)
        x = torch.randn(m, k)
        lin = torch.nn.Linear(k, n, bias=False)
        var = {t: (on(t), lambda: quantized_linear(x, qw, None, backend="cpu")) for t in tiers}
        var["F.linear fp32"] = (on(""), lambda: lin(x))
        with torch.no_grad():
            best = rounds(var, 9)
        C.set_isa("")
        print(f"{a.quant} {m}x{n}x{k}: " + ", ".join(f"{t} {v * 1e3:.3f} ms" for t, v in best.items()) +
              (f"; {tiers[0]} / {tiers[1]} {best[tiers[1]] / best[tiers[0]]:.2f}x" if len(tiers) > 1 else ""))
    if a.shapes_only:
        return 0
    from kernswap.testing import lee_corpus_text, load_smollm2, load_smollm2_tokenizer

    base = load_smollm2().eval()
    ids = load_smollm2_tokenizer()(lee_corpus_text(), return_tensors="pt").input_ids[:, :512]
    m = copy.deepcopy(base)
    kernswap.patch(m, quant=a.quant, lm_head=True, attention="dense", progress=False, keep_originals=False)
    var = {f"{a.quant}+head+dense {t}": (on(t), lambda: m(ids, use_cache=True, logits_to_keep=1)) for t in tiers}
    var["fp32"] = (on(""), lambda: base(ids, use_cache=True, logits_to_keep=1))
    with torch.no_grad():
        best = rounds(var, 5)
    C.set_isa("")
    for name, v in best.items():
        print(f"SmolLM2-135M prefill 512 tokens, {name}: {v * 1e3:.1f} ms ({best['fp32'] / v:.2f}x fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
