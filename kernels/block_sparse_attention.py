"""Triton kernels for kernswap's block-sparse attention (see ops/block_sparse_attention.py for the semantics).

One FlashAttention-2-style forward kernel, ``bsa_fwd_kernel``, that visits only the kept key blocks:

* The backend compresses the block mask per (batch, head, query block) into ``counts`` (kept key blocks),
  ``n_full`` (how many of them need no element mask: entirely in the causal past of every row of the query
  block and entirely inside Sk) and ``indices`` (kept key-block numbers in increasing order). Blocks wholly in
  the causal future are dropped there, so the blocks that cross the diagonal (and the Sk tail block) are the
  last ``counts - n_full`` entries of the list.
* Grid (query tiles, B * Hq, splits). A program takes a BLOCK_M-row query tile (BLOCK_M divides block_size, so
  the tile lies in one query block), walks its kept key blocks in BLOCK_N sub-tiles (BLOCK_N divides
  block_size) with an fp32 online softmax (exp2, log2(e) folded into the scale), tl.dot for QK^T and PV, first
  the unmasked blocks, then the masked ones with the element mask (causal: key j visible to row i iff
  j <= i + Sk - Sq; keys >= Sk). GQA: query head h reads kv head h // group.
* Splits (flash-decoding, for Sq <= 16 with long Sk; the same configuration serves fp32 inputs and block sizes
  that are not a multiple of 64): program ``s`` of ``S`` takes entries [cnt*s//S, cnt*(s+1)//S) of its row's
  list and writes its normalised partial output (fp32) and lse; the launcher merges the partials with the
  log-sum-exp rule (torch ops). With one split the kernel writes the final output (in o_ptr's dtype) and lse.
* lse is the natural-log logsumexp of scale * q.k over attended keys; a row with none gets out = 0, lse = -inf.
* NaN / Inf policy: a row whose q row, or a visible key's k or v row, is non-finite gets NaN (out and lse);
  a key a row cannot see never reaches it. q rows are checked once (a non-finite row runs as zeros); the
  masked sub-tiles (where some rows do not see some keys) zero their non-finite k and v entries and flag the
  rows that see them; in unmasked sub-tiles every row sees every key, so a non-finite k or v shows in the
  row's own statistics (a NaN or +Inf score makes l NaN, a -Inf score is flagged, a non-finite v makes the
  accumulator non-finite), checked once at the end.

The module imports without triton: ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Tuple

from ._triton_common import HAS_TRITON, TRITON_IMPORT_ERROR, AOTVariant, tl, triton  # noqa: F401
from ._triton_common import PTR_TYPES as _DT

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "HEAD_DIMS", "KernelConfig", "pick_config", "pick_num_splits",
           "launch_block_sparse_attention", "aot_variants"]

HEAD_DIMS = (64, 128, 256)
DECODE_MAX_SQ = 16        # Sq up to this runs the split-KV (flash-decoding) configuration
LOG2E = 1.0 / math.log(2.0)


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split: bool    # split-KV configuration: fp32 partial outputs, merged by the launcher


# Autotune-free defaults per (dtype, head dim), checked by compiling for sm_90 and sm_80 (registers, spills,
# shared memory) but not yet timed on a GPU.
# fp16 / bf16 "main" tiles, for the usual block sizes (multiples of 64) and Sq > 16: 64-row query tiles (one
# wgmma warpgroup / four 16-row mma warps), 64-key sub-tiles, 3 stages.  Before sm_90 (255 registers a thread,
# no wgmma) D=128 takes 32-key sub-tiles and D=256 a single stage so that nothing spills; D=256 uses 8 warps.
_MAIN = {
    64: KernelConfig(64, 64, 4, 3, False),
    128: KernelConfig(64, 64, 4, 3, False),
    256: KernelConfig(64, 32, 8, 2, False),
}
_MAIN_PRE_SM90 = {
    128: KernelConfig(64, 32, 4, 3, False),
    256: KernelConfig(64, 32, 8, 1, False),
}
# fp16 / bf16 split configuration: 16-row query tiles (decode: Sq <= 16), memory-bound, so long key tiles and a
# pipeline.  The same kernel with 16-key tiles serves block sizes that are not a multiple of 64 (prefill or
# decode), so at most two split variants exist per (dtype, D).
_SPLIT = {
    64: KernelConfig(16, 64, 4, 3, True),
    128: KernelConfig(16, 64, 4, 3, True),
    256: KernelConfig(16, 64, 4, 2, True),
}
# fp32 inputs: ieee dots run on FMA units with their operands in registers; 16x16 tiles and no software
# pipeline are what compile without spills up to D=256 on sm_80 and sm_90.  Correctness first: fp32 attention
# on a GPU is not the fast path.  The output dtype is fp32 either way, so prefill and decode share one variant.
_FP32 = KernelConfig(16, 16, 4, 1, True)
_SMALL_BLOCK_N = 16
ARCHS = (90, 80)  # configuration families: sm_90 and newer, and before sm_90


def pick_config(dtype_name: str, head_dim: int, block_size: int, sq: int, arch: int = 90) -> KernelConfig:
    """Tiles for one call: dtype_name "fp16" / "bf16" / "fp32"; arch: compute capability as 10 * major + minor.
    BLOCK_M and BLOCK_N always divide block_size."""
    if dtype_name in ("fp32", "float32"):
        return _FP32
    if block_size % 64 == 0 and sq > DECODE_MAX_SQ:
        return (_MAIN_PRE_SM90.get(head_dim) if arch < 90 else None) or _MAIN[head_dim]
    cfg = _SPLIT[head_dim]
    if block_size % cfg.block_n != 0:
        cfg = cfg._replace(block_n=_SMALL_BLOCK_N)
    return cfg


def pick_num_splits(n_programs: int, n_kb: int, n_sm: int) -> int:
    """Key-block splits per (query tile, b, h): enough programs for ~2 waves of the SMs, at most one split per
    key block (a split's share of a row is a contiguous run of its kept list) and at most 64."""
    if n_programs >= n_sm or n_kb <= 1:
        return 1
    return max(1, min(-(-2 * n_sm // n_programs), n_kb, 64))


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _finite(x):
        return (x - x) == 0  # NaN for NaN and +-Inf

    @triton.jit
    def _bsa_tiles(acc, l_i, m_i, bad, q, k_base, v_base, idx_row, t_lo, t_hi, sub, block_size,
                   stride_kn, stride_vn, pos, p_last, Sk, causal, qk_scale,
                   MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   IEEE: tl.constexpr):
        """Online softmax over key sub-tiles t in [t_lo, t_hi) of the kept list (sub-tile t: key block
        idx_row[t // sub], part t % sub).  m_i is in log2 units of the scaled scores; bad (int32 per row): the
        row saw a non-finite key (see the module docstring)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for t in range(t_lo, t_hi):
            kb = tl.load(idx_row + t // sub)
            n0 = kb * block_size + (t % sub) * BLOCK_N
            # 64-bit scalar base, 32-bit offsets inside the sub-tile
            kt_ptrs = k_base + n0.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = v_base + n0.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                n = n0 + offs_n
                in_k = n < Sk
                # a sub-tile wholly in the causal future of every row of the tile adds nothing: skip its work
                if n0 <= p_last:
                    kt = tl.load(kt_ptrs, mask=in_k[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
                    k_ok = _finite(kt)
                    v_ok = _finite(v)
                    key_bad = (tl.min(k_ok.to(tl.int32), 0) == 0) | (tl.min(v_ok.to(tl.int32), 1) == 0)
                    kt = tl.where(k_ok, kt, 0.0)
                    v = tl.where(v_ok, v, 0.0)
                    qk = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
                    keep = in_k[None, :] & ((causal == 0) | (n[None, :] <= pos[:, None]))
                    bad = tl.maximum(bad, tl.max((keep & key_bad[None, :]).to(tl.int32), 1))
                    qk = tl.where(keep, qk, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(qk, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing visible yet
                    alpha = tl.math.exp2(m_i - m_safe)
                    p = tl.math.exp2(qk - m_safe[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
                    m_i = m_new
            else:
                kt = tl.load(kt_ptrs)
                qk = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
                bad = tl.maximum(bad, (tl.min(qk, 1) == float("-inf")).to(tl.int32))  # an Inf key p = 0 would drop
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(qk - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_ptrs)
                acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
                m_i = m_new
        return acc, l_i, m_i, bad

    @triton.jit
    def bsa_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cnt_ptr, full_ptr, idx_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, stride_os, stride_ls,
        Hq, group, Sq, Sk, block_size, causal, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        """out/lse for one (query tile, b * Hq + h, split).  o_ptr: [splits, B, Hq, Sq, D] contiguous (any float
        dtype), lse_ptr: [splits, B, Hq, Sq] fp32; cnt/full: [B', H', NQB] int32 and idx: [B', H', NQB, NKB]
        int32 (stride 0 over broadcast dims); qk_scale = scale * log2(e); causal: 0 / 1."""
        IEEE: tl.constexpr = q_ptr.dtype.element_ty == tl.float32
        # last query tiles first: under a causal mask they hold the most work
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        split = tl.program_id(2)
        n_split = tl.num_programs(2)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // group
        m0 = pid_m * BLOCK_M
        qb = m0 // block_size
        off = Sk - Sq

        row = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + qb
        cnt = tl.load(cnt_ptr + row)
        n_full = tl.load(full_ptr + row)
        idx_row = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_iq
        lo = cnt * split // n_split
        hi = cnt * (split + 1) // n_split
        sub = block_size // BLOCK_N

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        pos = offs_m + off
        p_last = tl.minimum(m0 + BLOCK_M, Sq) - 1 + off
        if causal == 0:
            p_last = Sk
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
        q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :],
                    mask=(offs_m < Sq)[:, None], other=0.0)
        q_ok = _finite(q)
        bad = (tl.min(q_ok.to(tl.int32), 1) == 0).to(tl.int32)  # a non-finite q row: poisoned, runs as zeros
        q = tl.where(q_ok, q, 0.0)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        acc, l_i, m_i, bad = _bsa_tiles(acc, l_i, m_i, bad, q, k_base, v_base, idx_row, lo * sub,
                                        tl.minimum(hi, n_full) * sub, sub, block_size, stride_kn, stride_vn, pos,
                                        p_last, Sk, causal, qk_scale, False, BLOCK_M, BLOCK_N, HEAD_DIM, IEEE)
        acc, l_i, m_i, bad = _bsa_tiles(acc, l_i, m_i, bad, q, k_base, v_base, idx_row,
                                        tl.maximum(lo, n_full) * sub, hi * sub, sub, block_size, stride_kn,
                                        stride_vn, pos, p_last, Sk, causal, qk_scale, True, BLOCK_M, BLOCK_N,
                                        HEAD_DIM, IEEE)
        poisoned = (bad > 0) | ~_finite(l_i) | (tl.min(_finite(acc).to(tl.int32), 1) == 0)

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        out = tl.where(poisoned[:, None], float("nan"), out)
        lse = tl.where(poisoned, float("nan"), lse)
        o_row = split.to(tl.int64) * stride_os + (pid_bh.to(tl.int64) * Sq + m0) * HEAD_DIM
        o_ptrs = o_ptr + o_row + tl.arange(0, BLOCK_M)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < Sq)[:, None])
        lse_ptrs = lse_ptr + split.to(tl.int64) * stride_ls + pid_bh.to(tl.int64) * Sq + offs_m
        tl.store(lse_ptrs, lse, mask=offs_m < Sq)


_N_SM = {}


def _arch(device) -> int:
    import torch

    if device.type != "cuda":
        return 90  # interpreter
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _num_sms(device) -> int:
    import torch

    if device.type != "cuda":
        return 8  # interpreter: small, so that the tests exercise several splits
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _N_SM:
        _N_SM[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _N_SM[i]


def launch_block_sparse_attention(q, k, v, counts, n_full, indices, block_size: int, causal: bool, scale: float,
                                  num_splits: Optional[int] = None,
                                  config: Optional[KernelConfig] = None) -> Tuple[object, object]:
    """(out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) fp32).  The backend validated the inputs: q/k/v with
    stride(-1) == 1, D in HEAD_DIMS; counts / n_full (B', H', NQB) int32 and indices (B', H', NQB, NKB) int32
    from the backend's mask compression (stride 0 over broadcast batch / head dims).
    num_splits: override the split count (split configurations only, i.e. Sq <= 16 or block_size % 64 != 0)."""
    import torch

    if not HAS_TRITON:
        raise RuntimeError(f"triton is not available: {TRITON_IMPORT_ERROR}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[q.dtype]
    cfg = config or pick_config(dt, D, block_size, Sq, _arch(dev))
    assert block_size % cfg.block_m == 0 and block_size % cfg.block_n == 0, (block_size, cfg)
    n_m = triton.cdiv(Sq, cfg.block_m)
    splits = 1
    if cfg.split:
        n_kb = indices.shape[-1]
        splits = num_splits if num_splits is not None else pick_num_splits(n_m * B * Hq, n_kb, _num_sms(dev))
        splits = max(1, min(int(splits), max(1, n_kb)))
    o_dtype = torch.float32 if cfg.split else q.dtype
    out = torch.empty((splits, B, Hq, Sq, D), dtype=o_dtype, device=dev)
    lse = torch.empty((splits, B, Hq, Sq), dtype=torch.float32, device=dev)
    grid = (n_m, B * Hq, splits)
    bsa_fwd_kernel[grid](
        q, k, v, out, lse, counts, n_full, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        counts.stride(0), counts.stride(1), indices.stride(0), indices.stride(1), indices.stride(2),
        out.stride(0), lse.stride(0),
        Hq, Hq // Hkv, Sq, Sk, block_size, int(bool(causal)), float(scale) * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits == 1:
        o = out[0]
        return (o if o.dtype == q.dtype else o.to(q.dtype)), lse[0]
    # log-sum-exp merge of the partials: lse = log sum_s exp(lse_s); out = sum_s exp(lse_s - lse) * out_s
    lse_all = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - torch.where(torch.isfinite(lse_all), lse_all, 0.0))  # exp(-inf) = 0 for empty splits
    o = torch.einsum("sbhm,sbhmd->bhmd", w, out)
    return o.to(q.dtype), lse_all



def _configs_for(dt: str, d: int):
    """Every distinct config pick_config can return for (dtype, D)."""
    seen = []
    for arch in ARCHS:
        for block_size in (64, 16, 32, 48):
            for sq in (DECODE_MAX_SQ + 1, 1):
                cfg = pick_config(dt, d, block_size, sq, arch)
                if cfg not in seen:
                    seen.append(cfg)
    return seen


def aot_variants(dtypes=("fp16", "bf16", "fp32")) -> Iterator[AOTVariant]:
    """Every (dtype, D, config) combination launch_block_sparse_attention can launch, for ahead-of-time
    compiles."""
    if not HAS_TRITON:
        return
    ints = ["stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
            "stride_vn", "stride_cb", "stride_ch", "stride_ib", "stride_ih", "stride_iq", "stride_os", "stride_ls",
            "Hq", "group", "Sq", "Sk", "block_size", "causal"]
    for dt in dtypes:
        for d in HEAD_DIMS:
            for cfg in _configs_for(dt, d):
                sig = {"q_ptr": _DT[dt], "k_ptr": _DT[dt], "v_ptr": _DT[dt],
                       "o_ptr": "*fp32" if cfg.split else _DT[dt], "lse_ptr": "*fp32", "cnt_ptr": "*i32",
                       "full_ptr": "*i32", "idx_ptr": "*i32"}
                sig.update({n: "i32" for n in ints})
                sig["qk_scale"] = "fp32"
                const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_DIM": d}
                sig.update({n: "constexpr" for n in const})
                kind = "split" if cfg.split else "fwd"
                name = f"bsa_{kind}[{dt},d{d},{cfg.block_m}x{cfg.block_n},w{cfg.num_warps}s{cfg.num_stages}]"
                yield AOTVariant(name, bsa_fwd_kernel, sig, const, cfg.num_warps, cfg.num_stages)

