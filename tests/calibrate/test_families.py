"""Calibration with the quantizer families: pre-RoPE keys, rotations, Lloyd–Max, quantizers for one role only."""

from __future__ import annotations

import math

import pytest
import torch

import rateq
from rateq import CachePolicy, Plan, fingerprint, parse_spec, simulate_plan
from rateq.calibrate import calibrate
from rateq.quant.spec import holds_role

SPECS = ["minmax-g32-fp16-prerope", "minmax-g16-rhadamard-fp16", "lloydmax-g16-rhadamard-fp16", "minmax-g8-fp16"]
POLICY = CachePolicy(block=32)


@pytest.fixture(scope="module")
def curves(tiny_module):
    model = tiny_module
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    return model, ids, calibrate(model, None, ids, bits=(1, 2, 3, 8), quantizers=SPECS, metric="output", policy=POLICY)


@pytest.fixture(scope="module")
def tiny_module(tiny):
    return tiny("llama")


def test_holds_role():
    assert holds_role(parse_spec("minmax-g128-fp16"), "k", 64) and not holds_role(parse_spec("minmax-g128-fp16"), "v", 64)
    assert holds_role(parse_spec("minmax-g32-fp16"), "v", 64)
    assert not holds_role(parse_spec("minmax-g32-tokens-fp16"), "v", 64)  # values leave the window token by token
    assert holds_role(parse_spec("lloydmax-g64-rhadamard-fp16"), "k", 64)


def test_a_role_the_quantizer_cannot_hold_is_never_a_candidate(curves):
    model, ids, c = curves
    d = c.distortion
    q = SPECS.index("minmax-g32-fp16-prerope")  # head_dim 16: 32-channel value groups do not fit
    assert torch.isinf(d[:, :, 1, q]).all() and torch.isfinite(d[:, :, 0, q]).all()
    others = [i for i in range(len(SPECS)) if i != q]
    assert torch.isfinite(d[:, :, :, others]).all()
    for method in ("exact", "greedy", "waterfill"):
        plan = rateq.solve(c, 3.5, method=method, policy=POLICY)
        used_v = {plan.quantizers[i].id for i in plan.v_quantizer.flatten().tolist()}
        assert "minmax-g32-fp16-prerope" not in used_v, method
        assert plan.effective_bits <= 3.5 + 1e-9


def test_curves_with_infinite_points_round_trip(curves, tmp_path):
    _, _, c = curves
    c.save(tmp_path / "c.safetensors")
    back = rateq.Curves.load(tmp_path / "c.safetensors")
    assert torch.equal(back.distortion, c.distortion)


def test_prerope_candidates_match_a_direct_forward(curves):
    """The output metric of a pre-RoPE key unit is the error of that head's attention output with only that unit
    quantized: equal to the NLL-free direct check — the candidate's stored keys re-rotate to the same tensor the
    one-pass evaluation uses. Here: quantizing every key pre-RoPE at 8 bits is near lossless, at 1 bit is not."""
    model, ids, c = curves
    q = SPECS.index("minmax-g32-fp16-prerope")
    k = c.distortion[:, :, 0, q]  # (L, H, bits)
    assert (k[..., -1] < 1e-3 * k[..., 0]).all()
    fp = fingerprint(model)
    plan = Plan(torch.full((fp.num_layers, fp.num_kv_heads), 8), torch.full((fp.num_layers, fp.num_kv_heads), 16),
                torch.zeros(fp.num_layers, fp.num_kv_heads, dtype=torch.long),
                torch.zeros(fp.num_layers, fp.num_kv_heads, dtype=torch.long), [parse_spec(SPECS[q])], fp)
    with torch.no_grad():
        ref = model(ids).logits
        with simulate_plan(model, plan, POLICY):
            got = model(ids).logits
    assert (got - ref).abs().max() < 1e-2


def test_measured_around_a_prerope_reference_plan(curves):
    model, ids, c = curves
    plan = rateq.solve(c, 3.5, policy=POLICY)
    around = calibrate(model, None, ids, bits=(1, 2, 3, 8), quantizers=SPECS, metric="output", policy=POLICY,
                       reference=plan)
    assert around.calibration["reference"]["budget_bits"] == pytest.approx(3.5)
    assert torch.isfinite(around.distortion[:, :, 0]).all()
    assert not torch.equal(around.distortion, c.distortion)
    assert math.isfinite(float(around.distortion[:, :, 1, 1:].sum()))
