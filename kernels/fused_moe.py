"""Triton kernels for kernswap's fused mixture-of-experts (SwiGLU experts with stacked float weights).

Grouped GEMM over block-aligned sorted (token, slot) pairs.  A pair p = t * top_k + slot (token t, routing
slot) belongs to expert topk_ids[t, slot].  The alignment (kernswap.backends.moe_triton.align or the CUDA
align kernel) lists the pairs sorted by expert in ``sorted_pair_ids`` and pads each expert's segment to a
multiple of BLOCK_M with the sentinel P = T * top_k; ``expert_offsets[e]`` is where expert e's padded
segment starts, ``expert_offsets[E]`` the padded total.  So every BLOCK_M rows of the sorted array belong
to exactly one expert.

* ``moe_gate_up_kernel``: program (row block, column block of I).  It finds its block's expert by a binary
  search over the offsets, gathers the hidden rows of its pairs (token = pair // top_k), multiplies them
  by that expert's gate rows [0, I) and up rows [I, 2I) of w_gate_up [E, 2I, H] and writes
  silu(gate) * up (fp32 epilogue, rounded to the activation dtype, like transformers' experts) into
  ``inter[pair, :]`` -- indexed by pair id, so no padded copy of the intermediate exists.
* ``moe_down_kernel``: program (row block, column block of H): inter rows of its pairs times w_down[e]
  [E, H, I], times the pair's routing weight, written to the fp32 ``pair_out[pair, :]``.
* ``moe_combine_kernel``: out[t] = sum over slots of pair_out[t * top_k + slot] (fp32, slot order),
  rounded once to the output dtype.  Deterministic: no atomics.

Padding rows (sentinel) are masked in every load and store.  Row blocks past the padded total (the grid
is sized by an upper bound, so no host synchronisation is needed) exit at once.  fp32 uses ieee dots;
fp16 / bf16 dot in their dtype with fp32 accumulation.  Tiles come from a small table keyed by the
average number of pairs per expert (decode: 16-row blocks, no padding blow-up with many small experts;
prefill: 64-row blocks).

The module imports without triton: ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from ._triton_common import HAS_TRITON, TRITON_IMPORT_ERROR, AOTVariant, tl, triton  # noqa: F401
from ._triton_common import PTR_TYPES as _DT

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "MoEKernelConfig", "pick_config", "max_padded_pairs",
           "max_row_blocks", "launch_fused_experts", "aot_variants"]


class MoEKernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Autotune-free table: (max average pairs per expert, fp16/bf16 config, fp32 config).  The first row whose bound
# is >= the average applies.  BLOCK_M is also the alignment block, so small experts pad to 16 rows, not 64.
_CONFIGS = (
    (16, MoEKernelConfig(16, 64, 64, 4, 4), MoEKernelConfig(16, 32, 32, 4, 3)),    # decode
    (48, MoEKernelConfig(32, 64, 64, 4, 4), MoEKernelConfig(32, 64, 32, 4, 3)),    # small batches / many experts
    (None, MoEKernelConfig(64, 128, 64, 8, 3), MoEKernelConfig(64, 64, 32, 4, 2)),  # prefill
)
COMBINE_BLOCK = 256  # hidden elements per combine program


def pick_config(num_pairs: int, num_experts: int, fp32: bool) -> MoEKernelConfig:
    """Tiles for num_pairs = T * top_k routed pairs over num_experts experts (no autotuning)."""
    avg = num_pairs / max(1, num_experts)
    for bound, cfg16, cfg32 in _CONFIGS:
        if bound is None or avg <= bound:
            return cfg32 if fp32 else cfg16
    raise AssertionError("unreachable")


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the block-padded total: every non-empty expert (at most min(E, P)) adds < block_m rows."""
    if num_pairs == 0:
        return 0
    return min(num_pairs * block_m, num_pairs + min(num_experts, num_pairs) * (block_m - 1))


def max_row_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return -(-max_padded_pairs(num_pairs, num_experts, block_m) // block_m)


if HAS_TRITON:

    @triton.jit
    def _block_expert(offsets_ptr, start, E, SEARCH_STEPS):
        """Expert e with offsets[e] <= start < offsets[e + 1] (start < offsets[E]); binary search."""
        lo = start * 0
        hi = lo + E
        for _ in range(0, SEARCH_STEPS):
            mid = (lo + hi) // 2
            le = tl.load(offsets_ptr + mid) <= start
            lo = tl.where(le, mid, lo)
            hi = tl.where(le, hi, mid)
        return lo

    @triton.jit
    def _mma(a, b, acc, FP32: tl.constexpr):
        if FP32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def moe_gate_up_kernel(
        x_ptr, w_ptr, inter_ptr, sorted_ptr, offsets_ptr,
        num_pairs, top_k, E, H, I, SEARCH_STEPS,
        stride_xm, stride_we, stride_wn, stride_im,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """inter[p, n] = silu(x[t] . w[e, n]) * (x[t] . w[e, I + n]) for the pairs p of this row block."""
        FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        start = pid_m * BLOCK_M
        if start >= tl.load(offsets_ptr + E):
            return
        e = _block_expert(offsets_ptr, start, E, SEARCH_STEPS)
        pairs = tl.load(sorted_ptr + start + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        tok = tl.where(valid, pairs, 0) // top_k
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xm
        w_gate = w_ptr + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        w_up = w_gate + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < H
            xt = tl.load(x_rows + k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
            wm = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(w_gate + k[:, None], mask=wm, other=0.0)
            wu = tl.load(w_up + k[:, None], mask=wm, other=0.0)
            acc_g = _mma(xt, wg, acc_g, FP32)
            acc_u = _mma(xt, wu, acc_u, FP32)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        dst = inter_ptr + pairs.to(tl.int64)[:, None] * stride_im + offs_n[None, :]
        tl.store(dst, h.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])

    @triton.jit
    def moe_down_kernel(
        inter_ptr, w_ptr, topk_w_ptr, out_ptr, sorted_ptr, offsets_ptr,
        num_pairs, E, H, I, SEARCH_STEPS,
        stride_im, stride_we, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """pair_out[p, n] = topk_w[p] * (inter[p] . w[e, n]) (fp32) for the pairs p of this row block."""
        FP32: tl.constexpr = inter_ptr.dtype.element_ty == tl.float32
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        start = pid_m * BLOCK_M
        if start >= tl.load(offsets_ptr + E):
            return
        e = _block_expert(offsets_ptr, start, E, SEARCH_STEPS)
        pairs = tl.load(sorted_ptr + start + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        safe = tl.where(valid, pairs, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = inter_ptr + safe[:, None] * stride_im
        w_cols = w_ptr + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < I
            at = tl.load(a_rows + k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(at, wt, acc, FP32)
        rw = tl.load(topk_w_ptr + safe, mask=valid, other=0.0)
        acc = acc * rw[:, None]
        dst = out_ptr + safe[:, None] * stride_om + offs_n[None, :]
        tl.store(dst, acc, mask=valid[:, None] & n_mask[None, :])

    @triton.jit
    def moe_combine_kernel(pair_ptr, ids_ptr, out_ptr, top_k, E, H, stride_pm, stride_om, BLOCK: tl.constexpr):
        """out[t, n] = sum over slots with an expert id in [0, E) of pair_out[t * top_k + slot, n], fp32 in
        slot order (a slot with another id -- e.g. E, "no expert" -- adds nothing; its row is never written)."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, top_k):
            eid = tl.load(ids_ptr + t * top_k + s)
            lim = tl.where((eid >= 0) & (eid < E), H, 0)
            acc += tl.load(pair_ptr + (t * top_k + s) * stride_pm + offs, mask=offs < lim, other=0.0)
        tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _search_steps(num_experts: int) -> int:
    return max(1, (num_experts - 1).bit_length())


def launch_fused_experts(hidden2d, topk_weights, topk_ids, sorted_pair_ids, expert_offsets, w_gate_up, w_down,
                         config: MoEKernelConfig):
    """out [T, H] in hidden2d.dtype from an alignment made with block_size == config.block_m.

    The backend validated the inputs: hidden2d [T, H] (unit stride along H), topk_weights fp32 and topk_ids
    int32 contiguous [T, top_k], sorted_pair_ids / expert_offsets int32 contiguous (offsets [E + 1], padded total <= the
    length of sorted_pair_ids), w_gate_up [E, 2I, H] and w_down [E, H, I] in hidden2d.dtype, unit stride
    along their last dimension.
    """
    import torch

    if not HAS_TRITON:
        raise RuntimeError(f"triton is not available: {TRITON_IMPORT_ERROR}")
    T, H = hidden2d.shape
    top_k = topk_ids.shape[1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    P = T * top_k
    dev = hidden2d.device
    out = torch.empty((T, H), dtype=hidden2d.dtype, device=dev)
    if T == 0 or H == 0:
        return out
    if I == 0 or top_k == 0:
        return out.zero_()
    cfg = config
    steps = _search_steps(E)
    blocks = min(max_row_blocks(P, E, cfg.block_m), sorted_pair_ids.numel() // cfg.block_m)
    inter = torch.empty((P, I), dtype=hidden2d.dtype, device=dev)
    pair_out = torch.empty((P, H), dtype=torch.float32, device=dev)  # rows of id-less pairs: never read
    if blocks > 0:
        moe_gate_up_kernel[(blocks, triton.cdiv(I, cfg.block_n))](
            hidden2d, w_gate_up, inter, sorted_pair_ids, expert_offsets,
            P, top_k, E, H, I, steps,
            hidden2d.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        moe_down_kernel[(blocks, triton.cdiv(H, cfg.block_n))](
            inter, w_down, topk_weights, pair_out, sorted_pair_ids, expert_offsets,
            P, E, H, I, steps,
            inter.stride(0), w_down.stride(0), w_down.stride(1), pair_out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    moe_combine_kernel[(T, triton.cdiv(H, COMBINE_BLOCK))](
        pair_out, topk_ids, out, top_k, E, H, pair_out.stride(0), out.stride(0), BLOCK=COMBINE_BLOCK)
    return out



def aot_variants(dtypes=("fp16", "bf16", "fp32")) -> Iterator[AOTVariant]:
    """Every (kernel, tiles, dtype) combination launch_fused_experts can use, for ahead-of-time compiles."""
    if not HAS_TRITON:
        return
    for dt in dtypes:
        for row in _CONFIGS:
            cfg = row[2] if dt == "fp32" else row[1]
            const = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            tiles = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
            sig = {"x_ptr": _DT[dt], "w_ptr": _DT[dt], "inter_ptr": _DT[dt], "sorted_ptr": "*i32",
                   "offsets_ptr": "*i32", "num_pairs": "i32", "top_k": "i32", "E": "i32", "H": "i32", "I": "i32",
                   "SEARCH_STEPS": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wn": "i32",
                   "stride_im": "i32"}
            sig.update({k: "constexpr" for k in const})
            yield AOTVariant(f"moe_gate_up[{dt},{tiles}]", moe_gate_up_kernel, sig, const, cfg.num_warps,
                             cfg.num_stages)
            sig = {"inter_ptr": _DT[dt], "w_ptr": _DT[dt], "topk_w_ptr": "*fp32", "out_ptr": "*fp32",
                   "sorted_ptr": "*i32", "offsets_ptr": "*i32", "num_pairs": "i32", "E": "i32", "H": "i32",
                   "I": "i32", "SEARCH_STEPS": "i32", "stride_im": "i32", "stride_we": "i32", "stride_wn": "i32",
                   "stride_om": "i32"}
            sig.update({k: "constexpr" for k in const})
            yield AOTVariant(f"moe_down[{dt},{tiles}]", moe_down_kernel, sig, const, cfg.num_warps, cfg.num_stages)
        yield AOTVariant(f"moe_combine[{dt}]", moe_combine_kernel,
                         {"pair_ptr": "*fp32", "ids_ptr": "*i32", "out_ptr": _DT[dt], "top_k": "i32", "E": "i32",
                          "H": "i32", "stride_pm": "i32",
                          "stride_om": "i32", "BLOCK": "constexpr"}, {"BLOCK": COMBINE_BLOCK}, 4, 1)
