"""Calibration learns static scales on windows held out from the priced ones, prices the formats with them, and
hands them to the solver's plans, which run in the cache as in the one-pass evaluation."""

from __future__ import annotations

import pytest
import torch

import rateq
from rateq import CachePolicy, RateQCache, parse_spec, simulate_plan
from rateq.calibrate import calibrate, calibration_ids
from rateq.quant.static import ScaleStats, scale_key

SPECS = ["fp8", "fp8_tensor", "int8_head", "int4_head", "minmax-g16-fp16"]
POLICY = CachePolicy(residual=0, block=16, sinks=0)


@pytest.fixture(scope="module")
def model(tiny):
    return tiny("llama")


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def curves(model, stream):
    return calibrate(model, None, stream, bits=(2, 4, 8), quantizers=SPECS, metric="output", policy=POLICY,
                     n_samples=2, seq_len=48)


def test_held_out_windows_share_no_token_with_the_priced_ones(stream):
    priced, _ = calibration_ids(None, stream, 2, 48, seed=0)
    learned, _ = calibration_ids(None, stream, 2, 48, seed=0, held_out=True)
    starts = lambda w: {int((stream.unfold(0, 48, 48) == row).all(1).nonzero()[0]) for row in w}  # noqa: E731
    assert not starts(priced) & starts(learned) and len(starts(priced) | starts(learned)) == 4
    with pytest.raises(rateq.RateQError, match="no held-out windows"):
        calibration_ids(None, priced, held_out=True)


def test_scales_are_learned_on_held_out_windows_and_kept_with_the_curves(model, stream, curves, tmp_path):
    assert set(curves.params) == {"fp8_tensor.scale", "int8_head.scale", "int4_head.scale"}
    facts = curves.calibration["learned"]
    assert facts["windows"] == "held out" and facts["tokens"] == 96 and facts["seconds"] > 0
    # the same scales as a ScaleStats fed the held-out windows' keys and values directly
    ids, _ = calibration_ids(None, stream, 2, 48, seed=0, held_out=True)
    fp = rateq.fingerprint(model)
    stats = ScaleStats(fp.num_layers, fp.num_kv_heads)
    with rateq.hooks.attention_hook(model, _observer(stats)), torch.no_grad():
        for row in ids:  # one window per forward, as calibrate's batch_size=1
            model.base_model(input_ids=row[None], use_cache=False)
    for q in ("fp8_tensor", "int8_head", "int4_head"):
        torch.testing.assert_close(curves.params[f"{q}.scale"], stats.fit(parse_spec(q)))
    curves.save(tmp_path / "c.safetensors")
    back = rateq.Curves.load(tmp_path / "c.safetensors")
    assert all(torch.equal(back.params[k], v) for k, v in curves.params.items())


def _observer(stats):
    from rateq.hooks import plain_attention

    def fn(module, query, key, value, mask, **kw):
        stats.observe(module.layer_idx, "k", key)
        stats.observe(module.layer_idx, "v", value)
        return plain_attention(module, query, key, value, mask, **kw)
    return fn


def test_windows_given_as_ids_are_both_learned_and_priced_and_say_so(model, stream):
    ids, _ = calibration_ids(None, stream, 2, 48, seed=0)
    c = calibrate(model, None, ids, bits=(8,), quantizers=["fp8_tensor", "minmax-g16-fp16"], metric="mse", policy=POLICY)
    assert c.calibration["learned"]["windows"].startswith("the priced windows")


def test_static_formats_are_priced_at_their_width_only_and_rank_as_expected(curves):
    d = curves.distortion
    q = {s.id: i for i, s in enumerate(curves.quantizers)}
    for kind, width in (("int8_head", 8), ("int4_head", 4)):
        others = [i for i, b in enumerate(curves.bits) if b != width]
        assert torch.isinf(d[..., q[kind], others]).all()
    b8, b4 = curves.bits.index(8), curves.bits.index(4)
    assert (d[..., q["int8_head"], b8] < d[..., q["int4_head"], b4]).all()


def test_a_plan_of_learned_scales_runs_in_the_cache_as_in_the_one_pass_evaluation(model, curves, tmp_path):
    plan = rateq.solve(curves, 6.0)
    used = {s.id for s in plan.quantizers}
    assert used & {"fp8_tensor", "int8_head", "int4_head"}, used
    assert set(plan.params) == {scale_key(s) for s in plan.quantizers if s.static_scale}
    rateq.save_profile(plan, tmp_path / "p.safetensors")
    plan = rateq.load_profile(tmp_path / "p.safetensors")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), simulate_plan(model, plan, POLICY, prefill=16):
        want = model(ids, use_cache=False).logits
    cache = RateQCache(plan, model, policy=POLICY)
    with torch.no_grad():
        out = model(ids[:, :16], past_key_values=cache, use_cache=True).logits
        got = [out]
        for t in range(16, 40):
            got.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-3, rtol=0)


def test_a_reference_plan_with_static_scales_calibrates_around_them(model, stream, curves):
    plan = rateq.solve(curves, 6.0)
    c = calibrate(model, None, stream, bits=(8,), quantizers=["int8_head", "minmax-g16-fp16"], metric="mse",
                  policy=POLICY, n_samples=2, seq_len=48, reference=plan)
    assert torch.isfinite(c.distortion).any()


def test_learning_reports_its_progress(model, stream):
    events = []
    calibrate(model, None, stream, bits=(2, 8), quantizers=["int8_head", "minmax-g16-fp16"], metric="mse",
              policy=POLICY, n_samples=2, seq_len=48, progress=events.append)
    learn = [e for e in events if e["event"] == "learn"]
    tokens = [e for e in learn if e["stage"] == "tokens"]
    assert [e["done"] for e in tokens] == [0, 48, 96] and all(e["total"] == 96 for e in tokens)
    assert [(e["done"], e["total"]) for e in learn if e["stage"] == "fit"] == [(0, 1), (1, 1)]
    assert events.index(learn[-1]) < events.index(next(e for e in events if e["event"] == "start"))
