"""Weight-only quantized linear on the CPU: compiled kernel vs torch-GEMM panels vs F.linear fp32, per M.

Sets DENSE_FROM_ROWS["avx2"] (backends/cpu.py). Each (N, K, M, format) case times three impls round robin
(ROUNDS rounds, each impl's median of REPS calls per round; reported: median over rounds), 2 threads:
  flinear: F.linear fp32 on the unquantized weight (torch's own fp32 GEMM)
  kernel:  kernswap._C.qlinear (whatever the build routes M to: the FMA kernel from 2 rows on, or, in an older
           tree, the integer engine), DENSE_FROM_ROWS off
  dense:   kernswap's torch-GEMM path (qdequant panels + torch.mm), DENSE_FROM_ROWS = 1
Each impl is checked against kernswap.reference.reference_linear before timing.
Usage: PYTHONPATH=python python bench/qlinear_fma_sweep.py [--out rows.json] [--quick] [--ms 128,256,512]
       [--small] (--small: only the 576/1536-wide SmolLM2 shapes)
"""
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from kernswap.backends import cpu as cb
from kernswap.config import QuantConfig
from kernswap.formats import quantize
from kernswap.reference import reference_linear

SHAPES = [(4096, 4096), (576, 576), (1536, 576), (576, 1536)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
FMTS = {"int8": QuantConfig(8), "int4-g64": QuantConfig(4, 64), "int4-g128": QuantConfig(4, 128)}
ROUNDS = 3


def timed(fn, x, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    torch.set_num_threads(2)
    quick = "--quick" in sys.argv
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    shapes, ms = (SHAPES[1:2], [2, 16]) if quick else (SHAPES, MS)
    if "--ms" in sys.argv:
        ms = [int(v) for v in sys.argv[sys.argv.index("--ms") + 1].split(",")]
    if "--small" in sys.argv:
        shapes = SHAPES[1:]
    rows = []
    print(f"{'N':>5} {'K':>5} {'fmt':>9} {'M':>4} {'flinear ms':>10} {'kernel ms':>10} {'dense ms':>9} "
          f"{'kern/FL':>8} {'dense/FL':>8}   (ratios: F.linear time / impl time, > 1 = faster than F.linear)")
    for n, k in shapes:
        w = torch.randn(n, k) / math.sqrt(k)
        for fname, cfg in FMTS.items():
            if cfg.weight_bits == 4 and k % cfg.group_size:
                continue  # e.g. K = 576 has no 128-groups
            qw = quantize(w, cfg)
            bits = qw.bits
            run = cb.prepare(qw.packed, qw.scale, qw.zero, None, bits, qw.group_size, k, n, False)
            saved = dict(cb.DENSE_FROM_ROWS["avx2"])

            def kernel(x):
                cb.DENSE_FROM_ROWS["avx2"][bits] = None
                return run(x)

            def dense(x):
                cb.DENSE_FROM_ROWS["avx2"][bits] = 1
                return run(x)

            impls = {"flinear": lambda x: F.linear(x, w), "kernel": kernel, "dense": dense}
            for m in ms:
                x = torch.randn(m, k)
                ref = reference_linear(x, qw)
                for name, fn in impls.items():
                    if name != "flinear":
                        err = (fn(x) - ref).abs().max().item()
                        assert err <= 1e-3 * (ref.abs().max().item() + 1e-6), (name, n, k, fname, m, err)
                flops = 2.0 * m * n * k
                reps = max(5, min(200, int(2e8 / flops)))
                for fn in impls.values():  # warm-up
                    fn(x)
                res = {name: [] for name in impls}
                for _ in range(ROUNDS):
                    for name, fn in impls.items():
                        res[name].append(timed(fn, x, reps))
                med = {name: sorted(v)[len(v) // 2] * 1e3 for name, v in res.items()}
                row = dict(N=n, K=k, fmt=fname, M=m, **{f"{n_}_ms": v for n_, v in med.items()},
                           kernel_vs_flinear=med["flinear"] / med["kernel"], dense_vs_flinear=med["flinear"] / med["dense"])
                rows.append(row)
                print(f"{n:>5} {k:>5} {fname:>9} {m:>4} {med['flinear']:>10.3f} {med['kernel']:>10.3f} "
                      f"{med['dense']:>9.3f} {row['kernel_vs_flinear']:>8.2f} {row['dense_vs_flinear']:>8.2f}",
                      flush=True)
            cb.DENSE_FROM_ROWS["avx2"].update(saved)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
