"""Block-sparse attention (issue 4): kernswap.ops.block_sparse_attention against torch's dense SDPA.

    python bench/run.py --only attention           # default grid: S 1k/4k prefill, 4k/16k decode (a few minutes)
    python bench/run.py --only attention --full    # + S 16k prefill, 64k decode and the SmolLM2 perplexity rows
    python bench/run.py --only attention --quick   # tiny shapes, seconds (numbers meaningless)
    python bench/bench_attention.py --quality      # + SmolLM2-135M perplexity at 2,048 tokens, dense vs sparse

Prefill: B=1, Hq=32, Hkv=8, D=128, causal, S in {1024, 4096, 16384}, fp32 and bf16; kernswap at densities
{5, 10, 25, 50, 100}% with dynamic top-k masks (1 sink block + 2 local blocks + best pooled scores, 64-token
blocks; the mask's build time is its own column, not in the op's time). Decode: one query against 4k-64k cached
keys, kernswap with 10% of the key blocks (chosen from cached per-block key means, included in the time) and
100%. The baseline, torch's SDPA, runs in the same process, interleaved with kernswap call by call (round
robin), so both see the same machine load; medians are reported. Every implementation is checked against the
reference before it is timed (prefill: the first and the last query blocks; decode: all rows).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(1, os.path.join(os.path.dirname(HERE), "python"))
import harness as H  # noqa: E402

NAME = "attention"
DENSITIES = (0.05, 0.10, 0.25, 0.50, 1.00)
BS = 64
F32, BF16 = torch.float32, torch.bfloat16


def grid(ctx: H.Context) -> Dict[str, Any]:
    if ctx.quick:
        return dict(heads=(4, 2, 64), prefill=[256], decode=[1024], dtypes=[F32], rounds=2, densities=(0.25, 1.0))
    if not ctx.full:  # the main job stays near 10 minutes on a 2-core machine: 16k prefill and 64k decode in --full
        return dict(heads=(32, 8, 128), prefill=[1024, 4096], decode=[4096, 16384], dtypes=[F32, BF16], rounds=5,
                    densities=DENSITIES)
    return dict(heads=(32, 8, 128), prefill=[1024, 4096, 16384], decode=[4096, 16384, 65536],
                dtypes=[F32, BF16], rounds=5, densities=DENSITIES)


def _sdpa(q, k, v, causal=True):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _ref_rows(q, k, v, mask, rows: slice, causal_offset_keys: int):
    """Reference output (fp32) for query rows ``rows`` (whole query blocks) against the first
    ``causal_offset_keys`` keys (queries aligned to the end of those keys)."""
    from kernswap.reference.block_sparse_attention import block_sparse_attention_ref

    qb = slice(rows.start // BS, -(-rows.stop // BS))
    kk, vv = k[:, :, :causal_offset_keys], v[:, :, :causal_offset_keys]
    m = mask[:, :, qb, : -(-causal_offset_keys // BS)]
    return block_sparse_attention_ref(q[:, :, rows], kk, vv, m, BS, True, q.shape[-1] ** -0.5)[0]


def _verify(out, q, k, v, mask, tol) -> float:
    s = q.shape[2]
    first = _ref_rows(q, k, v, mask, slice(0, BS), BS)
    last = _ref_rows(q, k, v, mask, slice(s - BS, s), k.shape[2])
    err = max(H.rel_error(out[:, :, :BS], first), H.rel_error(out[:, :, s - BS:], last))
    if not err <= tol:
        raise AssertionError(f"rel_err {err:.3g} > tol {tol:g}")
    return err


def interleaved(ctx: H.Context, calls: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    """Round-robin timing: every round calls each implementation once (after one warm-up round)."""
    for f in calls.values():
        f()
    samples: Dict[str, List[float]] = {n: [] for n in calls}
    for _ in range(rounds):
        for n, f in calls.items():
            t0 = time.perf_counter()
            f()
            samples[n].append(time.perf_counter() - t0)
    return samples


def _row(ctx, phase, impl, dtype, shape, density, samples, flops=None, **extra) -> Dict[str, Any]:
    row = {"op": "attention", "phase": phase, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
           "density": density, "status": "ok", "ratio": None, "need": None, "note": "",
           "device": "{cpu}, {cores} cores, {threads} threads".format(**ctx.meta["device"]),
           "kernswap": ctx.meta["kernswap"], "torch": ctx.meta["torch"], "git_sha": ctx.meta["git_sha"]}
    row.update(shape)
    row.update(H.percentiles(samples))
    row["samples"] = len(samples)
    if flops:
        row["gflops"] = round(flops / row["p50"] / 1e9, 1)
    row.update({k: (round(v, 3) if isinstance(v, float) and k != "rel_err" else v) for k, v in extra.items()})
    return row


def _causal_flops(hq, s, d, density=1.0):
    return 4.0 * hq * d * s * (s + 1) / 2 * density


# ----------------------------------------------------------------------------------------------- prefill
def prefill(ctx: H.Context, g: Dict[str, Any]) -> List[Dict[str, Any]]:
    from kernswap import ops, sparse

    hq, hkv, d = g["heads"]
    rows = []
    for dtype in g["dtypes"]:
        for s in g["prefill"]:
            gen = torch.Generator().manual_seed(s)
            q, k, v = (torch.randn(1, h, s, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
            shape = {"B": 1, "Hq": hq, "Hkv": hkv, "D": d, "Sq": s, "Sk": s}
            tol = 2e-3 if dtype == F32 else 3e-2
            calls, meta = {"sdpa": lambda: _sdpa(q, k, v)}, {}
            dense_mask = sparse.causal_block_mask(s, s, BS)
            _verify(_sdpa(q, k, v), q, k, v, dense_mask, tol)
            for dens in g["densities"]:
                t0 = time.perf_counter()
                mask = dense_mask if dens == 1.0 else sparse.topk_block_mask(q, k, BS, density=dens)
                build = time.perf_counter() - t0
                real = sparse.block_mask_density(mask, s, s, BS)
                out = ops.block_sparse_attention(q, k, v, mask, block_size=BS)
                err = _verify(out, q, k, v, mask, tol)
                calls[f"kernswap d={dens:g}"] = (lambda m=mask: ops.block_sparse_attention(q, k, v, m, block_size=BS))
                meta[f"kernswap d={dens:g}"] = dict(density=real, mask_ms=build * 1e3, rel_err=err, target=dens)
            ctx.log(f"[{NAME}] prefill S={s} {dtype}: timing {len(calls)} impls")
            rounds = g["rounds"] if s <= 4096 else max(2, g["rounds"] // 2)
            samples = interleaved(ctx, calls, rounds)
            base = H.percentiles(samples["sdpa"])["p50"]
            rows.append(_row(ctx, "prefill", "sdpa (dense causal)", dtype, shape, 1.0, samples["sdpa"],
                             _causal_flops(hq, s, d)))
            for name, m in meta.items():
                r = _row(ctx, "prefill", name, dtype, shape, m["density"], samples[name],
                         _causal_flops(hq, s, d, m["density"]), mask_ms=m["mask_ms"], rel_err=m["rel_err"])
                r["ratio"] = base / r["p50"]
                # targets: >= 0.9x SDPA at 100%; time <= (d + 0.1) x SDPA at S >= 4096
                r["need"] = 0.9 if m["target"] == 1.0 else (1.0 / (m["target"] + 0.1) if s >= 4096 else None)
                rows.append(r)
            del q, k, v
    return rows


# ------------------------------------------------------------------------------------------------ decode
def decode(ctx: H.Context, g: Dict[str, Any]) -> List[Dict[str, Any]]:
    from kernswap import ops, sparse
    from kernswap.reference.block_sparse_attention import block_sparse_attention_ref

    hq, hkv, d = g["heads"]
    rows = []
    for dtype in g["dtypes"]:
        for sk in g["decode"]:
            gen = torch.Generator().manual_seed(sk + 1)
            q = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
            k, v = (torch.randn(1, hkv, sk, d, generator=gen).to(dtype) for _ in range(2))
            pooled = sparse.pool_key_blocks(k, BS)  # kept per layer as the cache grows (see nn/sparse_attention)
            shape = {"B": 1, "Hq": hq, "Hkv": hkv, "D": d, "Sq": 1, "Sk": sk}
            tol = 2e-3 if dtype == F32 else 3e-2

            def sparse_step(dens):
                m = sparse.topk_block_mask(q, None, BS, density=dens, pooled_k=pooled, sk=sk, per_kv_head=True)
                return ops.block_sparse_attention(q, k, v, m, block_size=BS)

            calls = {"sdpa": lambda: _sdpa(q, k, v, causal=False)}
            errs = {}
            full = torch.ones(1, 1, 1, -(-sk // BS), dtype=torch.bool)
            for dens in (0.1, 1.0):
                m = sparse.topk_block_mask(q, None, BS, density=dens, pooled_k=pooled, sk=sk, per_kv_head=True)
                ref = block_sparse_attention_ref(q, k, v, m, BS, True, d ** -0.5)[0]
                errs[dens] = H.rel_error(sparse_step(dens), ref)
                assert errs[dens] <= tol, (sk, dens, errs[dens])
                calls[f"kernswap d={dens:g}"] = (lambda dd=dens: sparse_step(dd))
            ref = block_sparse_attention_ref(q, k, v, full, BS, True, d ** -0.5)[0]
            assert H.rel_error(_sdpa(q, k, v, causal=False), ref) <= tol
            ctx.log(f"[{NAME}] decode Sk={sk} {dtype}")
            samples = interleaved(ctx, calls, max(3, g["rounds"] * 4))
            base = H.percentiles(samples["sdpa"])["p50"]
            kv_bytes = 2 * k.numel() * k.element_size()
            rows.append(_row(ctx, "decode", "sdpa (full cache)", dtype, shape, 1.0, samples["sdpa"],
                             kv_gbps=round(kv_bytes / base / 1e9, 2)))
            for dens in (0.1, 1.0):
                name = f"kernswap d={dens:g}"
                r = _row(ctx, "decode", name, dtype, shape, dens, samples[name], rel_err=errs[dens])
                r["ratio"] = base / r["p50"]
                r["kv_gbps"] = round(kv_bytes * dens / r["p50"] / 1e9, 2)
                r["need"] = 5.0 if (dens == 0.1 and sk >= 65536) else None
                rows.append(r)
            del q, k, v, pooled
    return rows


# ------------------------------------------------------------------------------------------------ quality
def quality(ctx: H.Context, window: int = 2048, windows: int = 4) -> List[Dict[str, Any]]:
    """SmolLM2-135M perplexity on lee_background at ``window`` tokens: dense SDPA vs sparse at 50% / 25%."""
    import kernswap
    from kernswap import SparseAttentionConfig
    from kernswap.testing import lee_corpus_text, load_smollm2, load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    ids = torch.tensor([tok(lee_corpus_text())["input_ids"][: window * windows]])
    rows = []
    results = {}
    for name, dens in (("dense", None), ("sparse d=0.5", 0.5), ("sparse d=0.25", 0.25)):
        model = load_smollm2()
        if dens is not None:
            kernswap.patch(model, attention=SparseAttentionConfig(density=dens, min_seq_len=0), progress=False)
        nll_all, nll_late, n_all, n_late = 0.0, 0.0, 0, 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for w in range(windows):
                x = ids[:, w * window:(w + 1) * window]
                logp = F.log_softmax(model(x, use_cache=False).logits[:, :-1].float(), dim=-1)
                nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1))[0, :, 0]
                nll_all += float(nll.sum())
                n_all += nll.numel()
                nll_late += float(nll[window // 2:].sum())
                n_late += nll[window // 2:].numel()
        results[name] = (math.exp(nll_all / n_all), math.exp(nll_late / n_late))
        ctx.log(f"[{NAME}] quality {name}: ppl {results[name][0]:.3f} ({time.perf_counter() - t0:.0f} s)")
        del model
    d_all, d_late = results["dense"]
    for name, (p_all, p_late) in results.items():
        rows.append({"op": "attention", "phase": "quality", "impl": name, "window": window, "windows": windows,
                     "ppl": p_all, "ppl_second_half": p_late, "dppl_pct": 100 * (p_all / d_all - 1),
                     "dppl_second_half_pct": 100 * (p_late / d_late - 1), "status": "ok"})
    return rows


# -------------------------------------------------------------------------------------------- suite API
def run(ctx: H.Context, with_quality: Optional[bool] = None) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    g = grid(ctx)
    with torch.inference_mode():
        rows = prefill(ctx, g) + decode(ctx, g)
    if with_quality if with_quality is not None else ctx.full:  # SmolLM2 perplexity rows: --full (or --quality)
        from kernswap.testing import SkipReason

        try:
            rows += quality(ctx)
        except SkipReason as e:  # the real model / corpus packages are not installed: no quality rows
            print(f"[{NAME}] quality skipped: {e}", file=sys.stderr)
    return rows, targets(rows)


def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("need") is not None:
            det = f"{r['phase']} S={r['Sk']} {r['dtype']} {r['impl']} (density {r['density']:.2f})"
            out.append(H.target(f"{r['phase']} vs SDPA", r["ratio"], r["need"], det))
    for r in rows:
        if r.get("phase") == "quality" and r["impl"] == "sparse d=0.5":
            # Δppl <= 3% at 50% density, written as a ratio >= 1: 1.03 / (ppl / dense ppl)
            out.append(H.target("SmolLM2 ppl at 2048, density 50%: (1.03) / (ppl ratio)",
                                1.03 / (1 + r["dppl_pct"] / 100), 1.0, f"Δppl {r['dppl_pct']:+.2f}%"))
    return out


def print_results(rows: List[Dict[str, Any]], tgts: List[Dict[str, Any]], file: Any = None) -> None:
    for phase, cols in (("prefill", ["impl", "dtype", "Sk", "density", "p50", "p20", "p80", "ratio", "gflops",
                                     "mask_ms", "rel_err"]),
                        ("decode", ["impl", "dtype", "Sk", "density", "p50", "p20", "p80", "ratio", "kv_gbps",
                                    "rel_err"]),
                        ("quality", ["impl", "ppl", "dppl_pct", "ppl_second_half", "dppl_second_half_pct"])):
        sub = [r for r in rows if r.get("phase") == phase]
        if sub:
            H.print_table(sub, cols, title=f"attention {phase} (ratio = SDPA time / this time, same run)",
                          file=file)
    H.print_targets(tgts, file=file)


def self_check() -> None:
    ctx = H.make_context(threads=1, quick=True, verbose=False)
    rows, tgts = run(ctx, with_quality=False)
    assert rows and all(r["status"] == "ok" and r["p50"] > 0 for r in rows)
    assert any(r["impl"].startswith("kernswap") and r["ratio"] for r in rows)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quality", action="store_true", help="only the SmolLM2 perplexity rows")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    ctx = H.make_context(threads=a.threads, quick=a.quick)
    t0 = time.perf_counter()
    if a.quality:
        rows = quality(ctx)
        tgts = targets(rows)
    else:
        rows, tgts = run(ctx)
    print_results(rows, tgts)
    if not a.quick:
        path = os.path.join(HERE, "results", f"{NAME}{'-quality' if a.quality else ''}-{H.machine_name(ctx)}.json")
        H.write_json(path, ctx, rows, tgts, NAME, time.perf_counter() - t0)
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
