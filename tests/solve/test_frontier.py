"""The rate-distortion frontier: non-increasing, consistent with single solves, honest about infeasible budgets."""

import numpy as np
import pytest

import rateq


@pytest.mark.parametrize("method", ["greedy", "exact", "waterfill"])
def test_frontier_non_increasing(curves_factory, method):
    curves = curves_factory(3, 2, bits=(1, 2, 3, 4, 6, 8), seed=5)
    budgets = np.arange(1.0, 10.01, 0.25 if method == "greedy" else 1.0)
    rows = rateq.frontier(curves, budgets, method=method)
    assert [r["budget"] for r in rows] == sorted(float(b) for b in budgets)
    feasible = [r for r in rows if r["feasible"]]
    lo, hi = rateq.budget_range(curves.quantizers, curves.bits)
    assert all((lo <= r["budget"] <= hi) == r["feasible"] for r in rows)
    d = [r["distortion"] for r in feasible]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(d, d[1:]))
    assert all(r["effective_bits"] <= r["budget"] * (1 + 1e-12) for r in feasible)


def test_frontier_matches_single_solves(curves_factory):
    curves = curves_factory(2, 2, bits=(1, 2, 3, 4), seed=9)
    budgets = [2.0, 2.6, 3.3, 4.1]
    rows = rateq.frontier(curves, budgets, method="greedy")
    for r in rows:
        plan = rateq.solve(curves, r["budget"], method="greedy")
        assert r["distortion"] <= plan.solver["predicted_distortion"] * (1 + 1e-12)
        exact = rateq.solve(curves, r["budget"], method="exact")
        assert exact.solver["predicted_distortion"] <= r["distortion"] * (1 + 1e-12)
        assert r["k_bits"] >= 1 and r["v_bits"] >= 1 and r["nominal_bits"] <= r["effective_bits"]


def test_frontier_hundred_budgets_build_once_and_match_single_solves(curves_factory, monkeypatch):
    """`greedy` reads every budget off hulls built once (no solve per budget), and each row is what single
    greedy solves give: the best plan of any budget up to it (distortion never rises with budget)."""
    import importlib

    solve_module = importlib.import_module("rateq.solve")  # the package, not the `rateq.solve` function
    calls = {"build_problem": 0, "build_hulls": 0, "_solve_problem": 0}

    def counted(name):
        real = getattr(solve_module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(solve_module, name, counted(name))
    curves = curves_factory(8, 4, bits=(1, 2, 3, 4, 5, 6, 8), seed=2)
    budgets = np.linspace(1.5, 9.0, 100)
    rows = rateq.frontier(curves, budgets)
    assert calls == {"build_problem": 1, "build_hulls": 1, "_solve_problem": 0}
    monkeypatch.undo()

    assert len(rows) == 100
    lo, hi = rateq.budget_range(curves.quantizers, curves.bits)
    best = None
    for r, b in zip(rows, budgets):
        assert r["budget"] == float(b)
        if not lo <= b <= hi:
            assert not r["feasible"] and r["range"] == [lo, hi]
            continue
        plan = rateq.solve(curves, float(b), method="greedy")
        if best is None or plan.solver["predicted_distortion"] < best.solver["predicted_distortion"]:
            best = plan
        assert r["feasible"]
        assert r["distortion"] == pytest.approx(best.solver["predicted_distortion"], rel=1e-12)
        assert r["effective_bits"] == pytest.approx(best.effective_bits, rel=1e-12)
        assert r["nominal_bits"] == pytest.approx(best.nominal_bits, rel=1e-12)
