"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each column's rounding error spread over the
columns not yet quantized through the inverse Hessian of the layer's inputs, so the layer's output error on the
calibration inputs, not the weight error, is what is kept small.

For W [N, K] and H = 2 X^T X / rows over the calibration inputs X [rows, K]: dead inputs (zero diagonal) are
dropped, H is dampened by ``damp`` x its mean diagonal, and the upper Cholesky factor U of H^-1 drives the updates:
column k's codes are rounded with its group's scale, err = (w_k - q_k s) / U[k, k], and w_j -= err U[k, j] for
j > k; lazily, a block of 128 columns at a time (the trailing columns get one matrix product per block). A group's
scale (and zero-point) is chosen when its first column comes up, from the weights as updated so far, by the same
error-minimising search as method="mse" with calibration (the error weighted by the inputs' mean squares).
QuantConfig(act_order=True) quantizes the columns loudest first with static group scales; groups stay contiguous,
so the packed format is unchanged either way.
"""
from typing import Optional, Tuple

import torch

from ..formats.scale_search import importance_of, search_asymmetric, search_float_zero, search_symmetric

__all__ = ["gptq_quantize"]

BLOCK = 128
DAMP = 0.01


def _group_params(w: torch.Tensor, bits: int, symmetric: bool, float_zero: bool = False,
                  weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scale [N], zero [N] or None) for the columns w [N, g] of one group (int8: one group, the whole row), the
    error weighted per column by ``weights`` [g] (the inputs' mean squares) when given."""
    c = None if weights is None else weights.reshape(1, -1).expand(w.shape[0], -1)
    if bits == 8:
        return search_symmetric(w, -127, 127, weights=c)[0], None
    if symmetric:
        return search_symmetric(w, -8, 7, weights=c)[0], None
    s, z, _ = (search_float_zero if float_zero else search_asymmetric)(w, weights=c)
    return s, z


def _codes(w: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    """The integer codes (int8: -127..127, int4 sym: -8..7, asym: 0..15) of column(s) w for scale s / zero z."""
    safe = torch.where(s != 0, s, torch.ones_like(s))
    if bits == 8:
        return torch.clamp(torch.round(w / safe), -127, 127)
    if z is None:
        return torch.clamp(torch.round(w / safe), -8, 7)
    return torch.clamp(torch.round(w / safe + z), 0, 15)  # z integer or float


def _dequant(q, s, z):
    return (q if z is None else q - z) * s


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  damp: float = DAMP, float_zero: bool = False, weighted_groups: bool = True,
                  act_order: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """w: float [N, K]; hessian: [K, K] (sum of x x^T over the calibration rows, any positive scaling). Returns
    (codes [N, K] float, scale [N, K // group], zero [N, K // group] or None) in the format's code ranges
    (int8 and symmetric int4 signed, asymmetric int4 0..15); int8 has one group (group_size = K). float_zero:
    asymmetric int4 with float zero-points (search_float_zero's group parameters). weighted_groups: each group's
    scale minimises the error weighted by its columns' input mean squares (the Hessian's diagonal), as method="mse"
    does with calibration. act_order: the columns are quantized in order of decreasing input mean square (the
    loudest first, while the most columns are left to absorb their errors), each with its group's scale chosen
    up front from the weights as given (static groups: the packed layout keeps contiguous groups)."""
    W = w.detach().to(torch.float64).clone()
    n, k = W.shape
    H = hessian.detach().to(torch.float64).clone()
    if H.shape != (k, k):
        raise ValueError(f"gptq_quantize: hessian must be [{k}, {k}], got {list(H.shape)}")
    imp = importance_of(H) if weighted_groups else None  # (before dampening: the inputs' own mean squares)
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = group_size if bits == 4 else k
    ng = k // g
    S = torch.zeros(n, ng, dtype=torch.float64)
    Z = torch.zeros(n, ng, dtype=torch.float64) if (bits == 4 and not symmetric) else None
    perm = None
    if act_order:  # static groups: every group's scale from the weights as given, then columns loudest first
        for gi in range(ng):
            sg, zg = _group_params(W[:, gi * g:(gi + 1) * g].float(), bits, symmetric, float_zero,
                                   None if imp is None else imp[gi * g:(gi + 1) * g])
            S[:, gi] = sg.double()
            if Z is not None:
                Z[:, gi] = zg.double()
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.diagonal(H).mean().clamp_min(1e-12))
    U = None
    for extra in (0.0, 0.1, 1.0):  # more dampening if the Cholesky factorisation fails (a near-singular H)
        try:
            Hd = H if extra == 0 else H + extra * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
            L = torch.linalg.cholesky(Hd)
            U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except RuntimeError:
            continue
    if U is None:
        raise RuntimeError("gptq_quantize: the inputs' Hessian is not positive definite even with dampening")
    Q = torch.zeros_like(W)
    s = z = None
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if perm is not None:  # act-order: column col is the original column perm[col], of its static group
                gi = int(perm[col]) // g
                s, z = S[:, gi], (None if Z is None else Z[:, gi])
            elif col % g == 0:  # a new group: its scale from the weights as updated so far
                gi = col // g
                grp = torch.cat([W1[:, i:], W[:, b1:]], dim=1)[:, :g]
                sg, zg = _group_params(grp.float(), bits, symmetric, float_zero,
                                       None if imp is None else imp[col:col + g])
                s, z = sg.double(), (None if zg is None else zg.double())
                S[:, gi] = s
                if Z is not None:
                    Z[:, gi] = z
            wc = W1[:, i]
            q = _codes(wc, s, z, bits)
            Q[:, col] = q
            err = (wc - _dequant(q, s, z)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    if perm is not None:  # codes back into the columns' own order
        Q = Q[:, torch.argsort(perm)]
    return Q.float(), S.float(), (None if Z is None else Z.float())
