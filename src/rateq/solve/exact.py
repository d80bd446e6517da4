"""Exact multiple-choice knapsack: a Lagrangian core, then a Pareto dynamic programme or a MILP (HiGHS).

Everything works on tied groups (`problem`: one unit each unless tied), which take one slot together.

**Core.** Dualising the budget row with the LP relaxation's multiplier λ (read off the greedy hull order)
gives, for any plan x within budget, `D(x) ≥ LB + Σ_g r_g(x_g)`, where LB is the Lagrangian bound and
`r_g(c) = D_g(c) + λ·w_g·cost_c − min_c' (D_g(c') + λ·w_g·cost_c')` ≥ 0 is a candidate's reduced cost (the
per-layer, per-device and K ≥ V constraints are left out of this relaxation, so the bound holds with them).
The greedy plan is feasible with distortion UB, so a candidate with `LB + r_g(c) > UB` is in no plan at least
as good as greedy's and is dropped (reduced-cost fixing). What is left is a few candidates for a few groups;
the optimum over them is the optimum over all.

**Pareto DP** (default, budget plus fixed units / bit ranges / K ≥ V / ties). Items (groups, or K/V pairs of
groups when keys must carry at least the values' bits) are added one at a time, keeping the partial plans not
dominated in (cost, distortion) whose cost leaves room for the cheapest rest and whose Lagrangian bound
`d + λ·c + Σ_rest min(D + λ·w·cost) − λ·B` does not exceed UB. Exact in floating point, with no solver
tolerance: the budget is never exceeded, not even by 1e-7.

**MILP** (per-layer or per-device caps, or `backend="milp"`): one binary `x[g, c]` per group and kept
candidate; `Σ_c x[g, c] = 1`; the budget row; one row per cap; one per K/V pair (`Σ bits·x[K] − Σ bits·x[V]
≥ 0`) for K ≥ V (`Problem.rows`); solved by HiGHS through `scipy.optimize.milp`. HiGHS's branch and bound is
slow to prove optimality among the near-ties that real curves have (seconds to minutes where the DP takes a
fraction of a second), hence the DP by default; both are checked against brute force in the tests.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from ..errors import RateQError
from .greedy import _pareto, build_hulls, solve_greedy
from .problem import BUDGET_RTOL, Problem

BACKENDS = ("auto", "dp", "milp")
MIP_REL_GAP = 1e-9  # HiGHS stops when (incumbent − bound) / incumbent falls below this: optimal in practice
MAX_DP_STATES = 2_000_000  # partial plans the DP may hold at once before it hands the core to the MILP


class _TooManyStates(Exception):
    pass


def _core(problem: Problem) -> dict:
    """λ, the Lagrangian bound, the greedy plan (UB), and every valid candidate's reduced cost `(G, C)`."""
    relaxed = replace(problem, keys_at_least_values=False, layer_budget=None, device_layers=None, device_budget=None)
    hulls = build_hulls(relaxed)
    k = int(np.searchsorted(hulls.cum_dc, problem.budget * (1 + BUDGET_RTOL) - hulls.base_cost, side="right"))
    lam = float(hulls.step_eff[k]) if k < len(hulls.step_eff) else 0.0  # the LP relaxation's budget multiplier
    w = problem.group_weight()
    lagr = np.where(problem.group_valid(), problem.group_dist() + lam * w[:, None] * problem.slot_cost[None, :],
                    np.inf)
    best = lagr.min(1)  # (G,)
    ub_choice, _ = solve_greedy(problem)
    ub = problem.distortion(ub_choice)
    lb = float(best.sum()) - lam * problem.budget
    # Keeping a few candidates too many is always safe; losing the optimum to rounding is not.
    slack = ub - lb + 1e-9 * max(abs(ub), abs(lb)) + 1e-300
    return {"lam": lam, "lb": lb, "ub": ub, "ub_choice": ub_choice, "ub_group": problem.group_choice(ub_choice),
            "reduced": lagr - best[:, None], "slack": slack}


def _dp_items(problem: Problem, core: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per item: groups `(M,)`, candidate weighted costs `(n,)`, distortions `(n,)`, slots `(n, M)`."""
    r, slack, ub = core["reduced"], core["slack"], core["ub_group"]
    w, dist = problem.group_weight(), problem.group_dist()
    keep = problem.group_valid() & (r <= slack)
    keep[np.arange(problem.num_groups), ub] = True
    items = []
    if problem.items().shape[1] == 1:
        for g in range(problem.num_groups):
            s = np.nonzero(keep[g])[0]
            items.append((np.array([g]), w[g] * problem.slot_cost[s], dist[g, s], s[:, None]))
        return items
    for gk, gv in problem.items():
        ck, cv = np.meshgrid(np.nonzero(keep[gk])[0], np.nonzero(keep[gv])[0], indexing="ij")
        ck, cv = ck.ravel(), cv.ravel()
        ok = (problem.slot_bits[ck] >= problem.slot_bits[cv]) & (r[gk, ck] + r[gv, cv] <= slack)
        ok |= (ck == ub[gk]) & (cv == ub[gv])
        ck, cv = ck[ok], cv[ok]
        items.append((np.array([gk, gv]), w[gk] * problem.slot_cost[ck] + w[gv] * problem.slot_cost[cv],
                      dist[gk, ck] + dist[gv, cv], np.stack([ck, cv], 1)))
    return items


def _solve_dp(problem: Problem, core: dict) -> tuple[np.ndarray, dict]:
    items = _dp_items(problem, core)
    lam, ub = core["lam"], core["ub"]
    budget = problem.budget * (1 + BUDGET_RTOL)
    choice = np.empty(problem.num_groups, dtype=np.int64)
    # Single-candidate items are constants; the rest go through the DP, fewest candidates first.
    free = []
    const_cost = const_dist = 0.0
    for groups, cost, dist, slots in items:
        if len(cost) == 1:
            choice[groups] = slots[0]
            const_cost += float(cost[0])
            const_dist += float(dist[0])
        else:
            free.append((groups, cost, dist, slots))
    free.sort(key=lambda item: len(item[1]))
    lag_min = np.array([float(np.min(d + lam * c)) for _, c, d, _ in free])  # Σ_rest of the Lagrangian bound
    lag_rest = np.concatenate([np.cumsum(lag_min[::-1])[::-1], [0.0]])
    cost_rest = np.concatenate([np.cumsum([float(c.min()) for _, c, _, _ in free][::-1])[::-1], [0.0]])
    room = budget - const_cost
    limit = ub - const_dist + 1e-9 * max(abs(ub), 1e-300)

    sc, sd = np.zeros(1), np.zeros(1)  # partial plans: cost, distortion
    back, peak = [], 1
    for i, (_, cost, dist, _) in enumerate(free):
        c = (sc[:, None] + cost[None, :]).ravel()  # (S·n,): state-major, candidate-minor
        d = (sd[:, None] + dist[None, :]).ravel()
        ok = (c + cost_rest[i + 1] <= room) & (d + lam * c + lag_rest[i + 1] - lam * budget <= limit)
        idx = np.nonzero(ok)[0]
        c, d = c[idx], d[idx]
        order = np.lexsort((d, c))
        c, d, idx = c[order], d[order], idx[order]
        front = d < np.concatenate([[np.inf], np.minimum.accumulate(d)[:-1]])  # not dominated by a cheaper one
        sc, sd = c[front], d[front]
        back.append(idx[front])
        peak = max(peak, len(sc))
        if len(sc) == 0:
            raise AssertionError("the DP lost every partial plan, the greedy one included")  # a bug
        if len(sc) * (len(free[i + 1][1]) if i + 1 < len(free) else 1) > MAX_DP_STATES:
            raise _TooManyStates
    j = int(np.argmin(sd))
    for i in range(len(free) - 1, -1, -1):
        groups, cost, _, slots = free[i]
        j, ci = divmod(int(back[i][j]), len(cost))
        choice[groups] = slots[ci]
    return problem.expand(choice), {"backend": "pareto-dp", "status": "optimal", "gap": 0.0,
                                    "free_groups": len(free), "peak_states": int(peak)}


def _solve_milp(problem: Problem, core: dict, time_limit: float) -> tuple[np.ndarray, dict]:
    valid, dist = problem.group_valid(), problem.group_dist()
    G, C = valid.shape
    if problem.keys_at_least_values:
        keep = valid.copy()  # a dominated candidate may still be the one that keeps K ≥ V
    else:
        keep = _pareto(np.broadcast_to(problem.slot_cost, (G, C)), np.where(valid, dist, np.inf))
    keep &= core["reduced"] <= core["slack"]
    keep[np.arange(G), core["ub_group"]] = True
    var_group, var_slot = np.nonzero(keep)  # (V,), (V,)
    V = len(var_group)
    scale = float(dist[var_group, var_slot].max()) or 1.0  # objective coefficients in [0, 1] for HiGHS
    c = dist[var_group, var_slot] / scale

    one_each = LinearConstraint(csr_array((np.ones(V), (var_group, np.arange(V))), shape=(G, V)), 1, 1)
    A, lows, highs, n_budget_rows = problem.rows(var_group, var_slot)

    tightened = 0.0
    for _ in range(4):
        res = milp(c, integrality=np.ones(V), bounds=Bounds(0, 1),
                   constraints=[one_each, LinearConstraint(A, lows, highs)],
                   options={"time_limit": float(time_limit), "mip_rel_gap": MIP_REL_GAP})
        if res.x is None:
            if res.status == 2:
                raise RateQError("no plan satisfies all the constraints together (budget, per-layer budgets, "
                                 "devices, keys ≥ values, ties, fixed units); relax one of them")
            raise RateQError(f"the MILP solver found no plan within {time_limit:g} s ({res.message}); "
                             "raise time_limit or use method='greedy'")
        x = res.x > 0.5
        group_choice = np.empty(G, dtype=np.int64)
        group_choice[var_group[x]] = var_slot[x]
        choice = problem.expand(group_choice)
        if problem.within_budget(choice):
            break
        # HiGHS accepts rows violated by up to its feasibility tolerance (1e-7); the plan must not be over
        # budget at all, so shave the violation off the budget rows and solve again.
        over = max(problem.excess(choice), 0.0)
        highs[:n_budget_rows] -= 2 * over + 1e-12
        tightened += 2 * over + 1e-12
    else:
        raise AssertionError("MILP solution stays over budget")  # would be a solver bug
    info = {
        "backend": "HiGHS (scipy.optimize.milp)",
        "status": "optimal" if res.status == 0 else str(res.message),
        "gap": float(res.mip_gap) if res.mip_gap is not None else None,
        "milp_bound": float(res.mip_dual_bound) * scale if res.mip_dual_bound is not None else None,
        "variables": int(V),
        "nodes": int(res.mip_node_count or 0),
    }
    if tightened:
        info["tightened"] = tightened
    return choice, info


def solve_exact(problem: Problem, *, time_limit: float = 60.0, backend: str = "auto") -> tuple[np.ndarray, dict]:
    if backend not in BACKENDS:
        raise RateQError(f"unknown exact backend {backend!r}; use one of {', '.join(BACKENDS)}")
    core = _core(problem)
    valid = problem.group_valid()
    core_size = int((valid & (core["reduced"] <= core["slack"])).sum())
    info = {"lower_bound": core["lb"], "greedy_distortion": core["ub"], "candidates": int(valid.sum()),
            "core_candidates": core_size}
    caps = problem.cap_shares() is not None
    if backend == "dp" and caps:
        raise RateQError("the DP backend handles one budget; per-layer budgets and devices need backend='milp' "
                         "(or 'auto', or method='convex')")
    if backend in ("auto", "dp") and not caps:
        try:
            choice, more = _solve_dp(problem, core)
            return choice, {**info, **more}
        except _TooManyStates:
            if backend == "dp":
                raise RateQError(f"the DP needed more than {MAX_DP_STATES} partial plans; use backend='milp'") from None
    choice, more = _solve_milp(problem, core, time_limit)
    return choice, {**info, **more}
