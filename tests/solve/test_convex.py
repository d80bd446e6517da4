"""`convex` against brute force: its bound never exceeds the optimum, its integer plan is the optimum, its rounded
plan is feasible and within the gap it reports; and every method's plans honour ties and per-device caps."""

import sys

import numpy as np
import pytest

import rateq
from rateq.solve.problem import build_problem


def _case(curves_factory, seed):
    """A small random problem: shape, tie, keys ≥ values, devices and per-layer caps vary with the seed."""
    rng = np.random.default_rng(seed)
    tie = (None, "layer", "layer-kv")[seed % 3]
    L, H = ([(1, 2), (2, 1), (3, 1)] if tie is None else [(3, 3), (2, 2), (3, 2)])[seed // 3 % 3]
    curves = curves_factory(L, H, bits=(1, 2, 3), seed=seed, kind="exponential" if seed % 4 == 0 else "random")
    kv = bool(rng.integers(2))
    lo, hi = build_problem(curves, 1.0, check_budget=False, tie=tie, keys_at_least_values=kv).cost_range()
    budget = float(rng.uniform(lo, hi))
    constraints = dict(tie=tie, keys_at_least_values=kv)
    if L > 1 and rng.integers(2):
        split = int(rng.integers(1, L))
        constraints["devices"] = [(0, split - 1, budget + float(rng.uniform(-0.4, 0.1))),
                                  (split, L - 1, budget + float(rng.uniform(0.0, 0.6)))]
    if rng.integers(3) == 0:
        constraints["per_layer_budget"] = budget + 0.3
    return curves, budget, constraints


def _solvable(curves_factory, brute, seed, method):
    """`_case` with its brute-force optimum; None where caps no plan can meet (then `method` must refuse it
    before solving)."""
    curves, budget, constraints = _case(curves_factory, seed)
    best = brute(curves, budget, **constraints)
    if best is None:
        with pytest.raises(rateq.RateQError):
            rateq.solve(curves, budget, method=method, **constraints)
        return None
    return curves, budget, constraints, best


def assert_honours(plan, budget, *, tie=None, keys_at_least_values=False, devices=None,
                   per_layer_budget=None):
    """The plan meets the budget and every rule, read back from the plan itself."""
    assert plan.effective_bits <= budget * (1 + 1e-12)
    # (bits, quantizer) of every unit, (L, H, 2): a plan lists each quantizer once, so ids compare as specs do.
    slot = np.stack([np.stack([plan.bits(r).numpy(), plan.quantizer_ids(r).numpy()], -1) for r in "kv"], 2)
    if tie is not None:
        assert (slot == slot[:, :1]).all()  # one slot per layer and role
    if tie == "layer-kv":
        assert (slot == slot[:, :1, :1]).all()  # … and K's is V's
    if keys_at_least_values:
        assert (plan.k_bits >= plan.v_bits).all()
    w = plan.weights.double()
    layer_share = (plan.unit_bits_per_element() * w).sum((1, 2))
    layer_w = w.sum((1, 2))
    for first, last, cap in devices or []:
        assert float(layer_share[first: last + 1].sum() / layer_w[first: last + 1].sum()) <= cap * (1 + 1e-12)
    if per_layer_budget is not None:
        assert (layer_share / layer_w <= per_layer_budget * (1 + 1e-12)).all()


@pytest.mark.parametrize("seed", range(24))
def test_convex_bound_and_integer_plan_against_brute_force(curves_factory, brute, plan_dist, seed):
    case = _solvable(curves_factory, brute, seed, "convex")
    if case is None:
        return
    curves, budget, constraints, best = case
    plan = rateq.solve(curves, budget, method="convex", **constraints)
    s = plan.solver
    assert s["status"] == "optimal"
    assert s["bound"] <= best * (1 + 1e-9)  # the relaxation bounds the optimum from below
    assert s["bound"] == pytest.approx(s["relaxation"], rel=1e-6, abs=1e-9)  # … and is the LP optimum
    assert plan_dist(curves, plan) == pytest.approx(best, rel=1e-9)
    assert s["gap"] == pytest.approx((best - s["bound"]) / best, abs=1e-9)
    assert_honours(plan, budget, **constraints)
    exact = rateq.solve(curves, budget, method="exact", **constraints)
    assert plan_dist(curves, exact) == pytest.approx(best, rel=1e-9)
    assert_honours(exact, budget, **constraints)


@pytest.mark.parametrize("seed", range(24))
def test_rounded_relaxation_is_feasible_and_within_its_gap(curves_factory, brute, plan_dist, seed):
    case = _solvable(curves_factory, brute, seed, "convex")
    if case is None:
        return
    curves, budget, constraints, best = case
    plan = rateq.solve(curves, budget, method="convex", backend="round", **constraints)
    s = plan.solver
    got = plan_dist(curves, plan)
    assert s["status"] == "rounded"
    assert_honours(plan, budget, **constraints)
    assert got >= best * (1 - 1e-9)
    assert s["gap"] == pytest.approx((got - s["bound"]) / got, abs=1e-9)
    assert (got - best) / got <= s["gap"] + 1e-9  # the reported gap is an upper bound on the true one


def test_rounding_is_close_on_larger_problems(curves_factory):
    # Many groups, few of them fractional in the relaxation: rounding costs little (no brute force here).
    curves = curves_factory(8, 4, bits=(1, 2, 3, 4), seed=3)
    for tie, kv in ((None, False), ("layer", True), ("layer-kv", False)):
        devices = [(0, 3, 3.3), (4, 7, 3.1)]
        rounded = rateq.solve(curves, 3.2, method="convex", backend="round", tie=tie, keys_at_least_values=kv,
                              devices=devices)
        milp = rateq.solve(curves, 3.2, method="convex", tie=tie, keys_at_least_values=kv, devices=devices)
        d_round, d_milp = rounded.solver["predicted_distortion"], milp.solver["predicted_distortion"]
        assert rounded.solver["gap"] < 0.1
        assert 0 <= (d_round - d_milp) / d_round < 0.02  # within 2% of the integer optimum
        assert milp.solver["bound"] == rounded.solver["bound"]
        assert_honours(rounded, 3.2, tie=tie, keys_at_least_values=kv, devices=devices)


def test_without_a_milp_solution_the_relaxation_is_rounded(curves_factory, monkeypatch):
    import cvxpy

    curves = curves_factory(8, 4, bits=(1, 2, 3, 4), seed=1)
    # Out of time: HiGHS stops before any incumbent (or, rarely, with one: a feasible plan either way).
    plan = rateq.solve(curves, 3.0, method="convex", keys_at_least_values=True, time_limit=1e-9)
    assert plan.solver["status"] == "rounded" or plan.solver["status"].startswith("user_limit")
    assert_honours(plan, 3.0, keys_at_least_values=True)
    # No MILP solver at all.
    real = cvxpy.installed_solvers()
    monkeypatch.setattr(cvxpy, "installed_solvers", lambda: [s for s in real if s != "HIGHS"])
    plan = rateq.solve(curves, 3.0, method="convex", tie="layer")
    assert plan.solver["status"] == "rounded" and "MILP" not in plan.solver["backend"]
    assert_honours(plan, 3.0, tie="layer")
    with pytest.raises(rateq.RateQError, match="^backend='milp' needs cvxpy's HIGHS solver"):
        rateq.solve(curves, 3.0, method="convex", backend="milp")


@pytest.mark.parametrize("seed", range(8))
def test_greedy_honours_ties_and_devices(curves_factory, brute, plan_dist, seed):
    case = _solvable(curves_factory, brute, seed, "greedy")
    if case is None:
        return
    curves, budget, constraints, best = case
    plan = rateq.solve(curves, budget, method="greedy", **constraints)
    assert_honours(plan, budget, **constraints)
    assert plan_dist(curves, plan) >= best * (1 - 1e-9)
    if "lower_bound" in plan.solver:  # without caps: the hull relaxation's bound, over tied groups
        assert plan.solver["lower_bound"] <= best * (1 + 1e-9) + 1e-12


def test_exact_backends_and_waterfill_with_devices(curves_factory, brute, plan_dist):
    curves = curves_factory(3, 1, bits=(1, 2, 3, 4), seed=11)
    devices = [(0, 0, 2.6), (1, 2, 3.4)]
    best = brute(curves, 3.0, devices=devices)
    plan = rateq.solve(curves, 3.0, method="exact", backend="milp", devices=devices)
    assert plan_dist(curves, plan) == pytest.approx(best, rel=1e-9)
    assert plan.solver["devices"] == [[0, 0, 2.6], [1, 2, 3.4]]
    with pytest.raises(rateq.RateQError, match="^the DP backend handles one budget; .*method='convex'"):
        rateq.solve(curves, 3.0, method="exact", backend="dp", devices=devices)
    for kwargs in (dict(devices=devices), dict(tie="layer")):
        with pytest.raises(rateq.RateQError, match="^waterfill .* or 'convex' for .*tie or devices$"):
            rateq.solve(curves, 3.0, method="waterfill", **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    # Ties whose units have no slot in common, or no cheap enough one for a device.
    (dict(tie="layer", fixed={(0, 0, "k"): 3, (0, 1, "k"): 1}),
     r"^tie='layer': layer 0 keys: no candidate is allowed for all of these units"),
    (dict(tie="layer-kv", fixed={(1, 0, "v"): 1, (1, 1, "k"): 2}),
     r"^tie='layer-kv': layer 1: no candidate is allowed for all of these units"),
    (dict(tie="layer-kv", fixed={(0, 0, "k"): 3}, devices=[(0, 0, 3.0), (1, 1, 4.0)]),
     r"^devices\[0\] cap 3 for layers 0\.\.0 is below the cheapest those layers can be stored at "
     r"\(\d\.\d{4} effective bits with tie='layer-kv'\); raise it$"),
    (dict(tie="layer", keys_at_least_values=True, fixed={(1, 0, "v"): 3}, max_bits=3, devices=[(1, 1, 3.4)]),
     r"^devices\[0\] cap 3\.4 for layers 1\.\.1 is below the cheapest"),
    (dict(tie="layer", keys_at_least_values=True, fixed={(0, 0, "k"): 1, (0, 1, "v"): 2}),
     r"^layer 0: no allowed key width is ≥ an allowed value width with tie='layer'"),
    # Malformed arguments.
    (dict(tie="head"), r"^tie must be None, 'layer', 'layer-kv' or 'model', got 'head'"),
    (dict(devices=[(0, 1, 3.0), (1, 1, 3.0)]), r"^devices\[1\] layers 1\.\.1 overlap devices\[0\] layers 0\.\.1"),
    (dict(devices=[(0, 2, 3.0)]), r"^devices\[0\] layers 0\.\.2 must be whole numbers with 0 ≤ first ≤ last ≤ 1"),
    (dict(devices=[(0, 1)]), r"^devices\[0\] must be \(first layer, last layer, cap\)"),
    (dict(devices=[(0, 1, 0.0)]), r"^devices\[0\] cap must be a positive, finite number"),
    (dict(devices=(0, 1, 3.0)), r"^devices\[0\] must be \(first layer, last layer, cap\)"),
])
def test_infeasible_or_bad_ties_and_devices_are_refused_before_solving(curves_factory, monkeypatch, kwargs, match):
    api = sys.modules["rateq.solve"]

    def never(*args, **kw):
        raise AssertionError("solved a problem that should have been refused")

    monkeypatch.setattr(api, "solve_convex", never)
    curves = curves_factory(2, 2, bits=(1, 2, 3), seed=0)
    with pytest.raises(rateq.RateQError, match=match) as err:
        rateq.solve(curves, 3.5, method="convex", **kwargs)
    assert "\n" not in str(err.value)


def test_byte_caps_convert_to_bits_per_element(curves_factory):
    # 8 layers over 2 devices, 64-dim heads, 4096 tokens: device memory in bytes → cap in bits per element.
    curves = curves_factory(8, 2, bits=(1, 2, 3, 4), seed=5, equal_counts=True)
    elements = 4 * 2 * 64 * 2 * 4096  # 4 layers × 2 KV heads × head dim × (K and V) × tokens per device
    mem = [1.4 * 2 ** 20, 1.8 * 2 ** 20]  # bytes each device can spend on the cache
    devices = [(0, 3, 8 * mem[0] / elements), (4, 7, 8 * mem[1] / elements)]
    plan = rateq.solve(curves, 4.0, method="convex", tie="layer", devices=devices)
    unit_bits = plan.unit_bits_per_element()
    for (first, last, _), limit in zip(devices, mem):
        used = float(unit_bits[first: last + 1].mean()) / 8 * elements
        assert used <= limit * (1 + 1e-12)


def test_frontier_with_ties(curves_factory):
    curves = curves_factory(3, 2, bits=(1, 2, 3, 4), seed=2)
    for method in ("greedy", "convex"):
        rows = rateq.frontier(curves, [2.0, 3.0, 4.0], method=method, tie="layer-kv")
        d = [r["distortion"] for r in rows if r["feasible"]]
        assert len(d) == 3 and all(b <= a * (1 + 1e-12) for a, b in zip(d, d[1:]))
