"""`rateq.solve`: the plan it returns, its accounting, and one clear error for every bad input."""

import numpy as np
import pytest

import rateq
from rateq.quant.spec import KIVI, QuantSpec


@pytest.mark.parametrize("method", ["exact", "greedy", "waterfill"])
def test_every_method_respects_budget(curves_factory, method):
    for seed in range(5):
        curves = curves_factory(3, 3, bits=(1, 2, 3, 4, 5, 6, 8), seed=seed)
        lo, hi = rateq.budget_range(curves.quantizers, curves.bits)
        for budget in np.linspace(lo, hi, 6):
            plan = rateq.solve(curves, float(budget), method=method)
            assert plan.effective_bits <= budget * (1 + 1e-12)
            assert plan.effective_bits >= lo - 1e-12


def test_plan_carries_accounting_and_provenance(curves_factory):
    curves = curves_factory(2, 2, bits=(1, 2, 3, 4), seed=1)
    policy = rateq.CachePolicy(residual=32, block=32, sinks=4)
    plan = rateq.solve(curves, 3.2, method="greedy", policy=policy)
    assert plan.budget_bits == 3.2 and plan.policy == policy
    assert plan.calibration["metric"] == "output" and plan.calibration["data"] == "synthetic"
    assert plan.solver["method"] == "greedy" and plan.solver["seconds"] >= 0
    assert plan.weights is not None and plan.weights.shape == (2, 2, 2)
    # Effective bits are the count-weighted mean of every unit's cost.
    w = curves.counts.double()
    assert plan.effective_bits == pytest.approx(float((plan.unit_bits_per_element() * w).sum() / w.sum()))
    assert plan.nominal_bits < plan.effective_bits
    # Only quantizers the plan uses are kept, and ids point into that list.
    used = {plan.quantizers[i] for i in plan.k_quantizer.flatten().tolist() + plan.v_quantizer.flatten().tolist()}
    assert used == set(plan.quantizers)


def test_quantizer_restriction_and_fp16(curves_factory):
    g64 = QuantSpec(group_size=64)
    curves = curves_factory(2, 2, bits=(1, 2, 3), quantizers=[KIVI, g64], seed=2)
    plan = rateq.solve(curves, 3.0, quantizers=["minmax-g32-fp16"])
    assert plan.quantizers == [KIVI]
    plan = rateq.solve(curves, 5.0, fixed={(1, 0, "k"): 16})  # one unit in fp16 lifts the feasible range
    assert int(plan.k_bits[1, 0]) == 16
    top = rateq.solve(curves, 16.0, allow_fp16=True)
    assert (top.k_bits == 16).all() and top.effective_bits == pytest.approx(16.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=1.0), r"outside the feasible range \[1\.5000, 4\.0000\]"),
    (dict(budget=4.5), r"outside the feasible range"),
    (dict(budget=float("nan")), "budget must be a positive, finite number of effective bits per element"),
    (dict(budget=-2), "budget must be a positive, finite number"),
    (dict(budget="3"), r"budget must be a positive, finite number .*got '3'"),
    (dict(budget=True), "budget must be a positive, finite number"),
    (dict(budget=3.0, method="simplex"), "unknown solver method"),
    (dict(budget=3.0, min_bits=3, max_bits=2), "min_bits 3 is above max_bits 2"),
    (dict(budget=3.0, fixed={(5, 0, "k"): 2}), "outside layers"),
    (dict(budget=3.0, fixed={(0, 0, "q"): 2}), "roles"),
    (dict(budget=3.0, fixed={(0, 0, "k"): 5}), "not a calibrated width"),
    (dict(budget=3.0, quantizers=["symmetric-g32-fp16"]), "not in the curves"),
    (dict(budget=3.0, per_layer_budget=[3.0, 3.0, 3.0]), "one per layer"),
    (dict(budget=3.0, per_layer_budget=1.0), "per-layer budget 1 for layer 0"),
    (dict(budget=3.0, per_layer_budget=[3.0, float("inf")]), r"per_layer_budget\[1\] must be a positive, finite"),
    (dict(budget=3.0, min_bits=4), "no candidate left"),
])
def test_bad_inputs_raise_one_clear_error(curves_factory, kwargs, match):
    curves = curves_factory(2, 2, bits=(1, 2, 3), seed=0)
    budget = kwargs.pop("budget")
    with pytest.raises(rateq.RateQError, match=match):
        rateq.solve(curves, budget, **kwargs)


def test_monotone_curves_are_what_the_solver_sees(curves_factory):
    # A curve that rises with bits is read through its running minimum: more bits never predict more damage.
    curves = curves_factory(1, 2, bits=(1, 2, 3, 4), seed=4, kind="rising")
    assert curves.nonmonotone()
    plan = rateq.solve(curves, 5.0, quantizers=[0])
    mono = curves.monotone().distortion
    want = sum(float(mono[0, h, r, 0, curves.bits.index(int(plan.bits("kv"[r])[0, h]))])
               for h in range(2) for r in range(2))
    assert plan.solver["predicted_distortion"] == pytest.approx(want)


def test_the_plan_keeps_the_policy_the_curves_were_measured_under():
    import torch

    from rateq import CachePolicy, Curves, ModelFingerprint, parse_spec, solve

    fp = ModelFingerprint("m", "llama", 2, 2, 64)
    specs = [parse_spec("minmax-g128-fp16-prerope"), parse_spec("lloydmax-g64-rhadamard-fp16")]
    bits = (1, 2, 4)
    d = torch.rand(2, 2, 2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1
    d = d.cumprod(-1).flip(-1)
    d[:, :, 1, 0] = float("inf")  # values cannot take 128-token groups
    policy = CachePolicy(residual=16, block=128)
    curves = Curves(d, bits, specs, torch.ones(2, 2, 2, dtype=torch.float64), "output", fp,
                    {"policy": policy.to_dict()})
    plan = solve(curves, 2.5)
    assert plan.policy == policy
    assert set(plan.v_quantizer.flatten().tolist()) == {plan.quantizers.index(specs[1])}


def test_one_budget_rule_for_every_budget():
    from rateq.evaluate import baselines
    from rateq.plan import check_budget

    assert baselines.check_budget is check_budget  # the evaluation's budgets follow the same rule
    for bad in (float("nan"), float("inf"), 0, -1.5, "3", True, None, [3.0]):
        with pytest.raises(rateq.RateQError,
                           match="^budget must be a positive, finite number of effective bits per element"):
            check_budget(bad)
    with pytest.raises(rateq.RateQError, match="^--budget must be a positive, finite number"):
        check_budget(0, "--budget")
    assert check_budget(3) == 3.0 and type(check_budget(np.float32(2.5))) is float
    assert check_budget(None, optional=True) is None
    with pytest.raises(rateq.RateQError, match=r"^a plan's budget must be a positive, finite number .*\(or None\)"):
        rateq.Plan.uniform(rateq.ModelFingerprint("m", "llama", 1, 1, 64), 2, budget_bits=float("nan"))


def test_the_early_feasibility_check_is_the_solvers(curves_factory):
    from rateq.solve.problem import build_problem, check_feasible_budget

    curves = curves_factory(2, 2, bits=(1, 2, 3), seed=0)
    lo, hi = build_problem(curves, 1.0, check_budget=False).cost_range()
    for budget in (lo, (lo + hi) / 2, hi):
        assert check_feasible_budget(budget, curves.quantizers, curves.bits) == budget
        assert rateq.solve(curves, budget).effective_bits <= budget * (1 + 1e-12)
    for budget in (lo * 0.99, hi * 1.01):
        with pytest.raises(rateq.RateQError) as early:
            check_feasible_budget(budget, curves.quantizers, curves.bits, what="--budget")
        with pytest.raises(rateq.RateQError) as late:
            rateq.solve(curves, budget)
        shown = f"{budget:g} effective bits per element is outside the feasible range [{lo:.4f}, {hi:.4f}]"
        assert str(early.value).startswith(f"--budget {shown} of quantizers ")
        assert str(late.value).startswith(f"budget {shown} for these curves")
    with pytest.raises(rateq.RateQError, match="^budget must be a positive, finite number"):
        check_feasible_budget(float("nan"), curves.quantizers, curves.bits)
