"""`greedy`: optimal on convex equal-step curves, within its reported bound otherwise, always within budget."""

import numpy as np
import pytest

import rateq
from rateq.solve.problem import build_problem


@pytest.mark.parametrize("seed", range(10))
def test_greedy_optimal_on_convex_equal_step_curves(curves_factory, brute, plan_dist, seed):
    # One quantizer, consecutive widths, equal unit sizes: every hull step costs the same, and on convex
    # curves marginal allocation is optimal at any budget.
    curves = curves_factory(2, 2, bits=(1, 2, 3), quantizers=[rateq.KIVI], seed=seed, kind="exponential",
                            equal_counts=True)
    budget = float(np.random.default_rng(seed).uniform(2.0, 4.0))
    plan = rateq.solve(curves, budget, method="greedy")
    assert plan_dist(curves, plan) == pytest.approx(brute(curves, budget), rel=1e-9)


@pytest.mark.parametrize("seed", range(16))
def test_greedy_within_bound(curves_factory, brute, plan_dist, seed):
    curves = curves_factory(1, 2, bits=(1, 2, 3, 4), seed=50 + seed)
    lo, hi = build_problem(curves, 1.0, check_budget=False).cost_range()
    budget = float(np.random.default_rng(seed).uniform(lo, hi))
    plan = rateq.solve(curves, budget, method="greedy")
    best = brute(curves, budget)
    got = plan_dist(curves, plan)
    s = plan.solver
    assert plan.effective_bits <= budget * (1 + 1e-12)
    assert s["lower_bound"] <= best * (1 + 1e-9) + 1e-12  # the LP relaxation bounds the optimum from below
    assert got - best <= s["bound"] * (1 + 1e-9) + 1e-12  # within the first step that did not fit
    assert s["bound"] <= s["max_hull_step"] + 1e-12  # … hence within one unit's largest hull step
    assert s["gap"] == pytest.approx(got - s["lower_bound"], abs=1e-9)


def test_greedy_bound_is_not_vacuous(curves_factory, brute, plan_dist):
    # Somewhere among random non-convex instances greedy is strictly suboptimal, and the bound still holds.
    worse = 0
    for seed in range(40):
        curves = curves_factory(1, 2, bits=(1, 2, 3, 4), seed=900 + seed)
        lo, hi = build_problem(curves, 1.0, check_budget=False).cost_range()
        budget = float(np.random.default_rng(seed).uniform(lo, hi))
        plan = rateq.solve(curves, budget, method="greedy")
        best = brute(curves, budget)
        worse += plan_dist(curves, plan) > best * (1 + 1e-9)
    assert worse > 0


@pytest.mark.parametrize("seed", range(6))
def test_greedy_respects_side_constraints(curves_factory, seed):
    curves = curves_factory(3, 2, bits=(1, 2, 3, 4, 6), seed=400 + seed)
    lo, hi = build_problem(curves, 1.0, check_budget=False, keys_at_least_values=True).cost_range()
    budget = (lo + hi) / 2
    plan = rateq.solve(curves, budget, method="greedy", keys_at_least_values=True, per_layer_budget=budget + 0.3)
    assert (plan.k_bits >= plan.v_bits).all()
    assert plan.effective_bits <= budget * (1 + 1e-12)
    w = plan.weights.double()
    layer_bits = (plan.unit_bits_per_element() * w).sum((1, 2)) / w.sum((1, 2))
    assert (layer_bits <= budget + 0.3 + 1e-9).all()
    assert "lower_bound" not in plan.solver  # no bound is claimed with per-layer budgets
