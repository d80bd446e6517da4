"""The allocation as a linear programme and its integer version, through cvxpy: a certified bound, then a plan.

Over tied groups (`problem`: one unit each unless tied), with `x[g, c]` for every group and valid slot:

    minimise    Σ_g Σ_c D_g(c)·x[g, c]                      (D_g: the summed distortion of the group's units)
    subject to  Σ_c x[g, c] = 1                             (one slot per group)
                Σ_g Σ_c w_g·cost_c·x[g, c] ≤ B              (w_g: the group's share of the budget)
                the same over a layer's or a device's groups ≤ its cap
                Σ_c bits_c·x[K, c] − Σ_c bits_c·x[V, c] ≥ 0  (per K/V pair, for keys ≥ values)

(`Problem.rows` builds the coupling rows, the same ones `exact`'s MILP uses.)

**Relaxation.** With `x ≥ 0` each group ranges over the convex hull of its candidates, and the LP optimum is
a lower bound on the integer optimum. The bound reported is the Lagrangian dual function at the LP's row
multipliers `y` (clipped to their sign), `Σ_g min_c (D_g(c) + (Aᵀy)[g, c]) − yᵀb`: a lower bound for any such
`y` by weak duality, and equal to the LP optimum at the LP's duals because the kept one-slot-per-group rows
have integral vertices (Geoffrion 1974, "Lagrangean relaxation for integer programming"). So it is certified
whatever tolerances the LP solver stopped at.

**Integer programme.** The same programme with boolean `x`, solved by HiGHS through cvxpy within a time limit;
the plan's gap to the bound is `(D − bound) / D`. HiGHS accepts rows violated by its feasibility tolerance
(1e-7), so, as in `exact`, a plan over a budget or cap is solved again with the violation shaved off.

**Rounding** (`backend="round"`, or no MILP solver, or none found in time): every item (a group, or a K/V
pair of groups) takes the candidate with the largest `x` (the product over a pair); then, while a budget or
cap is exceeded, the item of an exceeded row whose move to a cheaper candidate costs the least distortion per
share of the budget saved moves. All items at their cheapest meet every cap that can be met
(`Problem.check_feasible`), so the repair always ends feasible. What the repair left unspent then goes, move
by move, to the change that fits every row and buys the most distortion per share spent. The gap to the
bound is reported.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import numpy as np
from scipy.sparse import csr_matrix

from ..errors import RateQError
from .exact import MIP_REL_GAP
from .problem import Problem

BACKENDS = ("auto", "milp", "round")


@functools.cache
def _quiet_highs() -> None:
    """HiGHS writes a banner to stdout when a process makes its first instance, whatever its options; make that
    instance with stdout pointed at /dev/null, so that machine-read output (`--json`) stays clean."""
    import highspy

    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _program(cp, problem: Problem, var_group: np.ndarray, var_slot: np.ndarray, c: np.ndarray, *, boolean: bool,
             shave: float = 0.0):
    """The cvxpy problem, its variable, and its (one-slot, ≤, ≥) constraints; `shave` lowers the budget rows."""
    G, V = problem.num_groups, len(var_group)
    A, lo, hi, n = problem.rows(var_group, var_slot)
    hi = hi.copy()
    hi[:n] -= shave
    le, ge = np.nonzero(np.isfinite(hi))[0], np.nonzero(np.isfinite(lo))[0]
    A = csr_matrix(A)  # cvxpy takes scipy's sparse matrices
    x = cp.Variable(V, boolean=boolean) if boolean else cp.Variable(V, nonneg=True)
    one = csr_matrix((np.ones(V), (var_group, np.arange(V))), shape=(G, V))
    cons = [one @ x == 1, A[le] @ x <= hi[le]]
    if len(ge):
        cons.append(A[ge] @ x >= lo[ge])
    return cp.Problem(cp.Minimize(c @ x), cons), x, cons, (A[le], hi[le], A[ge], lo[ge])


def _certified_bound(cons, rows, c: np.ndarray, var_group: np.ndarray, G: int) -> float:
    """Lagrangian dual function at the LP's multipliers (clipped to ≥ 0), in the scaled objective's units."""
    A_le, b_le, A_ge, b_ge = rows
    dual = lambda con, n: np.zeros(n) if con is None or con.dual_value is None else np.maximum(  # noqa: E731
        np.asarray(con.dual_value, dtype=np.float64).reshape(-1), 0.0)
    y_le = dual(cons[1], A_le.shape[0])
    y_ge = dual(cons[2] if len(cons) > 2 else None, A_ge.shape[0])
    red = c + A_le.T @ y_le - A_ge.T @ y_ge  # (V,) every candidate's Lagrangian cost
    best = np.full(G, np.inf)
    np.minimum.at(best, var_group, red)
    return float(best.sum() - y_le @ b_le + y_ge @ b_ge)


def _round(problem: Problem, xg: np.ndarray) -> np.ndarray:
    """A feasible choice `(N,)` from fractional `xg` `(G, C)`: the largest-x candidate per item, repaired."""
    items, cost, dist, slots = problem.item_candidates()
    I, M = items.shape
    score = np.ones(cost.shape)
    for m in range(M):
        score *= np.take_along_axis(xg[items[:, m]], slots[..., m], 1)
    pick = np.argmax(np.where(np.isfinite(cost), score, -np.inf), 1)

    # Rows: the budget, then every cap; each item lies in one layer, so in the caps of that layer.
    shares = problem.cap_shares()
    item_layer = problem.group_layer()[items[:, 0]]
    member = np.ones((1, I), dtype=bool)
    limit = np.array([problem.budget])
    if shares is not None:
        member = np.concatenate([member, shares[0][:, item_layer]])
        limit = np.concatenate([limit, shares[1]])
    at = np.arange(I)
    while True:
        over = member.astype(np.float64) @ cost[at, pick] > limit
        if not over.any():
            break
        saved = cost[at, pick][:, None] - cost  # (I, K) share saved by moving there
        ok = member[over].any(0)[:, None] & (saved > 0) & np.isfinite(cost)
        if not ok.any():
            raise AssertionError("rounding found no cheaper move in an exceeded row")  # check_feasible rules it out
        rate = np.where(ok, (dist - dist[at, pick][:, None]) / np.where(ok, saved, 1.0), np.inf)
        i, k = np.unravel_index(int(np.argmin(rate)), rate.shape)
        pick[i] = k
    # Spend what rounding down left: the move that fits every row and buys the most distortion per share.
    while True:
        room = limit - member.astype(np.float64) @ cost[at, pick]
        item_room = np.where(member, room[:, None], np.inf).min(0)  # (I,)
        extra = cost - cost[at, pick][:, None]
        gain = dist[at, pick][:, None] - dist
        ok = np.isfinite(cost) & (gain > 0) & (extra <= item_room[:, None])
        if not ok.any():
            break
        rate = np.where(ok, np.where(extra > 0, gain / np.where(extra > 0, extra, 1.0), np.inf), -np.inf)
        i, k = np.unravel_index(int(np.argmax(rate)), rate.shape)
        pick[i] = k
    group_choice = np.empty(problem.num_groups, dtype=np.int64)
    for m in range(M):
        group_choice[items[:, m]] = slots[at, pick, m]
    return problem.expand(group_choice)


def solve_convex(problem: Problem, *, time_limit: float = 60.0, backend: str = "auto") -> tuple[np.ndarray, dict]:
    """The LP bound and the integer plan (or the rounded LP plan) of `problem`; see the module docstring."""
    if backend not in BACKENDS:
        raise RateQError(f"unknown convex backend {backend!r}; use one of {', '.join(BACKENDS)}")
    import cvxpy as cp  # only this method needs it; importing it takes a second

    installed = cp.installed_solvers()
    if backend == "milp" and "HIGHS" not in installed:
        raise RateQError("backend='milp' needs cvxpy's HIGHS solver (pip install highspy); "
                         "use backend='round' or 'auto'")
    valid, dist = problem.group_valid(), problem.group_dist()
    G, C = valid.shape
    var_group, var_slot = np.nonzero(valid)
    scale = float(dist[var_group, var_slot].max()) or 1.0  # objective coefficients in [0, 1] for the solvers
    c = dist[var_group, var_slot] / scale

    lp, x, cons, rows = _program(cp, problem, var_group, var_slot, c, boolean=False)
    lp_solver = "HIGHS" if "HIGHS" in installed else None
    if lp_solver:
        _quiet_highs()
    try:
        lp.solve(solver=lp_solver)
    except cp.SolverError as e:
        raise RateQError(f"the LP solver failed on the relaxation ({e}); use method='exact'") from None
    if lp.status in ("infeasible", "infeasible_inaccurate"):
        raise RateQError("no plan satisfies all the constraints together (budget, per-layer budgets, devices, "
                         "keys ≥ values, ties, fixed units); relax one of them")
    if x.value is None:
        raise RateQError(f"the LP solver gave no solution to the relaxation ({lp.status}); use method='exact'")
    bound = _certified_bound(cons, rows, c, var_group, G) * scale
    info = {"backend": f"cvxpy {cp.__version__} ({lp.solver_stats.solver_name})", "lp_status": lp.status,
            "relaxation": float(lp.value) * scale, "variables": int(len(var_group))}

    choice = None
    if backend != "round" and "HIGHS" in installed:
        shave = 0.0
        for _ in range(4):
            ip, xi, _, _ = _program(cp, problem, var_group, var_slot, c, boolean=True, shave=shave)
            try:
                with warnings.catch_warnings():  # a time-limited solve warns of inaccuracy; its status is reported
                    warnings.simplefilter("ignore", UserWarning)
                    ip.solve(solver="HIGHS", time_limit=float(time_limit), mip_rel_gap=MIP_REL_GAP)
            except (cp.SolverError, ValueError):  # no solution to read back
                break
            if xi.value is None:
                break
            on = np.asarray(xi.value).reshape(-1) > 0.5
            if not (np.bincount(var_group[on], minlength=G) == 1).all():
                break  # no integer solution in time
            group_choice = np.empty(G, dtype=np.int64)
            group_choice[var_group[on]] = var_slot[on]
            candidate = problem.expand(group_choice)
            if problem.within_budget(candidate):
                choice = candidate
                break
            shave += 2 * max(problem.excess(candidate), 0.0) + 1e-12  # HiGHS's feasibility tolerance; see above
        if choice is not None:
            info["status"] = "optimal" if ip.status == "optimal" else f"{ip.status} (time limit {time_limit:g} s)"
            info["backend"] += " + HiGHS MILP"
            if shave:
                info["tightened"] = shave
        else:
            info["milp_status"] = str(ip.status)
    if choice is None:
        xg = np.zeros((G, C))
        xg[var_group, var_slot] = np.asarray(x.value, dtype=np.float64).reshape(-1)
        choice = _round(problem, xg)
        info["status"] = "rounded"
    if not problem.within_budget(choice):
        raise AssertionError("convex returned a plan over budget")  # a bug
    d = problem.distortion(choice)
    bound = min(bound, d)  # a bound above a feasible plan is rounding noise; the optimum lies between
    info.update(bound=bound, lower_bound=bound, gap=(d - bound) / d if d > 0 else 0.0)
    return choice, info
