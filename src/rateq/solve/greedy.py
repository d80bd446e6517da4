"""Lagrangian convex-hull greedy for the multiple-choice knapsack: fast, no MILP.

Each group (a unit, or a KV head's K/V pair when keys must carry at least as many bits as values) keeps only
the lower convex hull of its candidates in the (cost, distortion) plane. Walking a hull from its cheapest
vertex, every step buys a distortion drop `dd` for a cost `dc`, at an efficiency `dd/dc` that falls along the
hull. All groups' steps are merged in one global order of falling efficiency — the order in which the
Lagrangian solution `argmin D + λ·cost` moves as λ falls — and taken while the budget lasts; after the first
step that does not fit, smaller later steps that still fit are taken too.

Bound. Taking the first non-fitting step fractionally gives the optimum of the LP relaxation (Sinha &
Zoltners 1979), a lower bound on the optimal distortion. So the greedy plan is within `dd` of that step —
hence within one group's largest hull step — of the optimum, and exactly optimal whenever the budget ends on a
hull vertex, e.g. convex curves whose steps all cost the same (one quantizer, consecutive widths, equal unit
sizes: the classical marginal-allocation setting). The lower bound and the gap are reported with the plan.
With per-layer budgets the steps are taken in the same order wherever every constraint allows; there is no
such bound then, and none is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import BUDGET_RTOL, Problem


@dataclass
class Hulls:
    group_units: np.ndarray  # (G, M) units of each group (M = 1, or 2 for K/V pairs)
    group_layer: np.ndarray  # (G,)
    vert_slots: np.ndarray  # (G, J, M) slots of each hull vertex (padding repeats the last vertex)
    base_cost: float  # every group at its cheapest vertex
    base_dist: float
    layer_base_cost: np.ndarray  # (L,) the same per layer, as a share of all elements
    # Steps in the global order of falling efficiency:
    step_group: np.ndarray  # (S,)
    step_vertex: np.ndarray  # (S,) hull vertex the step reaches (1 = first step of its group)
    step_dc: np.ndarray  # (S,) cost of the step (weighted: share of the whole budget)
    step_dd: np.ndarray  # (S,) distortion drop
    step_eff: np.ndarray  # (S,) dd / dc
    cum_dc: np.ndarray  # (S,) running sums, for taking a prefix in one search
    cum_dd: np.ndarray  # (S,)


def _pareto(cost: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """`(G, C)` bool: candidates not dominated within their row (invalid ones carry infinite distortion)."""
    order, keep_sorted = _pareto_sorted(cost, dist)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, -1)
    return keep


def _pareto_sorted(cost: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's order by (cost, distortion), and which of the sorted candidates are on the Pareto front:
    strictly better than everything cheaper (of equal-cost duplicates the better one survives)."""
    order = np.lexsort((dist, cost), axis=-1)
    d = np.take_along_axis(dist, order, -1)
    prev = np.concatenate([np.full((d.shape[0], 1), np.inf), np.minimum.accumulate(d, -1)[:, :-1]], 1)
    return order, (d < prev) & np.isfinite(d)


def _lower_hull(c: np.ndarray, d: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`(G, C)` bool: lower convex hull vertices among `keep` of rows sorted by rising cost, falling distortion.

    A point on or above the segment joining its kept neighbours is no hull vertex (the hull lies below that
    segment), so every such point of every row is dropped at once, until none is left: at most C rounds of
    whole-array operations instead of a Python loop per row.
    """
    G, C = c.shape
    idx = np.broadcast_to(np.arange(C), (G, C))
    rows = np.arange(G)[:, None]
    keep = keep.copy()
    while True:
        last = np.maximum.accumulate(np.where(keep, idx, -1), 1)  # last kept at or before i
        nxt = np.minimum.accumulate(np.where(keep, idx, C)[:, ::-1], 1)[:, ::-1]  # first kept at or after i
        p = np.concatenate([np.full((G, 1), -1), last[:, :-1]], 1)
        n = np.concatenate([nxt[:, 1:], np.full((G, 1), C)], 1)
        inner = keep & (p >= 0) & (n < C)
        pc, pd = c[rows, np.maximum(p, 0)], d[rows, np.maximum(p, 0)]
        nc, nd = c[rows, np.minimum(n, C - 1)], d[rows, np.minimum(n, C - 1)]
        with np.errstate(invalid="ignore"):
            # i is no vertex when the step p→i is no more efficient than the step i→n.
            drop = inner & ((pd - d) * (nc - c) <= (d - nd) * (c - pc))
        if not drop.any():
            return keep
        keep &= ~drop


def build_hulls(problem: Problem) -> Hulls:
    """Hull of every group and the merged step order; depends on the curves and constraints, not the budget."""
    w = problem.weight
    if problem.keys_at_least_values:
        G, M = problem.num_units // 2, 2
        group_units = np.stack([np.arange(G) * 2, np.arange(G) * 2 + 1], 1)
        cands = []
        for g in range(G):
            ck, cv = problem.pair_candidates(g)
            cost = w[2 * g] * problem.slot_cost[ck] + w[2 * g + 1] * problem.slot_cost[cv]
            dist = problem.dist[2 * g, ck] + problem.dist[2 * g + 1, cv]
            cands.append((cost, dist, np.stack([ck, cv], 1)))
        width = max(len(c[0]) for c in cands)
        cost = np.full((G, width), np.inf)
        dist = np.full((G, width), np.inf)
        slots = np.zeros((G, width, M), dtype=np.int64)
        for g, (c, d, s) in enumerate(cands):
            cost[g, : len(c)], dist[g, : len(c)], slots[g, : len(c)] = c, d, s
    else:
        G, M = problem.num_units, 1
        group_units = np.arange(G)[:, None]
        C = len(problem.slot_cost)
        cost = problem.slot_cost[None, :] * w[:, None]
        dist = np.where(problem.valid, problem.dist, np.inf)
        slots = np.broadcast_to(np.arange(C)[None, :, None], (G, C, 1))

    order, front = _pareto_sorted(cost, dist)
    c = np.take_along_axis(cost, order, 1)  # (G, C) sorted by cost
    d = np.take_along_axis(dist, order, 1)
    s = np.take_along_axis(slots, order[..., None], 1)  # (G, C, M)
    vert = _lower_hull(c, np.where(front, d, 0.0), front)  # (G, C)

    # Vertices in order, padded with each row's last one.
    rank = np.cumsum(vert, 1) - 1  # vertex number of every kept point
    n_vert = vert.sum(1)
    J = int(n_vert.max())
    gi, ci = np.nonzero(vert)
    vert_slots = np.empty((G, J, M), dtype=np.int64)
    vert_slots[gi, rank[gi, ci]] = s[gi, ci]
    pad_j = np.broadcast_to(np.arange(J), (G, J)) >= n_vert[:, None]
    vert_slots[pad_j] = np.repeat(vert_slots[np.arange(G), n_vert - 1], J - n_vert, axis=0)
    first = np.argmax(vert, 1)
    base = c[np.arange(G), first]

    # Steps: from each vertex's predecessor to it (rows are visited in order, so gi/ci come sorted).
    is_step = rank[gi, ci] > 0
    prev_ci = np.concatenate([[0], ci[:-1]])
    sg, sv = gi[is_step], rank[gi, ci][is_step]
    dc = c[gi, ci][is_step] - c[gi, prev_ci][is_step]
    dd = d[gi, prev_ci][is_step] - d[gi, ci][is_step]
    with np.errstate(divide="ignore"):
        eff = np.where(dc > 0, dd / np.where(dc > 0, dc, 1), np.inf)
    group_layer = group_units[:, 0] // (2 * problem.num_kv_heads)
    # Falling efficiency; within a group efficiencies fall strictly, so ties never reorder a group's steps.
    o = np.lexsort((sv, sg, -eff))
    dc, dd, eff, sg, sv = dc[o], dd[o], eff[o], sg[o], sv[o]
    return Hulls(
        group_units=group_units, group_layer=group_layer, vert_slots=vert_slots,
        base_cost=float(base.sum()), base_dist=float(d[np.arange(G), first].sum()),
        layer_base_cost=np.bincount(group_layer, weights=base, minlength=problem.num_layers),
        step_group=sg, step_vertex=sv, step_dc=dc, step_dd=dd, step_eff=eff,
        cum_dc=np.cumsum(dc), cum_dd=np.cumsum(dd),
    )


def fill(hulls: Hulls, budget: float, layer_budget: np.ndarray | None = None,
         layer_weight: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Hull position `(G,)` of every group at `budget`, and the bound facts (see the module docstring)."""
    G, S = len(hulls.group_layer), len(hulls.step_dc)
    room = budget * (1 + BUDGET_RTOL) - hulls.base_cost
    dc, grp, vert = hulls.step_dc, hulls.step_group, hulls.step_vertex
    info: dict = {}
    if layer_budget is None:
        k = int(np.searchsorted(hulls.cum_dc, room, side="right"))  # steps[:k] fit as a prefix
        pos = np.bincount(grp[:k], minlength=G)
        room -= hulls.cum_dc[k - 1] if k else 0.0
        prefix_dist = hulls.base_dist - (hulls.cum_dd[k - 1] if k else 0.0)
        if k < S:
            info["lower_bound"] = prefix_dist - hulls.step_eff[k] * room
            info["bound"] = float(hulls.step_dd[k])
            tail = k + 1 + np.nonzero(dc[k + 1:] <= room)[0]
            for s in tail.tolist():
                g = grp[s]
                if dc[s] <= room and pos[g] == vert[s] - 1:
                    pos[g] += 1
                    room -= dc[s]
        else:
            info["lower_bound"], info["bound"] = prefix_dist, 0.0
        return pos, info
    # Several budgets: one pass in the same order, a step taken where every budget it touches allows it.
    layer_room = (layer_budget * layer_weight * (1 + BUDGET_RTOL) - hulls.layer_base_cost).tolist()
    pos = np.zeros(G, dtype=np.int64)
    layer = hulls.group_layer.tolist()
    p = pos.tolist()
    for g, v, c in zip(grp.tolist(), vert.tolist(), dc.tolist()):
        if p[g] == v - 1 and c <= room and c <= layer_room[layer[g]]:
            p[g] = v
            room -= c
            layer_room[layer[g]] -= c
    return np.array(p, dtype=np.int64), info


def decode(hulls: Hulls, pos: np.ndarray, num_units: int) -> np.ndarray:
    """Slot `(N,)` of every unit from the hull position of every group."""
    choice = np.empty(num_units, dtype=np.int64)
    chosen = hulls.vert_slots[np.arange(len(pos)), pos]  # (G, M)
    for m in range(hulls.group_units.shape[1]):
        choice[hulls.group_units[:, m]] = chosen[:, m]
    return choice


def layer_weights(problem: Problem) -> np.ndarray:
    return problem.weight.reshape(problem.num_layers, -1).sum(1)


def solve_greedy(problem: Problem, hulls: Hulls | None = None) -> tuple[np.ndarray, dict]:
    hulls = hulls or build_hulls(problem)
    pos, bound = fill(hulls, problem.budget, problem.layer_budget, layer_weights(problem))
    choice = decode(hulls, pos, problem.num_units)
    info: dict = {"steps": int(len(hulls.step_dc)), "max_hull_step": float(hulls.step_dd.max(initial=0.0))}
    if "lower_bound" in bound:
        dist = problem.distortion(choice)
        info.update(lower_bound=float(bound["lower_bound"]), bound=bound["bound"],
                    gap=max(0.0, dist - float(bound["lower_bound"])))
    return choice, info
