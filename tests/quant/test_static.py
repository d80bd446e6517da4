"""Static scales: fitted per unit (or per layer and role) from K/V seen in calibration, checked wherever they
are stored, and carried from curves to plans, profiles, plan JSON and the cache."""

from __future__ import annotations

import pytest
import torch

from rateq import CachePolicy, ModelFingerprint, Plan, RateQError, parse_spec
from rateq.quant.codec import fake_quantize
from rateq.quant.engine_formats import static_qmax
from rateq.quant.params import check_params, wanted_params
from rateq.quant.static import ScaleStats, scale_key

STATIC = ["fp8_tensor", "fp8_head", "int8_tensor", "int8_head", "int4_head"]


def stats_of(x_by_layer, H=3):
    s = ScaleStats(len(x_by_layer), H)
    for l, x in enumerate(x_by_layer):
        s.observe(l, "k", x)
        s.observe(l, "v", x * 0.5)
    return s


def heavy(seed, shape=(2, 3, 64, 32)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1, 1)  # heads of very different ranges
    x[0, :, 3, 5] *= 20  # a rare extreme per head
    return x


@pytest.mark.parametrize("kind", STATIC)
def test_fitted_scales_are_positive_tied_per_layer_and_beat_the_plain_maximum(kind):
    spec = parse_spec(kind)
    x = heavy(0)
    stats = stats_of([x, heavy(1)])
    scale = stats.fit(spec)
    assert scale.shape == (2, 3, 2) and bool((scale > 0).all())
    if spec.static_scale == "tensor":
        assert bool((scale == scale[:, :1]).all())
    else:  # heads of different ranges get different scales
        assert scale[0, 0, 0] < scale[0, 1, 0] < scale[0, 2, 0]
    # the fit is the least-squares choice on what it saw: never worse than amax / qmax there
    plain = stats.amax.clone()
    if spec.static_scale == "tensor":
        plain = plain.amax(1, keepdim=True).expand_as(plain)
    plain = plain / static_qmax(kind)
    err = lambda s: float(((fake_quantize(x, spec.fixed_bits, spec, "k", param=s[0, :, 0]) - x) ** 2).sum())  # noqa: E731
    assert err(scale) <= err(plain) * 1.0001
    if kind == "int4_head":  # 4 bits gain from clipping the rare extremes
        assert err(scale) < 0.9 * err(plain)


def test_the_same_data_gives_the_same_scales_and_more_data_moves_them():
    spec = parse_spec("int8_head")
    a = stats_of([heavy(0), heavy(1)]).fit(spec)
    assert torch.equal(a, stats_of([heavy(0), heavy(1)]).fit(spec))
    s = stats_of([heavy(0), heavy(1)])
    s.observe(0, "k", heavy(7) * 3)
    assert not torch.equal(s.fit(spec), a)


def test_the_sample_stays_bounded():
    s = ScaleStats(1, 3, cap=1024)
    for i in range(20):
        s.observe(0, "k", heavy(i))
    assert s.samples[(0, 0)].shape[1] <= 1024


def test_a_unit_never_seen_cannot_be_fitted_and_other_formats_have_nothing_to_fit():
    s = ScaleStats(2, 3)
    s.observe(0, "k", heavy(0))
    with pytest.raises(RateQError, match="no K/V seen for layer 0 V"):
        s.fit(parse_spec("fp8_head"))
    with pytest.raises(RateQError, match="fp8 has no static scale"):
        s.fit(parse_spec("fp8"))


def test_scales_are_checked_wherever_they_are_stored():
    spec = parse_spec("fp8_tensor")
    good = torch.full((2, 3, 2), 0.1)
    want = wanted_params([(spec, 8)], 2, 3, 32)
    assert torch.equal(check_params({"fp8_tensor.scale": good}, want, "x")["fp8_tensor.scale"], good)
    for bad, msg in ((torch.full((2, 3), 0.1), "shape"), (torch.zeros(2, 3, 2), "positive"),
                     (torch.full((2, 3, 2), float("nan")), "NaN"), (torch.ones(2, 3, 2, dtype=torch.int64), "real"),
                     (torch.rand(2, 3, 2) + 0.1, "heads differ")):
        with pytest.raises(RateQError, match=msg):
            check_params({"fp8_tensor.scale": bad}, want, "x")
    with pytest.raises(RateQError, match="lack the calibrated fp8_tensor.scale"):
        check_params({}, want, "the plan")
    with pytest.raises(RateQError, match="hold parameters for no quantizer of theirs: int8_head.scale"):
        check_params({"fp8_tensor.scale": good, "int8_head.scale": good}, want, "the plan")


def static_plan(kind="int8_head"):
    spec = parse_spec(kind)
    fp = ModelFingerprint("tiny", "llama", 2, 3, 32)
    scale = torch.tensor([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06]]).unsqueeze(-1).expand(2, 3, 2).clone()
    scale[..., 1] *= 2
    return Plan.uniform(fp, spec.fixed_bits, spec=spec, params={scale_key(spec): scale}, policy=CachePolicy())


def test_plans_need_their_scales_and_round_trip_them_through_profiles_and_json(tmp_path):
    from rateq import load_profile, plan_from_json, plan_to_json, save_profile

    plan = static_plan()
    with pytest.raises(RateQError, match="lack the calibrated int8_head.scale"):
        Plan.uniform(plan.model, 8, spec=parse_spec("int8_head"))
    save_profile(plan, tmp_path / "p.safetensors")
    back = load_profile(tmp_path / "p.safetensors")
    assert torch.equal(back.params["int8_head.scale"], plan.params["int8_head.scale"])
    doc = plan_to_json(plan)
    assert [row[0] for row in doc["params"]["int8_head.scale"][1]] == pytest.approx([0.04, 0.05, 0.06])  # layer 1, K
    assert torch.equal(plan_from_json(doc).params["int8_head.scale"], plan.params["int8_head.scale"])
    assert plan.param(1, [0, 2], "v", parse_spec("int8_head"), 8).tolist() == pytest.approx([0.08, 0.12])
    assert plan.effective_bits == 8.0  # no per-token metadata


def test_a_profile_with_a_damaged_or_foreign_scale_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from rateq import load_profile, save_profile

    path = tmp_path / "p.safetensors"
    save_profile(static_plan(), path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for change, msg in ((lambda t: t.update({"param.int8_head.scale": t["param.int8_head.scale"][:1]}), "shape"),
                        (lambda t: t.pop("param.int8_head.scale"), "lack the calibrated"),
                        (lambda t: t.update({"param.q4_0.scale": torch.ones(2, 3, 2)}), "no quantizer of theirs")):
        t = dict(tensors)
        change(t)
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(RateQError, match=f"damaged profile.*{msg}"):
            load_profile(tmp_path / "bad.safetensors")
