"""Engine rules in the problem itself: `tie="model"` (one slot for every key of the model, one for every value, as
llama.cpp's global cache types) and fixed-width formats chosen at their own width only."""

import numpy as np
import pytest
import torch

import rateq
from rateq.curves import Curves
from rateq.models import ModelFingerprint
from rateq.quant.spec import KIVI, parse_spec
from rateq.solve.problem import FP16, build_problem


def assert_model_tie(plan):
    for role in ("k", "v"):
        bits, qid = plan.bits(role), plan.quantizer_ids(role)
        assert (bits == bits[0, 0]).all() and (qid == qid[0, 0]).all(), role


@pytest.mark.parametrize("seed", range(4))
def test_model_tie_is_optimal_and_honoured_by_every_method(curves_factory, brute, plan_dist, seed):
    curves = curves_factory(2, 2, bits=(1, 2, 3), seed=seed)
    kv = seed % 2 == 1
    lo, hi = build_problem(curves, 1.0, check_budget=False, tie="model", keys_at_least_values=kv).cost_range()
    for budget in np.linspace(lo, hi, 4):
        best = brute(curves, budget, tie="model", keys_at_least_values=kv)
        for method in ("exact", "greedy", "convex"):
            plan = rateq.solve(curves, float(budget), method=method, tie="model", keys_at_least_values=kv)
            assert_model_tie(plan)
            assert plan.effective_bits <= budget * (1 + 1e-12) and plan.solver["tie"] == "model"
            if kv:
                assert (plan.k_bits >= plan.v_bits).all()
            if method == "exact":
                assert plan_dist(curves, plan) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(per_layer_budget=3.0), "tie='model' gives every layer's keys one slot and every layer's values one"),
    (dict(devices=[(0, 0, 3.0), (1, 1, 3.0)]), "per-layer budgets and devices cap single layers"),
    (dict(fixed={(0, 0, "k"): 1, (1, 1, "k"): 3}), r"^tie='model': every layer's keys: no candidate is allowed"),
])
def test_model_tie_refusals(curves_factory, kwargs, message):
    with pytest.raises(rateq.RateQError, match=message):
        rateq.solve(curves_factory(2, 2, bits=(1, 2, 3)), 3.0, tie="model", **kwargs)


def format_curves(bits=(2, 4, 8), seed=0):
    """KIVI, nvfp4 and fp8 curves where each format's distortion at widths it is not stored at is a trap: tiny
    above its width, +inf below it (as calibration writes it)."""
    rng = np.random.default_rng(seed)
    specs = [KIVI, parse_spec("nvfp4"), parse_spec("fp8")]
    d = np.sort(rng.lognormal(0, 1, (2, 2, 2, 3, len(bits))), -1)[..., ::-1].copy()
    for qi, q in enumerate(specs):
        for bi, b in enumerate(bits):
            if not q.allows_bits(b):
                d[:, :, :, qi, bi] = 1e-9 if b > q.fixed_bits else np.inf
    return Curves(torch.tensor(d), bits, specs, torch.full((2, 2, 2), 256.0), "output",
                  ModelFingerprint("synthetic", "llama", 2, 2, 64), {})


def test_fixed_width_formats_are_chosen_at_their_own_width_only(brute, plan_dist):
    curves = format_curves()
    problem = build_problem(curves, 6.0, allow_fp16=True)
    stored = [q == FP16 or curves.quantizers[q].allows_bits(int(b)) for q, b in zip(problem.slot_q, problem.slot_bits)]
    assert (problem.valid == np.array(stored)[None, :]).all()  # every unit: exactly the stored slots
    assert rateq.budget_range(curves.quantizers[1:], curves.bits) == (4.5, 8.0)
    for budget in (3.0, 4.5, 5.0, 6.5, 8.0):
        for method in ("exact", "greedy", "convex"):
            plan = rateq.solve(curves, budget, method=method)
            for role in ("k", "v"):
                for i, q in enumerate(plan.quantizers):
                    used = plan.bits(role)[plan.quantizer_ids(role) == i]
                    assert all(q.allows_bits(int(b)) for b in used), (q.id, used)
            if method == "exact":
                assert plan_dist(curves, plan) == pytest.approx(brute(curves, budget), rel=1e-9)


@pytest.mark.parametrize("fixed, message", [
    ({(0, 0, "k"): ("nvfp4", 8)}, r"^fixed unit \(0, 0, 'k'\): quantizer nvfp4 is stored at 4 bits only, not 8$"),
    ({(1, 1, "v"): ("fp8", 4)}, "quantizer fp8 is stored at 8 bits only, not 4"),
])
def test_fixing_a_format_at_another_width_is_refused(fixed, message):
    with pytest.raises(rateq.RateQError, match=message):
        rateq.solve(format_curves(), 6.0, fixed=fixed)


def test_a_width_no_format_is_stored_at_is_refused():
    curves = format_curves(bits=(4, 5, 8))
    only = Curves(curves.distortion[:, :, :, 1:], curves.bits, curves.quantizers[1:], curves.counts, "output",
                  curves.model, {})
    with pytest.raises(rateq.RateQError, match=r"no quantizer of the curves is stored at 5 bits \(engine formats take "
                                               r"their own width only: nvfp4 at 4, fp8 at 8\)$"):
        rateq.solve(only, 6.0, fixed={(0, 0, "k"): 5})
    with pytest.raises(rateq.RateQError, match=r"none of quantizers nvfp4, fp8 is stored at bits \[5\]"):
        rateq.budget_range(only.quantizers, (5,))
