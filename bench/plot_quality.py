"""Perplexity against bits per weight for SmolLM2-135M: one point per kernswap format and method (the rows of
``bench/quality_methods.py --json``) and per peer (the llama.cpp and torchao rows of end-to-end results files, the
same evaluated tokens).

    python bench/plot_quality.py bench/results/quality-methods-xeon-2c-2t.json \\
        --peers bench/results/e2e-smollm2-xeon-2c-2t.json bench/results/e2e-xeon-2c-2t.json \\
        --out bench/results/quality-vs-bits-xeon.png

Needs matplotlib (not a test dependency). kernswap's bits per weight are measured (stored codes, scales and
zero-points of its quantized layers); the peers' are their formats' nominal sizes (NOMINAL_BITS).
"""
from __future__ import annotations

import argparse
import json
import sys

# nominal stored bits per weight of the peers' formats (codes + per-block scale / offset)
NOMINAL_BITS = {"llama.cpp-Q4_0": 4.5, "llama.cpp-Q4_1": 5.0, "llama.cpp-Q8_0": 8.5, "llama.cpp-Q4_K_M": 4.85,
                "torchao-int4-hqq": 4.5, "torchao-int4": 4.5, "torchao-int8wo": 8.0, "torchao-int8dyn": 8.0}


def peer_points(paths):
    """{peer variant: delta ppl %} from end-to-end results files (the first file that has a peer wins)."""
    out = {}
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        for r in rows:
            v = r.get("variant", "")
            if v in NOMINAL_BITS and v not in out and r.get("dppl_pct") is not None:
                out[v] = r["dppl_pct"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality", help="a bench/quality_methods.py --json file")
    ap.add_argument("--peers", nargs="*", default=[], help="end-to-end results files with peer rows")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.quality) as f:
        q = json.load(f)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in q["rows"]:
        ax.scatter(r["bits_per_weight"], r["dppl_pct"], color="tab:blue")
        ax.annotate(r["config"].replace("QuantConfig", "").replace("calib:", "calib "), (r["bits_per_weight"],
                    r["dppl_pct"]), fontsize=6, xytext=(4, 2), textcoords="offset points")
    for name, d in peer_points(a.peers).items():
        ax.scatter(NOMINAL_BITS[name], d, color="tab:red", marker="s")
        ax.annotate(name, (NOMINAL_BITS[name], d), fontsize=7, xytext=(4, -8), textcoords="offset points",
                    color="tab:red")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("bits per weight (kernswap: measured; peers: nominal)")
    ax.set_ylabel("perplexity vs fp32 (%)")
    tokens = q["rows"][0]["tokens"] if q["rows"] else "?"
    ax.set_title(f"SmolLM2-135M, {tokens} predicted lee tokens (512-token windows); kernswap (blue) and peers "
                 f"(red); {q['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
