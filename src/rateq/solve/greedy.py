"""Lagrangian convex-hull greedy for the multiple-choice knapsack: fast, no MILP.

Each item (a tied group of units — one unit unless tied —, or a K/V pair of groups when keys must carry at
least as many bits as values; see `problem`) keeps only the lower convex hull of its candidates in the
(cost, distortion) plane. Walking a hull from its cheapest vertex, every step buys a distortion drop `dd` for
a cost `dc`, at an efficiency `dd/dc` that falls along the hull. All items' steps are merged in one global
order of falling efficiency — the order in which the Lagrangian solution `argmin D + λ·cost` moves as λ
falls — and taken while the budget lasts; after the first step that does not fit, smaller later steps that
still fit are taken too.

Bound. Taking the first non-fitting step fractionally gives the optimum of the LP relaxation (Sinha &
Zoltners 1979), a lower bound on the optimal distortion. So the greedy plan is within `dd` of that step —
hence within one item's largest hull step — of the optimum, and exactly optimal whenever the budget ends on a
hull vertex, e.g. convex curves whose steps all cost the same (one quantizer, consecutive widths, equal unit
sizes: the classical marginal-allocation setting). The lower bound and the gap are reported with the plan.
With per-layer or per-device caps the steps are taken in the same order wherever every cap allows; there is
no such bound then, and none is reported. The cheapest vertices meet every cap that can be met (items never
span layers), so the plan is always feasible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import BUDGET_RTOL, Problem


@dataclass
class Hulls:
    item_groups: np.ndarray  # (I, M) tied groups of each item (M = 1, or 2 for K/V pairs)
    item_layer: np.ndarray  # (I,)
    unit_group: np.ndarray  # (N,) group of every unit, to read a plan back
    vert_slots: np.ndarray  # (I, J, M) slots of each hull vertex (padding repeats the last vertex)
    base_cost: float  # every item at its cheapest vertex
    base_dist: float
    layer_base_cost: np.ndarray  # (L,) the same per layer, as a share of all elements
    # Steps in the global order of falling efficiency:
    step_item: np.ndarray  # (S,)
    step_vertex: np.ndarray  # (S,) hull vertex the step reaches (1 = first step of its item)
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
    """Hull of every item and the merged step order; depends on the curves and constraints, not the budget."""
    items, cost, dist, slots = problem.item_candidates()
    G, M = items.shape  # G items here, of M groups each
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
    item_layer = problem.group_layer()[items[:, 0]]
    # Falling efficiency; within an item efficiencies fall strictly, so ties never reorder an item's steps.
    o = np.lexsort((sv, sg, -eff))
    dc, dd, eff, sg, sv = dc[o], dd[o], eff[o], sg[o], sv[o]
    return Hulls(
        item_groups=items, item_layer=item_layer, unit_group=problem.unit_group, vert_slots=vert_slots,
        base_cost=float(base.sum()), base_dist=float(d[np.arange(G), first].sum()),
        layer_base_cost=np.bincount(item_layer, weights=base, minlength=problem.num_layers),
        step_item=sg, step_vertex=sv, step_dc=dc, step_dd=dd, step_eff=eff,
        cum_dc=np.cumsum(dc), cum_dd=np.cumsum(dd),
    )


def fill(hulls: Hulls, budget: float, caps: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """Hull position `(I,)` of every item at `budget` under `caps` (`Problem.cap_shares`), and the bound facts
    (see the module docstring)."""
    G, S = len(hulls.item_layer), len(hulls.step_dc)
    room = budget * (1 + BUDGET_RTOL) - hulls.base_cost
    dc, grp, vert = hulls.step_dc, hulls.step_item, hulls.step_vertex
    info: dict = {}
    if caps is None:
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
    member, limit = caps
    cap_room = (limit * (1 + BUDGET_RTOL) - member @ hulls.layer_base_cost).tolist()
    rows_of = [np.nonzero(member[:, l])[0].tolist() for l in range(member.shape[1])]  # cap rows of each layer
    pos = np.zeros(G, dtype=np.int64)
    layer = hulls.item_layer.tolist()
    p = pos.tolist()
    for g, v, c in zip(grp.tolist(), vert.tolist(), dc.tolist()):
        rows = rows_of[layer[g]]
        if p[g] == v - 1 and c <= room and all(c <= cap_room[r] for r in rows):
            p[g] = v
            room -= c
            for r in rows:
                cap_room[r] -= c
    return np.array(p, dtype=np.int64), info


def decode(hulls: Hulls, pos: np.ndarray) -> np.ndarray:
    """Slot `(N,)` of every unit from the hull position of every item."""
    chosen = hulls.vert_slots[np.arange(len(pos)), pos]  # (I, M)
    group_choice = np.empty(hulls.item_groups.size, dtype=np.int64)
    for m in range(hulls.item_groups.shape[1]):
        group_choice[hulls.item_groups[:, m]] = chosen[:, m]
    return group_choice[hulls.unit_group]


def solve_greedy(problem: Problem, hulls: Hulls | None = None) -> tuple[np.ndarray, dict]:
    hulls = hulls or build_hulls(problem)
    pos, bound = fill(hulls, problem.budget, problem.cap_shares())
    choice = decode(hulls, pos)
    info: dict = {"steps": int(len(hulls.step_dc)), "max_hull_step": float(hulls.step_dd.max(initial=0.0))}
    if "lower_bound" in bound:
        dist = problem.distortion(choice)
        info.update(lower_bound=float(bound["lower_bound"]), bound=bound["bound"],
                    gap=max(0.0, dist - float(bound["lower_bound"])))
    return choice, info
