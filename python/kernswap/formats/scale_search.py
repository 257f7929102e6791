"""Calibration-free scale choice (QuantConfig(method="mse")): per weight group (int4) or output row (int8), the scale
(and for asymmetric int4 the range) that minimises the squared rounding error of the group, instead of the one that
maps max|w| to the largest code (round-to-nearest, method="rtn").

Symmetric grids (codes -8..7 for int4, -127..127 for int8): candidates s = m / d for d on a grid around the RTN
divisor, of both signs (a negative scale maps the group's largest-magnitude value onto the longer, negative side of
the int4 code range, as llama.cpp's Q4_0 does; the packed format stores any float scale). Each candidate's codes are
then refitted once by least squares, s* = sum(w q) / sum(q q), the step llama.cpp's make_qx_quants takes; the best of
the refitted candidates wins. Asymmetric int4 (integer zero-point): candidates shrink the [min, max] range
symmetrically around its centre. Float zero-points (w = (q - z) * s, z any real: GGUF Q4_1's min-offset grid):
candidate steps around the RTN one (range / 15), the codes of each refitted by least squares in both the step and
the offset (a line fit of w on q), as llama.cpp's make_qkx quants do. Work is done in row chunks so memory stays bounded for any layer size.

Every search takes optional ``weights`` [G, L] (>= 0), the importance of each weight: then the error minimised is
sum(weights * (w - w_q)^2) and every least-squares fit is the weighted one. With calibration, method="mse" passes
the mean square of each input channel over the calibration inputs (the Hessian's diagonal, see
:func:`importance_of`), so a group's error is measured where the layer's inputs are large, i.e. on its output.
"""
from typing import Optional, Tuple

import torch

__all__ = ["search_symmetric", "search_asymmetric", "search_float_zero", "rtn_float_zero", "check_method", "METHODS",
           "importance_of", "group_weights"]

METHODS = ("rtn", "mse", "gptq", "awq")
CALIBRATED = ("gptq", "awq")  # methods that need calibration inputs (kernswap.calibration)
HESSIAN_METHODS = ("gptq", "mse")  # methods that read the layer inputs' Hessian when calibration is given
_CHUNK = 1 << 22  # weights per chunk (x candidates x 4 B of temporaries)
REFINE_ROUNDS = 3  # re-round / refit steps after the candidate search
SYM_STEPS = 16  # candidate divisors per sign for the symmetric grids (plus the RTN one)
IMPORTANCE_FLOOR = 1e-6  # of the mean: a dead input channel still keeps its weights from going anywhere


def importance_of(hessian: torch.Tensor) -> torch.Tensor:
    """Per input channel importance [K] (fp32, mean 1) from a layer inputs' second moment [K, K] or its diagonal
    [K] (the mean square of each input channel, up to a common factor), floored at IMPORTANCE_FLOOR of the mean."""
    d = (hessian if hessian.dim() == 1 else torch.diagonal(hessian)).to(torch.float64).clamp_min(0)
    mean = d.mean()
    if not bool(mean > 0):
        return torch.ones(d.shape[0], dtype=torch.float32, device=d.device)
    return (d / mean).clamp_min(IMPORTANCE_FLOOR).to(torch.float32)


def group_weights(importance: Optional[torch.Tensor], n: int, k: int, group: int) -> Optional[torch.Tensor]:
    """The [n * k / group, group] weights of the groups of an [n, k] weight (row by row, as the searches take them)
    for per-input-channel ``importance`` [k]; None stays None."""
    if importance is None:
        return None
    if importance.shape != (k,):
        raise ValueError(f"importance must be [in_features={k}], got {list(importance.shape)}")
    return importance.to(torch.float32).reshape(1, k // group, group).expand(n, k // group, group).reshape(-1, group)


def _wsum(x: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    """sum over the last dim of x, weighted by c (broadcast) when given."""
    return x.sum(-1) if c is None else (x * c).sum(-1)


def _chunks(n_groups: int, group: int, candidates: int):
    step = max(1, _CHUNK // max(1, group * candidates))
    for a in range(0, n_groups, step):
        yield a, min(n_groups, a + step)


def search_symmetric(wg: torch.Tensor, qmin: int, qmax: int, steps: int = SYM_STEPS,
                     weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
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
        c = None if weights is None else weights[a:b]
        inv = div[None, :] / torch.where(amax[a:b] > 0, amax[a:b], torch.ones_like(amax[a:b]))[:, None]  # 1 / s
        q = torch.mul(w[:, None, :], inv[..., None]).round_().clamp_(qmin, qmax)   # [g, C, L], one buffer
        # both sums as batched products over L: sum_l (w c)_l q_cl and sum_l c_l q_cl^2 (c = 1 unweighted)
        wq = torch.bmm(q, (w if c is None else w * c).unsqueeze(-1)).squeeze(-1)
        q.square_()  # the codes are re-made for the winner below: the buffer can hold their squares
        qq = (q.sum(-1) if c is None else torch.bmm(q, c.unsqueeze(-1)).squeeze(-1)).clamp_min(1e-30)
        # with the least-squares scale s = wq / qq the error is sum(w^2) - wq^2 / qq: the largest wq^2 / qq wins
        i = (wq * wq / qq).argmax(dim=1, keepdim=True)
        best_s[a:b] = (wq.gather(1, i) / qq.gather(1, i)).squeeze(1)
        best_q[a:b] = torch.mul(w, inv.gather(1, i)).round_().clamp_(qmin, qmax)
    best_s, best_q = _refine(wg, best_s, best_q, qmin, qmax, weights=weights)
    zero = amax == 0
    return torch.where(zero, torch.zeros_like(best_s), best_s), torch.where(zero[:, None], 0.0, best_q)


def _refine(wg: torch.Tensor, s: torch.Tensor, q: torch.Tensor, qmin: int, qmax: int, rounds: int = REFINE_ROUNDS,
            weights: Optional[torch.Tensor] = None):
    """Alternate re-rounding the codes with the current scale and refitting the scale to them (Lloyd-style), per
    group; a step is kept only where it lowers the group's squared error, so the error never goes up."""
    c = weights
    err = _wsum((wg - q * s[:, None]) ** 2, c)
    for _ in range(rounds):
        safe = torch.where(s != 0, s, torch.ones_like(s))
        q2 = torch.clamp(torch.round(wg / safe[:, None]), qmin, qmax)
        qq = _wsum(q2 * q2, c)
        s2 = torch.where(qq > 0, _wsum(wg * q2, c) / qq.clamp_min(1e-30), s)
        err2 = _wsum((wg - q2 * s2[:, None]) ** 2, c)
        better = err2 < err
        s, q, err = torch.where(better, s2, s), torch.where(better[:, None], q2, q), torch.where(better, err2, err)
    return s, q


def search_asymmetric(wg: torch.Tensor, levels: int = 15, steps: int = 16, weights: Optional[torch.Tensor] = None
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
        c = None if weights is None else weights[a:b, None, :]
        err = _wsum((w[:, None, :] - (q - z[..., None]) * s[..., None]) ** 2, c)
        i = err.argmin(dim=1, keepdim=True)
        best_s[a:b] = s.gather(1, i).squeeze(1)
        best_z[a:b] = z.gather(1, i).squeeze(1)
        best_q[a:b] = q.gather(1, i[..., None].expand(-1, 1, w.shape[1])).squeeze(1)
    return best_s, best_z, best_q


def rtn_float_zero(wg: torch.Tensor, levels: int = 15) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wg: fp32 [G, L]. Round to nearest on the group's own [min, max] (not widened to 0): scale (max - min) / levels,
    float zero-point -min / scale, codes round((w - min) / scale). Returns (scale, zero, codes), w ~ (q - zero) * s."""
    mn, mx = wg.amin(dim=1), wg.amax(dim=1)
    s = (mx - mn) / levels
    q = torch.clamp(torch.round((wg - mn[:, None]) / torch.where(s > 0, s, 1.0)[:, None]), 0, levels)
    return _float_zero_form(s, mn, q)


def _float_zero_form(s: torch.Tensor, m: torch.Tensor, q: torch.Tensor):
    """(scale, zero, codes) of w ~ q * s + m as w ~ (q - zero) * s. A group with s == 0 is constant (w = m): it
    becomes scale |m| / 8, zero -m / scale, codes 0 (or all zeros for m == 0)."""
    flat = s == 0
    s = torch.where(flat, m.abs() / 8, s)
    q = torch.where(flat[:, None], 0.0, q)
    z = torch.where(s != 0, -m / torch.where(s != 0, s, 1.0), torch.zeros_like(m))
    return s, z, q


def _line_fit(w: torch.Tensor, q: torch.Tensor, c: Optional[torch.Tensor] = None):
    """Least-squares (s, m) of w ~ q * s + m along the last dim (w [..., L], q [..., L]; weighted by c when given);
    s = 0, m = the (weighted) mean of w where the codes are all equal. Returns (s, m, squared error)."""
    n = w.shape[-1] if c is None else c.sum(-1)
    sq, sw = _wsum(q, c), _wsum(w, c)
    sqq, sqw = _wsum(q * q, c), _wsum(q * w, c)
    det = n * sqq - sq * sq
    ok = det > 0
    s = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, 1.0), 0.0)
    m = (sw - s * sq) / n
    err = _wsum((w - q * s[..., None] - m[..., None]) ** 2, c)
    return s, m, err


def search_float_zero(wg: torch.Tensor, levels: int = 15, steps: int = 8, rounds: int = REFINE_ROUNDS,
                      weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wg: fp32 [G, L]. Returns (scale [G], float zero-point [G], codes [G, L] in 0..levels) of least squared error
    among: RTN on [min, max], and for candidate steps (max - min) / d, d around levels, the codes
    clamp(round((w - min) / step)) refitted by a line fit (s, m); then re-round / refit steps, each kept per group
    only where it lowers the error. Never a larger group error than RTN's.

    The candidates' errors come from their normal equations (err = sum(w^2) - s sum(q w) - m sum(w) at the
    least-squares (s, m)), so per candidate only the codes and three sums over them are formed."""
    mn, mx = wg.amin(dim=1), wg.amax(dim=1)
    rng = mx - mn
    wn = wg - mn[:, None]                                          # >= 0; codes are round(wn / step)
    s, m = rng / levels, mn.clone()
    q = torch.clamp(torch.round(wn / torch.where(s > 0, s, 1.0)[:, None]), 0, levels)
    c = weights
    err = _wsum((wg - q * s[:, None] - m[:, None]) ** 2, c)      # RTN as stored (not refitted)
    div = torch.linspace(0.75 * levels, 1.25 * levels, steps, device=wg.device)
    n = wg.shape[1]
    sw, sww = _wsum(wg, c), _wsum(wg * wg, c)
    wc = wg if c is None else wg * c
    for a, b in _chunks(wg.shape[0], n, div.numel()):
        inv = div[None, :] / torch.where(rng[a:b] > 0, rng[a:b], 1.0)[:, None]             # [g, C]
        qc = torch.mul(wn[a:b, None, :], inv[..., None]).round_().clamp_(0, levels)        # [g, C, L]
        if c is None:
            cnt = n
            sq, sqq = qc.sum(-1), torch.einsum("gcl,gcl->gc", qc, qc)
        else:
            cnt = c[a:b].sum(-1, keepdim=True)
            sq, sqq = torch.einsum("gcl,gl->gc", qc, c[a:b]), torch.einsum("gcl,gcl->gc", qc * c[a:b, None, :], qc)
        sqw = torch.einsum("gcl,gl->gc", qc, wc[a:b])
        det = cnt * sqq - sq * sq
        ok = det > 0
        cs = torch.where(ok, (cnt * sqw - sq * sw[a:b, None]) / torch.where(ok, det, 1.0), 0.0)
        cm = (sw[a:b, None] - cs * sq) / cnt
        ce = (sww[a:b, None] - cs * sqw - cm * sw[a:b, None]).clamp_min(0)
        ce = torch.where(ok & (cs > 0), ce, torch.inf)
        i = ce.argmin(dim=1, keepdim=True)
        e = ce.gather(1, i).squeeze(1)
        # the closed form loses precision where the error is tiny next to sum(w^2): re-measure the winner directly
        qi = qc.gather(1, i[..., None].expand(-1, 1, n)).squeeze(1)
        si, mi = cs.gather(1, i).squeeze(1), cm.gather(1, i).squeeze(1)
        e = torch.where(torch.isfinite(e), _wsum((wg[a:b] - qi * si[:, None] - mi[:, None]) ** 2,
                                                 None if c is None else c[a:b]), e)
        better = e < err[a:b]
        s[a:b] = torch.where(better, si, s[a:b])
        m[a:b] = torch.where(better, mi, m[a:b])
        q[a:b] = torch.where(better[:, None], qi, q[a:b])
        err[a:b] = torch.where(better, e, err[a:b])
    for _ in range(rounds):
        safe = torch.where(s != 0, s, 1.0)
        q2 = torch.clamp(torch.round((wg - m[:, None]) / safe[:, None]), 0, levels)
        s2, m2, err2 = _line_fit(wg, q2, c)
        better = (err2 < err) & (s2 > 0)
        s, m, q, err = (torch.where(better, s2, s), torch.where(better, m2, m), torch.where(better[:, None], q2, q),
                        torch.where(better, err2, err))
    return _float_zero_form(s, m, q)


def check_method(method: Optional[str], where: str, importance: Optional[torch.Tensor] = None) -> str:
    """For the calibration-free quantizers (quantize_int8 / quantize_int4); importance goes with "mse" only."""
    if method not in ("rtn", "mse"):
        raise ValueError(f"{where}: method must be 'rtn' or 'mse' (calibrated methods go through "
                         f"kernswap.formats.quantize with a Hessian), got {method!r}")
    if importance is not None:
        if method != "mse":
            raise ValueError(f"{where}: importance weights the error of method='mse', got method={method!r}")
        if not isinstance(importance, torch.Tensor) or importance.dim() != 1 or not importance.dtype.is_floating_point:
            raise TypeError(f"{where}: importance must be a 1-D float tensor (one weight per input channel), got "
                            f"{type(importance).__name__}"
                            + (f" {importance.dtype} {list(importance.shape)}" if isinstance(importance, torch.Tensor)
                               else ""))
    return method
