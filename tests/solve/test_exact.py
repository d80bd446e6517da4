"""`exact` equals brute-force enumeration on random small instances, with and without side constraints."""

import numpy as np
import pytest

import rateq
from rateq.solve.problem import build_problem


def _random_budget(curves, seed, **constraints):
    lo, hi = build_problem(curves, 1.0, check_budget=False, **constraints).cost_range()
    return float(np.random.default_rng(seed).uniform(lo, hi))


@pytest.mark.parametrize("backend", ["auto", "milp"])
@pytest.mark.parametrize("seed", range(12))
def test_exact_equals_brute_force(curves_factory, brute, plan_dist, seed, backend):
    L, H = (1, 2) if seed % 2 else (2, 1)
    curves = curves_factory(L, H, bits=(1, 2, 3), seed=seed, kind="exponential" if seed % 3 == 0 else "random")
    budget = _random_budget(curves, seed)
    plan = rateq.solve(curves, budget, method="exact", backend=backend)
    best = brute(curves, budget)
    assert plan_dist(curves, plan) == pytest.approx(best, rel=1e-9)
    assert plan.solver["predicted_distortion"] == pytest.approx(best, rel=1e-9)
    assert plan.effective_bits <= budget * (1 + 1e-12)
    assert plan.solver["lower_bound"] <= best * (1 + 1e-9)


@pytest.mark.parametrize("backend", ["auto", "milp"])
@pytest.mark.parametrize("seed", range(6))
def test_exact_keys_at_least_values(curves_factory, brute, plan_dist, seed, backend):
    curves = curves_factory(1, 2, bits=(1, 2, 3, 4), seed=100 + seed)
    budget = _random_budget(curves, seed, keys_at_least_values=True)
    plan = rateq.solve(curves, budget, method="exact", keys_at_least_values=True, backend=backend)
    assert (plan.k_bits >= plan.v_bits).all()
    assert plan_dist(curves, plan) == pytest.approx(brute(curves, budget, keys_at_least_values=True), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_exact_per_layer_budget(curves_factory, brute, plan_dist, seed):
    curves = curves_factory(2, 1, bits=(1, 2, 3), seed=200 + seed)
    budget = _random_budget(curves, seed)
    per_layer = budget + 0.1  # binding for some layer in most draws
    best = brute(curves, budget, per_layer_budget=per_layer)
    if best is None:
        with pytest.raises(rateq.RateQError):
            rateq.solve(curves, budget, per_layer_budget=per_layer)
        return
    plan = rateq.solve(curves, budget, per_layer_budget=per_layer)
    assert plan_dist(curves, plan) == pytest.approx(best, rel=1e-9)
    w = plan.weights.double()
    layer_bits = (plan.unit_bits_per_element() * w).sum((1, 2)) / w.sum((1, 2))
    assert (layer_bits <= per_layer * (1 + 1e-9)).all()


@pytest.mark.parametrize("seed", range(4))
def test_exact_with_fixed_units_and_bit_range(curves_factory, brute, plan_dist, seed):
    curves = curves_factory(1, 2, bits=(1, 2, 3, 4), seed=300 + seed)
    fixed = {(0, 1, "v"): 3, (0, 0, "k"): (1, 2)}
    budget = _random_budget(curves, seed, fixed=fixed, min_bits=2)
    plan = rateq.solve(curves, budget, fixed=fixed, min_bits=2)
    assert int(plan.v_bits[0, 1]) == 3 and int(plan.k_bits[0, 0]) == 2
    assert plan.quantizers[int(plan.k_quantizer[0, 0])] == curves.quantizers[1]
    assert int(plan.k_bits.min()) >= 2 and int(plan.v_bits.min()) >= 2
    assert plan_dist(curves, plan) == pytest.approx(brute(curves, budget, fixed=fixed, min_bits=2), rel=1e-9)


def test_exact_meets_a_budget_equal_to_a_plans_own_cost(curves_factory):
    # A uniform 2-bit KIVI plan costs exactly 3.0 effective bits: a budget of 3.0 must admit it, never more.
    curves = curves_factory(3, 2, bits=(1, 2, 3), quantizers=[rateq.KIVI], seed=7)
    plan = rateq.solve(curves, 3.0, min_bits=2, max_bits=2)
    assert plan.effective_bits == pytest.approx(3.0, abs=1e-12)
    assert (plan.k_bits == 2).all() and (plan.v_bits == 2).all()
