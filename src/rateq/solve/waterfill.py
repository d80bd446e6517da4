"""Reverse waterfilling on fitted exponential curves — the RateQuant allocation, kept as a method and a baseline.

1. Fit `D(b) = α·β^(−b)` to every unit's measured points, separately per quantizer (least squares on
   `log D = log α − b·log β`; one quantizer's β is never used for another, which RateQuant reports inverts the
   allocation).
2. With cost `a·b + e` effective bits per element (code bits plus metadata, affine in b for every spec) and
   Lagrange multiplier λ, a unit's best real-valued width is where its distortion slope meets the water level:
   `α·ln β·β^(−b) = λ·w·a`, i.e. `b = log_β(α·ln β / (λ·w·a))`, clipped to the unit's allowed range; each unit
   takes the quantizer whose Lagrangian `D + λ·w·cost` is lowest. Bisection on λ meets the budget.
3. Round every width down to an allowed one (for uniform grids the cost line is exact, so the budget still
   holds; where it is only a fit, units step down further until it does), then spend what is left greedily
   on the upgrades with the best fitted distortion drop per bit.

The plan's reported distortion is read from the measured curves, like every other method's, so methods
compare on the same scale; the fitted-model prediction is reported beside it.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..errors import RateQError
from ..quant.spec import FULL_PRECISION_BITS
from .problem import BUDGET_RTOL, Problem

_TINY = 1e-300


def fit_exponential(problem: Problem) -> tuple[np.ndarray, np.ndarray, float]:
    """`(N, Q)` α and k = ln β of every unit and quantizer, and the RMS log residual of the fit.

    Points with zero distortion carry no slope information and are left out. A curve with one usable point
    borrows its quantizer's median k; one that does not fall with bits (k ≤ 0) is flat (k = 0): any bit
    beyond the minimum buys nothing.
    """
    curves = problem.curves
    L, H = curves.model.num_layers, curves.model.num_kv_heads
    Q, NB = len(curves.quantizers), len(curves.bits)
    d = curves.distortion.reshape(L * H * 2, Q, NB).numpy()  # (N, Q, NB)
    x = np.broadcast_to(np.array(curves.bits, dtype=np.float64), d.shape)
    m = np.isfinite(d) & (d > _TINY) & (x < FULL_PRECISION_BITS)  # +inf: a role the quantizer cannot hold
    y = np.log(np.where(m, d, 1.0))
    n = m.sum(-1)
    sx, sy = (m * x).sum(-1), (m * y).sum(-1)
    sxx, sxy = (m * x * x).sum(-1), (m * x * y).sum(-1)
    den = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where((n >= 2) & (den > 0), (n * sxy - sx * sy) / np.where(den > 0, den, 1), np.nan)
    k = -slope  # (N, Q)
    for q in range(Q):
        good = np.isfinite(k[:, q]) & (k[:, q] > 0)
        k[~np.isfinite(k[:, q]), q] = float(np.median(k[good, q])) if good.any() else 0.0
    k = np.maximum(k, 0.0)
    # Intercept for the (possibly borrowed or clamped) slope: mean of log D + k·b over the usable points.
    with np.errstate(invalid="ignore"):
        log_a = np.where(n > 0, (sy + k * sx) / np.maximum(n, 1), -np.inf)
    alpha = np.where(n > 0, np.exp(log_a), 0.0)
    resid = np.where(m, y - (log_a[..., None] - k[..., None] * x), 0.0)
    rmse = float(np.sqrt((resid ** 2).sum() / max(int(m.sum()), 1)))
    return alpha, k, rmse


def solve_waterfill(problem: Problem) -> tuple[np.ndarray, dict]:
    if (problem.keys_at_least_values or problem.layer_budget is not None or problem.group is not None
            or problem.device_layers is not None):
        raise RateQError("waterfill allocates in closed form under one budget; use method='exact', 'greedy' or "
                         "'convex' for keys_at_least_values, per_layer_budget, tie or devices")
    curves = problem.curves
    N, C = problem.dist.shape
    Q, NB = len(curves.quantizers), len(curves.bits)
    w = problem.weight
    bits = np.array(curves.bits, dtype=np.float64)
    quantized = bits < FULL_PRECISION_BITS  # (NB,) the exponential model covers quantized widths only
    valid_q = problem.valid[:, :Q * NB].reshape(N, Q, NB) & quantized  # (N, Q, NB)
    slot_fp16 = problem.slot_bits >= FULL_PRECISION_BITS  # (C,)
    fp16_only = ~valid_q.any((1, 2))  # (N,) units pinned to fp16
    # fp16 has no place on an exponential curve: free units choose among quantized widths only.
    ignored_fp16 = bool((problem.valid[:, slot_fp16].any(1) & ~fp16_only).any())

    # Unit × quantizer allowed width range, and the affine cost a·b + e of each quantizer.
    has = valid_q.any(-1) & ~fp16_only[:, None]  # (N, Q)
    lo = np.where(has, np.where(valid_q, bits, np.inf).min(-1), np.nan)
    hi = np.where(has, np.where(valid_q, bits, -np.inf).max(-1), np.nan)
    cost = problem.slot_cost[:Q * NB].reshape(Q, NB)
    qb = bits[quantized]
    qc = cost[:, quantized]
    if len(qb) >= 2:
        # Least-squares line through each quantizer's costs: exact for uniform grids (b + metadata/G); for
        # specs whose metadata changes with b (integer zero-points, QJL's 1-bit stage) the rounding below
        # works on the true costs and repairs any excess.
        a = ((qb - qb.mean()) * (qc - qc.mean(1, keepdims=True))).sum(1) / ((qb - qb.mean()) ** 2).sum()
    else:
        a = np.ones(Q)
    a = np.maximum(a, 1e-6)  # (Q,) a width that costs nothing extra would be free: keep λ's price positive
    e = qc.mean(1) - a * qb.mean()
    alpha, k, rmse = fit_exponential(problem)
    const_cost = float(w[fp16_only].sum()) * FULL_PRECISION_BITS

    def allocate(lam: float):
        """Real-valued widths `(N,)`, quantizers `(N,)` and total cost at water level `lam`."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            b = np.log(k * alpha / (lam * w[:, None] * a[None, :])) / k
        b = np.where(np.isfinite(b), b, np.where((k > 0) & (alpha > 0) & (w[:, None] == 0), hi, lo))
        b = np.clip(b, lo, hi)
        lagr = alpha * np.exp(-k * b) + lam * w[:, None] * (a * b + e)
        q = np.argmin(np.where(has, lagr, np.inf), 1)  # (N,)
        bq = b[np.arange(N), q]
        total = float((w * (a[q] * bq + e[q]))[~fp16_only].sum()) + const_cost
        return bq, q, total

    limit = problem.budget * (1 + BUDGET_RTOL)
    lam_lo, lam_hi = 1e-30, 1e30  # cost(λ) falls as λ rises: find the smallest λ whose cost fits
    b_cont, q, total = allocate(lam_lo)
    if total <= limit:
        lam = lam_lo
    else:
        for _ in range(200):
            mid = np.sqrt(lam_lo * lam_hi)
            if allocate(mid)[2] <= limit:
                lam_hi = mid
            else:
                lam_lo = mid
            if lam_hi / lam_lo < 1 + 1e-12:
                break
        lam = lam_hi
        b_cont, q, total = allocate(lam)
    if total > limit:
        raise AssertionError("waterfilling found no water level within the budget")  # feasibility was checked

    # Round down to allowed widths; the cost only falls.
    choice = np.empty(N, dtype=np.int64)
    width_idx = np.empty(N, dtype=np.int64)
    for u in range(N):
        if fp16_only[u]:
            choice[u] = int(np.nonzero(problem.valid[u] & slot_fp16)[0][0])
            continue
        ok = np.nonzero(valid_q[u, q[u]] & (bits <= b_cont[u] + 1e-9))[0]
        width_idx[u] = ok[-1] if len(ok) else np.nonzero(valid_q[u, q[u]])[0][0]
        choice[u] = q[u] * NB + width_idx[u]
    room = limit - problem.total_cost(choice)
    fitted = lambda u, i: alpha[u, q[u]] * np.exp(-k[u, q[u]] * bits[i])  # noqa: E731
    repairs = 0
    if room < 0:
        # Only where the cost line was approximate: step units down, least fitted damage per bit saved first.
        while room < 0:
            best = None
            for u in np.nonzero(~fp16_only)[0]:
                down = np.nonzero(valid_q[u, q[u]] & (np.arange(NB) < width_idx[u]))[0]
                if len(down):
                    i = int(down[-1])
                    saved = w[u] * (cost[q[u], width_idx[u]] - cost[q[u], i])
                    if saved > 0:
                        loss = (fitted(u, i) - fitted(u, width_idx[u])) / saved
                        if best is None or loss < best[0]:
                            best = (loss, u, i, saved)
            if best is None:
                # Every unit at its lowest width of its quantizer: fall back to the cheapest slot of each unit.
                cheapest = np.argmin(np.where(problem.valid, problem.slot_cost[None, :], np.inf), 1)
                return cheapest, {"water_level": float(lam), "fallback": "cheapest", "fit_log_rmse": rmse}
            _, u, i, saved = best
            width_idx[u] = i
            choice[u] = q[u] * NB + i
            room += saved
            repairs += 1

    # Spend the rest on the best fitted distortion drop per bit, one width up at a time, same quantizer.

    def next_up(u):
        up = np.nonzero(valid_q[u, q[u]] & (np.arange(NB) > width_idx[u]))[0]
        if not len(up):
            return None
        i = int(up[0])
        dc = w[u] * (cost[q[u], i] - cost[q[u], width_idx[u]])
        dd = fitted(u, width_idx[u]) - fitted(u, i)
        return (-(dd / dc) if dc > 0 else -np.inf, u, i, dc)

    heap = [item for u in range(N) if not fp16_only[u] and (item := next_up(u)) is not None]
    heapq.heapify(heap)
    upgrades = 0
    while heap:
        _, u, i, dc = heapq.heappop(heap)
        if dc > room:
            continue  # later widths of this unit cost even more
        room -= dc
        width_idx[u] = i
        choice[u] = q[u] * NB + i
        upgrades += 1
        if (item := next_up(u)) is not None:
            heapq.heappush(heap, item)

    betas = {curves.quantizers[i].id: float(np.exp(np.median(k[has[:, i], i]))) for i in range(Q) if has[:, i].any()}
    sel = ~fp16_only
    fit_pred = float(sum(fitted(u, width_idx[u]) for u in np.nonzero(sel)[0]))
    info = {"water_level": float(lam), "median_beta": betas, "fit_log_rmse": rmse,
            "fitted_distortion": fit_pred, "rounding_upgrades": upgrades}
    if repairs:
        info["rounding_downgrades"] = repairs
    if ignored_fp16:
        info["ignored_fp16"] = True
    return choice, info
