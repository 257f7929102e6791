"""Fused mixture-of-experts (issue 5): kernswap's fused experts vs transformers' own MoE block.

Run through ``bench/run.py`` (``--only moe``). Layers (fp32 hidden states, 2 threads by default):
- Mixtral-like:   E=8,   top 2, H=1024, I=2816 (MixtralSparseMoeBlock)
- Qwen3-MoE-like: E=128, top 8, H=1024, I=384  (Qwen3MoeSparseMoeBlock, norm_topk_prob=True)
at 1, 16, 512 and 4096 tokens, hot weights. Rows per case:
- transformers block with each experts implementation it offers on the CPU (eager, grouped_mm, batched_mm;
  batched_mm is skipped where its per-pair weight copies would exceed 2 GiB);
- kernswap: the same block with its experts swapped for kernswap.nn.FusedExperts (the patch rule's swap),
  float fp32, and W8A8 / int4 (group 128) experts; plus the standalone op kernswap.ops.fused_moe (C++ routing).
Each row is verified first (fp32 rows against the pure-PyTorch reference of the same routing, quantized rows
against the reference of the same quantized format), then timed. Each row carries the roofline floor:
max(expert weight bytes touched / measured DRAM bandwidth, flops / measured peak) with the fp32 peak
(torch.mm) or, for the int8 formats, the int8 peak (best of torch._int_mm and kernswap's W8A8 GEMM);
``floor_frac`` = floor / p50. --quick: tiny layers, seconds (smoke test, numbers meaningless).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

NAME = "moe"
OP = "moe"
LAYERS = {"mixtral": dict(E=8, k=2, H=1024, I=2816), "qwen3_moe": dict(E=128, k=8, H=1024, I=384)}
QUICK_LAYERS = {"mixtral": dict(E=8, k=2, H=128, I=96), "qwen3_moe": dict(E=16, k=4, H=128, I=64)}
TOKENS = [1, 16, 512, 4096]
QUICK_TOKENS = [1, 5, 33]
HF_IMPLS = ["eager", "grouped_mm", "batched_mm"]
KS_QUANT = ["w8a8", "int4"]
BATCHED_MM_LIMIT = 2 * 2**30
F32 = torch.float32


# ------------------------------------------------------------------------------------------------ peaks
def measure_peaks(ctx: H.Context) -> Dict[str, float]:
    """fp32 and int8 peak (GOP/s) with ctx.threads threads: best of a few large products."""
    n = 512 if ctx.quick else 2048

    def best(f, ops, reps=3):
        f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return ops / min(ts) / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = best(lambda: a @ b, 2.0 * n ** 3)
    int8 = 0.0
    try:
        ai = torch.randint(-127, 128, (n, n), dtype=torch.int8)
        int8 = best(lambda: torch._int_mm(ai, ai), 2.0 * n ** 3)
    except Exception:  # noqa: BLE001 - not every build has a CPU _int_mm
        pass
    try:
        import kernswap
        from kernswap.formats import quantize

        qw = quantize(torch.randn(n, n), "w8a8")
        int8 = max(int8, best(lambda: kernswap.ops.quantized_linear(a, qw), 2.0 * n ** 3))
    except Exception:  # noqa: BLE001
        pass
    peaks = {"fp32_gops": fp32, "int8_gops": int8 or fp32,
             "method": f"best of 3: torch.mm {n}^3 fp32; int8: max(torch._int_mm, kernswap W8A8 linear) {n}^3"}
    ctx.meta["peaks"] = peaks
    return peaks


# ------------------------------------------------------------------------------------------------ layers
def make_block(family: str, shape: Dict[str, int], seed: int):
    import transformers

    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = transformers.MixtralConfig(hidden_size=shape["H"], intermediate_size=shape["I"],
                                         num_local_experts=shape["E"], num_experts_per_tok=shape["k"])
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = transformers.Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"],
                                          num_experts=shape["E"], num_experts_per_tok=shape["k"],
                                          norm_topk_prob=True)
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = Block(cfg).eval()
    with torch.no_grad():
        block.gate.weight.normal_(0, 1.0 / shape["H"] ** 0.5)
        block.experts.gate_up_proj.normal_(0, 1.0 / shape["H"] ** 0.5)
        block.experts.down_proj.normal_(0, 1.0 / shape["I"] ** 0.5)
    for p in block.parameters():
        p.requires_grad_(False)
    return block, cfg


def swapped_block(block, quant: Optional[str]):
    """A second block object sharing the router, with its experts swapped for FusedExperts (float: shared
    Parameters; quantized: packed copies). The original block is left untouched."""
    from kernswap.nn import FusedExperts

    new = type(block).__new__(type(block))
    new.__dict__ = dict(block.__dict__)
    new._modules = dict(block._modules)
    new._modules["experts"] = FusedExperts.from_experts(block.experts, quant=quant)
    return new


def routing(block, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    _, w, ids = block.gate(x)
    return w, ids


def ref_output(block, fused, x: torch.Tensor) -> torch.Tensor:
    """kernswap's reference with the block's own routing: float weights, or the fused module's quantized ones."""
    from kernswap.reference.moe import fused_experts_ref

    w, ids = routing(block, x)
    wgu, wd = fused.weights() if fused is not None else (block.experts.gate_up_proj, block.experts.down_proj)
    return fused_experts_ref(x, w, ids, wgu, wd)


# ------------------------------------------------------------------------------------------------ impls
def impls_for(ctx: H.Context, family: str, block, cfg, shape: Dict[str, int]) -> List[H.Impl]:
    e, k, h, i = shape["E"], shape["k"], shape["H"], shape["I"]
    float_bytes = 3 * h * i * 4
    impls: List[H.Impl] = []

    def hf_call(name):
        def call(state, x):
            cfg._experts_implementation = name
            return block(x[None])[0]
        return call

    def hf_skip(name):
        def skip(case_shape, mode):
            pairs = case_shape["T"] * k
            if name == "batched_mm" and pairs * 3 * h * i * 4 > BATCHED_MM_LIMIT:
                return f"batched_mm copies {pairs} experts' weights (> {BATCHED_MM_LIMIT / 2**30:.0f} GiB)"
            if name == "eager" and not ctx.full and family == "qwen3_moe" and case_shape["T"] >= 4096:
                return "eager over 128 experts at 4096 tokens: several seconds per call (--full runs it)"
            return None
        return skip

    for name in HF_IMPLS:
        impls.append(H.Impl(name=f"transformers {name}", backend="torch", dtype=F32, build=lambda: None,
                            call=hf_call(name), clone=lambda s: s, oracle=lambda s, x: ref_output(block, None, x),
                            tol=1e-4, weight_bytes=lambda s: e * float_bytes, skip=hf_skip(name), fmt="float32"))
    try:
        import kernswap  # noqa: F401
    except Exception as ex:  # noqa: BLE001
        def fail(ex=ex):
            raise RuntimeError(f"kernswap not importable: {ex}")
        return impls + [H.Impl(name="kernswap", backend="cpu", dtype=F32, build=fail, call=None, clone=None,
                               oracle=None, tol=0, weight_bytes=lambda s: 0)]

    def ks_build(quant):
        return lambda: swapped_block(block, quant)

    def ks_bytes(state):
        fx = state.experts
        if fx.quant is None:
            return e * float_bytes
        return sum(b.numel() * b.element_size() for n, b in fx.named_buffers() if n != "qformat")

    impls.append(H.Impl(name="kernswap fused fp32", backend="cpu", dtype=F32, build=ks_build(None),
                        call=lambda s, x: s(x[None])[0], clone=lambda s: s,
                        oracle=lambda s, x: ref_output(block, None, x), tol=1e-4, weight_bytes=ks_bytes,
                        fmt="float32"))

    def op_call(state, x):
        from kernswap.ops import fused_moe

        logits = torch.nn.functional.linear(x, block.gate.weight)
        return fused_moe(x, logits, block.experts.gate_up_proj, block.experts.down_proj, k, renormalize=True)

    impls.append(H.Impl(name="kernswap fused_moe op fp32", backend="cpu", dtype=F32, build=lambda: None,
                        call=op_call, clone=lambda s: s, oracle=lambda s, x: ref_output(block, None, x), tol=1e-4,
                        weight_bytes=lambda s: e * float_bytes, fmt="float32"))
    for q in KS_QUANT:
        impls.append(H.Impl(name=f"kernswap fused {q}", backend="cpu", dtype=F32, build=ks_build(q),
                            call=lambda s, x: s(x[None])[0], clone=lambda s: s,
                            oracle=lambda s, x: ref_output(block, s.experts, x),
                            tol=1e-2 if q.startswith("w") else 1e-3, weight_bytes=ks_bytes, fmt=q))
    return impls


# --------------------------------------------------------------------------------------------- run
def run(ctx: H.Context) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    rows: List[Dict[str, Any]] = []
    layers = QUICK_LAYERS if ctx.quick else LAYERS
    tokens = QUICK_TOKENS if ctx.quick else TOKENS
    peaks = ctx.meta.get("peaks") or measure_peaks(ctx)
    ctx.log(f"[{NAME}] peaks: fp32 {peaks['fp32_gops']:.0f} GFLOP/s, int8 {peaks['int8_gops']:.0f} GOP/s")
    with torch.inference_mode():
        for li, (family, shape) in enumerate(layers.items()):
            ctx.log(f"[{NAME}] {family}: {shape}, tokens {tokens}")
            block, cfg = make_block(family, shape, seed=li)
            gen = torch.Generator().manual_seed(1000 + li)
            cases, hits = [], {}
            for t in tokens:
                x = torch.randn(t, shape["H"], generator=gen)
                _, ids = routing(block, x)
                hits[t] = int(ids.unique().numel())
                check = None if t <= 64 else torch.cat([torch.arange(32), torch.arange(t - 32, t)])
                flops = 2.0 * t * shape["k"] * 3 * shape["H"] * shape["I"]
                cases.append(H.Case({"layer": family, "T": t, "E": shape["E"], "top_k": shape["k"], "H": shape["H"],
                                     "I": shape["I"]}, "hot", x, flops=flops, check_rows=check))
            new = H.bench_impls(ctx, OP, impls_for(ctx, family, block, cfg, shape), cases)
            for r in new:
                _add_floor(ctx, r, hits[r["T"]], peaks)
            rows.extend(new)
            del block
    for fam in layers:
        for t in tokens:
            same = [r for r in rows if r["layer"] == fam and r["T"] == t]
            best = _best_hf(same)
            for r in same:
                r["baseline"] = "fastest transformers fp32"
                r["ratio"] = (best / r["p50"]) if (best and r["p50"]) else None
    return rows, targets(rows)


def _add_floor(ctx: H.Context, r: Dict[str, Any], hit: int, peaks: Dict[str, float]) -> None:
    """Expert weight bytes touched (experts hit x bytes per expert) / bandwidth vs flops / peak."""
    if not r["weight_bytes"]:
        return
    touched = r["weight_bytes"] / r["E"] * hit
    peak = peaks["int8_gops"] if r["format"] in ("w8a8", "w4a8") else peaks["fp32_gops"]
    flops = 2.0 * r["T"] * r["top_k"] * 3 * r["H"] * r["I"]
    mem_s = touched / (ctx.dram_gbps * 1e9) if ctx.dram_gbps else 0.0
    floor = max(mem_s, flops / (peak * 1e9))
    r.update(experts_hit=hit, bytes_touched=int(touched), floor_ms=floor * 1e3,
             floor_frac=(floor / r["p50"]) if r["p50"] else None, roofline_frac=None)
    if r["p50"]:
        r["roofline_frac"] = floor / r["p50"]


def _best_hf(rows) -> Optional[float]:
    vals = [r["p50"] for r in rows if r["impl"].startswith("transformers") and r["status"] == "ok" and r["p50"]]
    return min(vals) if vals else None


# ----------------------------------------------------------------------------------------- targets
def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 5: fp32 never slower than any transformers implementation, within 1.3x of the floor at the three
    smallest token counts; W8A8 at the third (512) >= 3x and int4 at 1 token >= 4x the fastest transformers fp32."""
    out = []
    grid = sorted({r["T"] for r in rows})
    for fam in dict.fromkeys(r["layer"] for r in rows):
        for t in grid:
            same = [r for r in rows if r["layer"] == fam and r["T"] == t]
            ks = {r["impl"]: r for r in same if r["impl"].startswith("kernswap") and r["status"] == "ok"}
            det = f"{fam} T={t}"
            f32 = ks.get("kernswap fused fp32")
            for r in same:
                if r["impl"].startswith("transformers") and r["status"] == "ok":
                    out.append(H.target(f"fp32 fused vs {r['impl']}", r["p50"] / f32["p50"] if f32 else None, 1.0,
                                        det))
            if t in grid[:3]:
                out.append(H.target("fp32 fused within 1.3x of the floor", f32 and f32["floor_frac"], 1 / 1.3, det,
                                    unit="%"))
            best = _best_hf(same)
            w8, i4 = ks.get("kernswap fused w8a8"), ks.get("kernswap fused int4")
            if len(grid) >= 3 and t == grid[2]:
                out.append(H.target("W8A8 vs fastest transformers fp32", best / w8["p50"] if best and w8 else None,
                                    3.0, det))
            if t == grid[0]:
                out.append(H.target("int4 1 token vs fastest transformers fp32",
                                    best / i4["p50"] if best and i4 else None, 4.0, det))
    return out


def print_results(rows: List[Dict[str, Any]], tgts: List[Dict[str, Any]], file: Any = None) -> None:
    cols = ["impl", "format", "p50", "p20", "p80", "ratio", "floor", "roofline_frac", "gops", "rel_err", "note"]
    for fam, t in dict.fromkeys((r["layer"], r["T"]) for r in rows):
        sub = [dict(r, floor=None if r.get("floor_ms") is None else f"{r['floor_ms']:.3f}",
                    note=(r["note"] if r["status"] == "ok" else f"{r['status'].upper()}: {r['note']}")[:60])
               for r in rows if (r["layer"], r["T"]) == (fam, t)]
        hit = next((r.get("experts_hit") for r in sub if r.get("experts_hit")), "?")
        s0 = sub[0]
        H.print_table(sub, cols, title=f"moe {fam} E={s0['E']} top{s0['top_k']} H={s0['H']} I={s0['I']}  T={t} "
                                       f"({hit} experts hit)   vs base = speed-up over the fastest transformers "
                                       f"fp32; floor ms; roof = floor / p50", file=file)
    H.print_targets(tgts, file=file)


# ------------------------------------------------------------------------------------------ self-check
def self_check() -> None:
    ctx = H.make_context(threads=1, quick=True, verbose=False)
    H.measure_bandwidth(ctx, repeats=2)
    rows, tgts = run(ctx)
    json.dumps({"rows": rows, "targets": tgts}, default=str)
    bad = [r for r in rows if r["status"] in ("wrong", "error")]
    assert not bad, [(r["impl"], r["layer"], r["T"], r["note"]) for r in bad]
    ks = [r for r in rows if r["impl"].startswith("kernswap")]
    assert ks and all(r["status"] == "ok" for r in ks), {r["impl"]: r["note"] for r in ks if r["status"] != "ok"}
    assert any(t["target"].startswith("int4 1 token") for t in tgts)
