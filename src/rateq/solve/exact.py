"""Exact multiple-choice knapsack: a Lagrangian core, then a Pareto dynamic programme or a MILP (HiGHS).

**Core.** Dualising the budget row with the LP relaxation's multiplier λ (read off the greedy hull order)
gives, for any plan x within budget, `D(x) ≥ LB + Σ_u r_u(x_u)`, where LB is the Lagrangian bound and
`r_u(c) = D_u(c) + λ·w_u·cost_c − min_c' (D_u(c') + λ·w_u·cost_c')` ≥ 0 is a candidate's reduced cost (the
per-layer and K ≥ V constraints are left out of this relaxation, so the bound holds with them). The greedy
plan is feasible with distortion UB, so a candidate with `LB + r_u(c) > UB` is in no plan at least as good as
greedy's and is dropped (reduced-cost fixing). What is left is a few candidates for a few units; the optimum
over them is the optimum over all.

**Pareto DP** (default, budget plus fixed units / bit ranges / K ≥ V). Groups (units, or KV heads' K/V pairs
when keys must carry at least the values' bits) are added one at a time, keeping the partial plans not
dominated in (cost, distortion) whose cost leaves room for the cheapest rest and whose Lagrangian bound
`d + λ·c + Σ_rest min(D + λ·w·cost) − λ·B` does not exceed UB. Exact in floating point, with no solver
tolerance: the budget is never exceeded, not even by 1e-7.

**MILP** (per-layer budgets, or `backend="milp"`): one binary `x[u, c]` per unit and kept candidate;
`Σ_c x[u, c] = 1`; the budget row; one row per layer for per-layer budgets; one per KV head
(`Σ bits·x[K] − Σ bits·x[V] ≥ 0`) for K ≥ V; solved by HiGHS through `scipy.optimize.milp`. HiGHS's branch and
bound is slow to prove optimality among the near-ties that real curves have (seconds to minutes where the DP
takes a fraction of a second), hence the DP by default; both are checked against brute force in the tests.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, vstack

from ..errors import RateQError
from .greedy import _pareto, build_hulls, solve_greedy
from .problem import BUDGET_RTOL, Problem

BACKENDS = ("auto", "dp", "milp")
MIP_REL_GAP = 1e-9  # HiGHS stops when (incumbent − bound) / incumbent falls below this: optimal in practice
MAX_DP_STATES = 2_000_000  # partial plans the DP may hold at once before it hands the core to the MILP


class _TooManyStates(Exception):
    pass


def _core(problem: Problem) -> dict:
    """λ, the Lagrangian bound, the greedy plan (UB), and every valid candidate's reduced cost `(N, C)`."""
    relaxed = replace(problem, keys_at_least_values=False, layer_budget=None)
    hulls = build_hulls(relaxed)
    k = int(np.searchsorted(hulls.cum_dc, problem.budget * (1 + BUDGET_RTOL) - hulls.base_cost, side="right"))
    lam = float(hulls.step_eff[k]) if k < len(hulls.step_eff) else 0.0  # the LP relaxation's budget multiplier
    lagr = np.where(problem.valid, problem.dist + lam * problem.weight[:, None] * problem.slot_cost[None, :], np.inf)
    best = lagr.min(1)  # (N,)
    ub_choice, _ = solve_greedy(problem)
    ub = problem.distortion(ub_choice)
    lb = float(best.sum()) - lam * problem.budget
    # Keeping a few candidates too many is always safe; losing the optimum to rounding is not.
    slack = ub - lb + 1e-9 * max(abs(ub), abs(lb)) + 1e-300
    return {"lam": lam, "lb": lb, "ub": ub, "ub_choice": ub_choice, "reduced": lagr - best[:, None],
            "unit_min": best, "slack": slack}


def _dp_groups(problem: Problem, core: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per group: units `(M,)`, candidate weighted costs `(n,)`, distortions `(n,)`, slots `(n, M)`."""
    r, slack, w = core["reduced"], core["slack"], problem.weight
    keep = problem.valid & (r <= slack)
    keep[np.arange(problem.num_units), core["ub_choice"]] = True
    groups = []
    if not problem.keys_at_least_values:
        for u in range(problem.num_units):
            s = np.nonzero(keep[u])[0]
            groups.append((np.array([u]), w[u] * problem.slot_cost[s], problem.dist[u, s], s[:, None]))
        return groups
    for g in range(problem.num_units // 2):
        uk, uv = 2 * g, 2 * g + 1
        ck, cv = np.meshgrid(np.nonzero(keep[uk])[0], np.nonzero(keep[uv])[0], indexing="ij")
        ck, cv = ck.ravel(), cv.ravel()
        ok = (problem.slot_bits[ck] >= problem.slot_bits[cv]) & (r[uk, ck] + r[uv, cv] <= slack)
        ok |= (ck == core["ub_choice"][uk]) & (cv == core["ub_choice"][uv])
        ck, cv = ck[ok], cv[ok]
        groups.append((np.array([uk, uv]), w[uk] * problem.slot_cost[ck] + w[uv] * problem.slot_cost[cv],
                       problem.dist[uk, ck] + problem.dist[uv, cv], np.stack([ck, cv], 1)))
    return groups


def _solve_dp(problem: Problem, core: dict) -> tuple[np.ndarray, dict]:
    groups = _dp_groups(problem, core)
    lam, ub = core["lam"], core["ub"]
    budget = problem.budget * (1 + BUDGET_RTOL)
    choice = np.empty(problem.num_units, dtype=np.int64)
    # Single-candidate groups are constants; the rest go through the DP, fewest candidates first.
    free = []
    const_cost = const_dist = 0.0
    for units, cost, dist, slots in groups:
        if len(cost) == 1:
            choice[units] = slots[0]
            const_cost += float(cost[0])
            const_dist += float(dist[0])
        else:
            free.append((units, cost, dist, slots))
    free.sort(key=lambda grp: len(grp[1]))
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
        units, cost, _, slots = free[i]
        j, ci = divmod(int(back[i][j]), len(cost))
        choice[units] = slots[ci]
    return choice, {"backend": "pareto-dp", "status": "optimal", "gap": 0.0, "free_groups": len(free),
                    "peak_states": int(peak)}


def _solve_milp(problem: Problem, core: dict, time_limit: float) -> tuple[np.ndarray, dict]:
    N, C = problem.dist.shape
    if problem.keys_at_least_values:
        keep = problem.valid.copy()  # a dominated candidate may still be the one that keeps K ≥ V
    else:
        keep = _pareto(np.broadcast_to(problem.slot_cost, (N, C)), np.where(problem.valid, problem.dist, np.inf))
    keep &= core["reduced"] <= core["slack"]
    keep[np.arange(N), core["ub_choice"]] = True
    var_unit, var_slot = np.nonzero(keep)  # (V,), (V,)
    V = len(var_unit)
    cols = np.arange(V)
    scale = float(problem.dist[var_unit, var_slot].max()) or 1.0  # objective coefficients in [0, 1] for HiGHS
    c = problem.dist[var_unit, var_slot] / scale
    var_cost = problem.weight[var_unit] * problem.slot_cost[var_slot]

    one_each = LinearConstraint(csr_array((np.ones(V), (var_unit, cols)), shape=(N, V)), 1, 1)
    rows, lows, highs = [csr_array(var_cost[None, :])], [-np.inf], [problem.budget]
    if problem.layer_budget is not None:
        L = problem.num_layers
        rows.append(csr_array((var_cost, (problem.unit_layer[var_unit], cols)), shape=(L, V)))
        lows += [-np.inf] * L
        highs += (problem.layer_budget * problem.weight.reshape(L, -1).sum(1)).tolist()
    if problem.keys_at_least_values:
        # KV head g = u // 2: + bits of its K candidates, − bits of its V candidates, ≥ 0.
        coef = np.where(problem.unit_role[var_unit] == 0, 1.0, -1.0) * problem.slot_bits[var_slot]
        rows.append(csr_array((coef, (var_unit // 2, cols)), shape=(N // 2, V)))
        lows += [0.0] * (N // 2)
        highs += [np.inf] * (N // 2)
    A = vstack(rows, format="csr")
    lows, highs = np.array(lows, dtype=np.float64), np.array(highs, dtype=np.float64)
    n_budget_rows = 1 + (0 if problem.layer_budget is None else problem.num_layers)

    tightened = 0.0
    for _ in range(4):
        res = milp(c, integrality=np.ones(V), bounds=Bounds(0, 1),
                   constraints=[one_each, LinearConstraint(A, lows, highs)],
                   options={"time_limit": float(time_limit), "mip_rel_gap": MIP_REL_GAP})
        if res.x is None:
            if res.status == 2:
                raise RateQError("no plan satisfies all the constraints together (budget, per-layer budgets, "
                                 "keys ≥ values, fixed units); relax one of them")
            raise RateQError(f"the MILP solver found no plan within {time_limit:g} s ({res.message}); "
                             "raise time_limit or use method='greedy'")
        x = res.x > 0.5
        choice = np.empty(N, dtype=np.int64)
        choice[var_unit[x]] = var_slot[x]
        if problem.within_budget(choice):
            break
        # HiGHS accepts rows violated by up to its feasibility tolerance (1e-7); the plan must not be over
        # budget at all, so shave the violation off the budget rows and solve again.
        over = max(problem.total_cost(choice) - problem.budget, 0.0)
        if problem.layer_budget is not None:
            over = max(over, float((problem.layer_costs(choice) - problem.layer_budget).max()))
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
    core_size = int((problem.valid & (core["reduced"] <= core["slack"])).sum())
    info = {"lower_bound": core["lb"], "greedy_distortion": core["ub"], "candidates": int(problem.valid.sum()),
            "core_candidates": core_size}
    if backend == "dp" and problem.layer_budget is not None:
        raise RateQError("the DP backend handles one budget; per-layer budgets need backend='milp' (or 'auto')")
    if backend in ("auto", "dp") and problem.layer_budget is None:
        try:
            choice, more = _solve_dp(problem, core)
            return choice, {**info, **more}
        except _TooManyStates:
            if backend == "dp":
                raise RateQError(f"the DP needed more than {MAX_DP_STATES} partial plans; use backend='milp'") from None
    choice, more = _solve_milp(problem, core, time_limit)
    return choice, {**info, **more}
