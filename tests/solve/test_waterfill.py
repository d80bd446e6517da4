"""`waterfill`: the exponential fit, the budget, and a sensible allocation on RateQuant-shaped curves."""

import numpy as np
import pytest

import rateq
from rateq.quant.spec import KIVI, QuantSpec
from rateq.solve import fit_exponential
from rateq.solve.problem import build_problem


def test_fit_recovers_alpha_and_beta(curves_factory):
    curves = curves_factory(2, 2, bits=(1, 2, 3, 4, 5, 6, 8), seed=1, kind="exponential")
    alpha, k, rmse = fit_exponential(build_problem(curves, 4.0))
    d = curves.distortion.reshape(8, 2, 7).numpy()
    assert rmse < 1e-10
    np.testing.assert_allclose(alpha * np.exp(-k * 1.0), d[..., 0], rtol=1e-9)
    np.testing.assert_allclose(np.exp(k), d[..., 0] / d[..., 1], rtol=1e-9)  # β = D(b) / D(b + 1)


@pytest.mark.parametrize("seed", range(8))
def test_waterfill_respects_budget(curves_factory, seed):
    qs = [KIVI, QuantSpec(group_size=128, zero="code"), QuantSpec(kind="symmetric", group_size=64)]
    curves = curves_factory(3, 2, bits=(1, 2, 3, 4, 6, 8), quantizers=qs, seed=seed)
    lo, hi = rateq.budget_range(qs, curves.bits)
    for budget in np.linspace(lo, hi, 7):
        plan = rateq.solve(curves, float(budget), method="waterfill")
        assert plan.effective_bits <= budget * (1 + 1e-12)


def test_waterfill_beats_uniform_on_exponential_curves(curves_factory):
    # Heterogeneous sensitivities: giving every unit the same bits wastes budget on the insensitive ones.
    curves = curves_factory(4, 2, bits=(1, 2, 3, 4, 5, 6, 8), quantizers=[KIVI], seed=3, kind="exponential",
                            equal_counts=True)
    uniform = float(curves.distortion[..., 0, 2].sum())  # 3 bits everywhere = 4.0 effective bits
    plan = rateq.solve(curves, 4.0, method="waterfill")
    exact = rateq.solve(curves, 4.0, method="exact")
    d = plan.solver["predicted_distortion"]
    assert d < 0.8 * uniform
    assert exact.solver["predicted_distortion"] <= d * (1 + 1e-12)
    assert plan.solver["fitted_distortion"] == pytest.approx(d, rel=1e-6)  # exact fit: model = measurement


def test_waterfill_refuses_side_constraints(curves_factory):
    curves = curves_factory(1, 2, seed=0)
    with pytest.raises(rateq.RateQError, match="exact.*greedy"):
        rateq.solve(curves, 3.0, method="waterfill", keys_at_least_values=True)
