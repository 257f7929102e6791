"""Perplexity against bits per weight for SmolLM2-135M: one point per kernswap format and method and one per peer,
from one quality table (``bench/e2e_quality.py``: the same run, the same tokens).

    python bench/plot_quality.py bench/results/quality-smollm2-xeon-2c-2t.json \\
        --out bench/results/quality-vs-bits-xeon.png

Needs matplotlib (not a test dependency). Bits per weight are the stored bits of each model's quantized linear
layers (codes, scales and zero-points; for llama.cpp the GGUF's layer tensors).
"""
from __future__ import annotations

import argparse
import json
import sys

COLORS = {"rtn": "tab:gray", "mse": "tab:blue", "calib:mse": "tab:cyan", "gptq": "tab:green", "awq": "tab:purple"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality", help="a bench/e2e_quality.py results file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ymax", type=float, default=60.0, help="clip the y axis (percent)")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.quality) as f:
        q = json.load(f)
    rows = [r for r in q["rows"] if r.get("dppl_pct") is not None and r["variant"] != "fp32"]
    fig, ax = plt.subplots(figsize=(10, 6))
    for r in rows:
        peer = r.get("peer")
        color = "tab:red" if peer else COLORS.get(r["method"].split()[0], "tab:orange")
        y = min(r["dppl_pct"], a.ymax)
        ax.scatter(r["bits_per_weight"], y, color=color, marker="s" if peer else "o", s=18)
        ax.annotate(r["variant"], (r["bits_per_weight"], y), fontsize=5.5, xytext=(3, 2), textcoords="offset points",
                    color="tab:red" if peer else "black")
    for m, c in COLORS.items():
        ax.scatter([], [], color=c, label=f"kernswap {m}")
    ax.scatter([], [], color="tab:red", marker="s", label="peers (torchao, llama.cpp)")
    ax.legend(fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("stored bits per weight of the quantized layers")
    ax.set_ylabel(f"perplexity vs fp32 (%, clipped at {a.ymax:g})")
    meta = q.get("meta", {})
    cpu = (meta.get("device") or {}).get("cpu", "")
    ax.set_title(f"SmolLM2-135M, {rows[0]['tokens'] if rows else '?'} predicted lee tokens (512-token windows), "
                 f"one run; {cpu}, git {str(meta.get('git_sha', ''))[:7]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
