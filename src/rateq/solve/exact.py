"""Exact multiple-choice knapsack as a MILP, solved by HiGHS through `scipy.optimize.milp`.

One binary `x[u, c]` per unit and allowed candidate; `Σ_c x[u, c] = 1` per unit; the budget row
`Σ weight_u · cost_c · x[u, c] ≤ budget`; optionally one row per layer (per-layer budgets) and one per KV head
(`Σ bits·x[K] − Σ bits·x[V] ≥ 0`, keys at least values). Without the K ≥ V rows, dominated candidates (no
cheaper and no better than another of the same unit) are dropped first: they are never needed by an optimal
plan, and the MILP shrinks to the Pareto front of each unit.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, vstack

from ..errors import RateQError
from .greedy import _pareto
from .problem import Problem

MIP_REL_GAP = 1e-9  # HiGHS stops when (incumbent − bound) / incumbent falls below this: optimal in practice


def solve_exact(problem: Problem, *, time_limit: float = 60.0) -> tuple[np.ndarray, dict]:
    N, C = problem.dist.shape
    if problem.keys_at_least_values:
        keep = problem.valid  # a dominated candidate may still be the one that keeps K ≥ V
    else:
        cost = np.broadcast_to(problem.slot_cost, (N, C))
        keep = _pareto(cost, np.where(problem.valid, problem.dist, np.inf))
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
        layer = problem.unit_layer[var_unit]
        rows.append(csr_array((var_cost, (layer, cols)), shape=(L, V)))
        lw = problem.weight.reshape(L, -1).sum(1)
        lows += [-np.inf] * L
        highs += (problem.layer_budget * lw).tolist()
    if problem.keys_at_least_values:
        # KV head g = u // 2: + bits of its K candidates, − bits of its V candidates, ≥ 0.
        sign = np.where(problem.unit_role[var_unit] == 0, 1.0, -1.0)
        coef = sign * problem.slot_bits[var_slot]
        G = N // 2
        rows.append(csr_array((coef, (var_unit // 2, cols)), shape=(G, V)))
        lows += [0.0] * G
        highs += [np.inf] * G
    A = vstack(rows, format="csr")
    lows, highs = np.array(lows, dtype=np.float64), np.array(highs, dtype=np.float64)

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
        # budget at all, so shave the violation off the right-hand sides and solve again.
        over = max(problem.total_cost(choice) - problem.budget, 0.0)
        if problem.layer_budget is not None:
            over = max(over, float((problem.layer_costs(choice) - problem.layer_budget).max()))
        highs[: 1 + (0 if problem.layer_budget is None else problem.num_layers)] -= 2 * over + 1e-12
        tightened += 2 * over + 1e-12
    else:
        raise AssertionError("MILP solution stays over budget")  # would be a solver bug

    info = {
        "backend": "HiGHS (scipy.optimize.milp)",
        "status": "optimal" if res.status == 0 else str(res.message),
        "gap": float(res.mip_gap) if res.mip_gap is not None else None,
        "lower_bound": float(res.mip_dual_bound) * scale if res.mip_dual_bound is not None else None,
        "variables": int(V),
        "constraints": int(N + A.shape[0]),
        "nodes": int(res.mip_node_count or 0),
    }
    if tightened:
        info["tightened"] = tightened
    return choice, info
