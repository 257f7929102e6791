"""Quality of the quantization methods on SmolLM2-135M: perplexity and KL to fp32 over the first lee tokens (the
end-to-end suite's loop), with the time each patch took; calibrated methods get lee text from token 8,192 on
(never the evaluated text).

    python bench/quality_methods.py                                   # the default set below, 2,048 tokens
    python bench/quality_methods.py --tokens 8192 --config 'QuantConfig(8, dynamic_activations=True, smooth=0.5)'
    python bench/quality_methods.py --config 'QuantConfig(4, 128)' --config 'calib:QuantConfig(4, 128)'

Prints one line per config; the README's quality table quotes these lines (machine named there).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(1, os.path.join(os.path.dirname(HERE), "python"))
import bench_e2e as E  # noqa: E402
import e2e_peers as P  # noqa: E402

DEFAULT = (
    "QuantConfig(4, 32, symmetric=False, zero_point='float', method='rtn')",
    "QuantConfig(4, 32, symmetric=False, zero_point='float')",
    "QuantConfig(8, dynamic_activations=True)",
    "QuantConfig(8, dynamic_activations=True, smooth=0.5)",
    "QuantConfig(8, dynamic_activations=True, smooth=True)",
    "QuantConfig(4, 128, dynamic_activations=True)",
    "QuantConfig(4, 128, dynamic_activations=True, smooth=True)",
)
CALIB_FROM = 8192  # first calibration token: the evaluation uses the tokens before it
CALIB_PREFIX = "calib:"  # a config given as "calib:QuantConfig(...)" gets the calibration text too (method="mse":
                         # activation-weighted error)


def main(argv=None) -> int:
    import kernswap
    from kernswap import QuantConfig  # noqa: F401 - used by the config expressions
    from kernswap.formats.scale_search import CALIBRATED
    from kernswap.patching.report import module_memory
    from kernswap.testing import lee_corpus_text, load_smollm2, load_smollm2_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calibration", type=int, default=16, help="sequences of 512 calibration tokens")
    ap.add_argument("--config", action="append", help="a QuantConfig(...) expression (repeatable)")
    ap.add_argument("--json", default=None, help="also write the rows here (bench/plot_quality.py reads them)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = load_smollm2()
    ids = load_smollm2_tokenizer()(lee_corpus_text(), return_tensors="pt").input_ids
    if args.tokens > CALIB_FROM:
        raise SystemExit(f"--tokens must be <= {CALIB_FROM} (the calibration text starts there)")
    calib = [ids[0, CALIB_FROM + 512 * i:CALIB_FROM + 512 * (i + 1)] for i in range(args.calibration)]
    models, seconds, bits = {"fp32": P.TorchLM(base, module_memory(base))}, {}, {}
    for spec in args.config or DEFAULT:
        expr = spec[len(CALIB_PREFIX):] if spec.startswith(CALIB_PREFIX) else spec
        cfg = eval(expr, {"QuantConfig": kernswap.QuantConfig})  # noqa: S307 - the user's own command line
        needs = cfg.smooth is not None or cfg.method in CALIBRATED or spec.startswith(CALIB_PREFIX)
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = kernswap.patch(m, quant=cfg, progress=False, keep_originals=False, calibration=calib if needs else None)
        seconds[spec] = time.perf_counter() - t0
        print(f"[quality] {spec}: patched in {seconds[spec]:.1f} s; " +
              "; ".join(n for n in rep.notes if n.startswith(("smoothing", "awq", "quantization method"))), file=sys.stderr)
        models[spec] = P.TorchLM(m, module_memory(m))
        bits[spec] = bits_per_weight(m)
    res = E.quality(models, ids[:, :args.tokens], 512)
    ref = res["fp32"]["ppl"]
    print(f"CPU: {E.H.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"fp32: ppl {ref:.3f} over {res['fp32']['tokens']} predicted tokens")
    rows = []
    for spec in seconds:
        r = res[spec]
        print(f"{spec}: ppl {r['ppl']:.3f} ({(r['ppl'] / ref - 1) * 100:+.2f}%)  KL {r['kl']:.5f}  "
              f"patch {seconds[spec]:.1f} s  {bits[spec]:.2f} bits/weight")
        rows.append({"config": spec, "ppl": r["ppl"], "dppl_pct": (r["ppl"] / ref - 1) * 100, "kl": r["kl"],
                     "patch_s": seconds[spec], "bits_per_weight": bits[spec], "tokens": r["tokens"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "SmolLM2-135M", "cpu": E.H.cpu_model(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "fp32_ppl": ref, "calibration_sequences": args.calibration,
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def bits_per_weight(model) -> float:
    """Stored bits per quantized weight over the model's QuantLinear layers: packed codes, scales and zero-points
    (padding included, biases not) x 8 / (in_features x out_features)."""
    from kernswap.nn import QuantLinear

    stored = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            qw = m.qweight
            stored += sum(t.numel() * t.element_size() for t in (qw.packed, qw.scale, qw.zero) if t is not None)
            weights += m.in_features * m.out_features
    return 8 * stored / weights if weights else float("nan")


if __name__ == "__main__":
    sys.exit(main())
