"""Calibration-free scale choice (QuantConfig(method="mse")): per weight group (int4) or output row (int8), the scale
(and for asymmetric int4 the range) that minimises the squared rounding error of the group, instead of the one that
maps max|w| to the largest code (round-to-nearest, method="rtn").

Symmetric grids (codes -8..7 for int4, -127..127 for int8): candidates s = m / d for d on a grid around the RTN
divisor, of both signs (a negative scale maps the group's largest-magnitude value onto the longer, negative side of
the int4 code range, as llama.cpp's Q4_0 does; the packed format stores any float scale). Each candidate's codes are
then refitted once by least squares, s* = sum(w q) / sum(q q), the step llama.cpp's make_qx_quants takes; the best of
the refitted candidates wins. Asymmetric int4 (integer zero-point): candidates shrink the [min, max] range
symmetrically around its centre. Work is done in row chunks so memory stays bounded for any layer size.
"""
from typing import Optional, Tuple

import torch

__all__ = ["search_symmetric", "search_asymmetric", "check_method", "METHODS"]

METHODS = ("rtn", "mse", "gptq")
CALIBRATED = ("gptq",)  # methods that need calibration inputs (kernswap.calibration)
_CHUNK = 1 << 22  # weights per chunk (x candidates x 4 B of temporaries)
REFINE_ROUNDS = 3  # re-round / refit steps after the candidate search


def _chunks(n_groups: int, group: int, candidates: int):
    step = max(1, _CHUNK // max(1, group * candidates))
    for a in range(0, n_groups, step):
        yield a, min(n_groups, a + step)


def search_symmetric(wg: torch.Tensor, qmin: int, qmax: int, steps: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """wg: fp32 [G, L] (G groups of L values). Returns (scale [G], codes [G, L] in qmin..qmax): for each candidate
    scale s the codes clamp(round(w / s)), then the least-squares scale for those codes; the pair with the least
    sum((w - q * s)^2) wins. The round-to-nearest candidate (s = max|w| / qmax) is among them, so the error is never
    above RTN's. An all-zero group gets scale 0."""
    amax = wg.abs().amax(dim=1)
    div = torch.cat([torch.linspace(0.7 * qmax, 1.15 * qmax, steps, device=wg.device),
                     torch.tensor([float(qmax)], device=wg.device)])
    div = torch.cat([div, -div])  # both signs
    best_s = torch.zeros_like(amax)
    best_q = torch.zeros_like(wg)
    for a, b in _chunks(wg.shape[0], wg.shape[1], div.numel()):
        w = wg[a:b]
        inv = div[None, :] / torch.where(amax[a:b] > 0, amax[a:b], torch.ones_like(amax[a:b]))[:, None]  # 1 / s
        q = torch.clamp(torch.round(w[:, None, :] * inv[..., None]), qmin, qmax)   # [g, C, L]
        wq = torch.einsum("gl,gcl->gc", w, q)
        qq = torch.einsum("gcl,gcl->gc", q, q).clamp_min(1e-30)
        # with the least-squares scale s = wq / qq the error is sum(w^2) - wq^2 / qq: the largest wq^2 / qq wins
        i = (wq * wq / qq).argmax(dim=1, keepdim=True)
        best_s[a:b] = (wq.gather(1, i) / qq.gather(1, i)).squeeze(1)
        best_q[a:b] = q.gather(1, i[..., None].expand(-1, 1, w.shape[1])).squeeze(1)
    best_s, best_q = _refine(wg, best_s, best_q, qmin, qmax)
    zero = amax == 0
    return torch.where(zero, torch.zeros_like(best_s), best_s), torch.where(zero[:, None], 0.0, best_q)


def _refine(wg: torch.Tensor, s: torch.Tensor, q: torch.Tensor, qmin: int, qmax: int, rounds: int = REFINE_ROUNDS):
    """Alternate re-rounding the codes with the current scale and refitting the scale to them (Lloyd-style), per
    group; a step is kept only where it lowers the group's squared error, so the error never goes up."""
    err = ((wg - q * s[:, None]) ** 2).sum(1)
    for _ in range(rounds):
        safe = torch.where(s != 0, s, torch.ones_like(s))
        q2 = torch.clamp(torch.round(wg / safe[:, None]), qmin, qmax)
        qq = (q2 * q2).sum(1)
        s2 = torch.where(qq > 0, (wg * q2).sum(1) / qq.clamp_min(1e-30), s)
        err2 = ((wg - q2 * s2[:, None]) ** 2).sum(1)
        better = err2 < err
        s, q, err = torch.where(better, s2, s), torch.where(better[:, None], q2, q), torch.where(better, err2, err)
    return s, q


def search_asymmetric(wg: torch.Tensor, levels: int = 15, steps: int = 16
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wg: fp32 [G, L]. Returns (scale [G], integer zero-point [G] in 0..levels, codes [G, L] in 0..levels)
    minimising the squared error of w ~ (q - z) * s, q = clamp(round(w / s) + z, 0, levels), over ranges shrunk
    from [min(w, 0), max(w, 0)] (the unshrunk one is RTN's)."""
    mn = wg.amin(dim=1).clamp(max=0.0)
    mx = wg.amax(dim=1).clamp(min=0.0)
    shrink = torch.linspace(0.7, 1.0, steps, device=wg.device)
    best_s, best_z, best_q = torch.empty_like(mn), torch.empty_like(mn), torch.empty_like(wg)
    for a, b in _chunks(wg.shape[0], wg.shape[1], steps):
        w = wg[a:b]
        lo, hi = mn[a:b, None] * shrink, mx[a:b, None] * shrink                # [g, C]
        s = (hi - lo) / levels
        safe = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo / safe), 0, levels)
        q = torch.clamp(torch.round(w[:, None, :] / safe[..., None]) + z[..., None], 0, levels)
        err = ((w[:, None, :] - (q - z[..., None]) * s[..., None]) ** 2).sum(-1)
        i = err.argmin(dim=1, keepdim=True)
        best_s[a:b] = s.gather(1, i).squeeze(1)
        best_z[a:b] = z.gather(1, i).squeeze(1)
        best_q[a:b] = q.gather(1, i[..., None].expand(-1, 1, w.shape[1])).squeeze(1)
    return best_s, best_z, best_q


def check_method(method: Optional[str], where: str) -> str:
    """For the calibration-free quantizers (quantize_int8 / quantize_int4)."""
    if method not in ("rtn", "mse"):
        raise ValueError(f"{where}: method must be 'rtn' or 'mse' (calibrated methods go through "
                         f"kernswap.formats.quantize with a Hessian), got {method!r}")
    return method
