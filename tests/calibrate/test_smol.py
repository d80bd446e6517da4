"""calibrate() on the bundled smollm2-135m: one short pass over Emma (1 × 256 tokens)."""

import pytest
import torch

import rateq
from rateq.calibrate import calibrate_metrics

pytestmark = pytest.mark.slow


def test_calibrate_the_default_model(smol):
    model, tok = smol
    by = calibrate_metrics(model, tok, "austen-emma", metrics=("mse", "output", "fisher"), bits=(1, 2, 4, 8),
                           quantizers=["minmax-g32-fp16"],
                           n_samples=1, seq_len=256)
    for m, curves in by.items():
        assert curves.shape == (30, 3, 2, 1, 4), m
        assert curves.model == rateq.fingerprint(model) and curves.model.name == "smollm2-135m"
        assert (curves.counts == 256 * 64).all()
        d = curves.distortion
        assert torch.isfinite(d).all() and (d[..., 0] > 0).all()
        assert (d[..., -1] < 1e-3 * d[..., 0]).all(), m  # 8 bits: near-zero next to 1 bit, every unit
        assert curves.monotone().nonmonotone() == []
        cal = curves.calibration
        assert (cal["data"], cal["tokens"], cal["seq_len"], cal["n_samples"]) == ("austen-emma", 256, 256, 1)
    assert by["mse"].nonmonotone() == []
    assert len(by["fisher"].nonmonotone()) <= 0.02 * by["fisher"].distortion.numel()
    # A real English window: next-token NLL of a 135M model is a few nats (PPL in the tens), not uniform (10.8).
    assert 2.0 < by["fisher"].calibration["nll"] < 4.5


def test_default_quantizers_on_the_default_model(smol):
    """The default candidates on a real 64-dim-head model: every quantizer holds keys, all but the 128-token key
    groups hold values; the solved plan runs through RateQCache (pre-RoPE keys with the model's rotary tables)."""
    from rateq.calibrate import DEFAULT_QUANTIZERS

    model, tok = smol
    curves = rateq.calibrate(model, tok, "austen-emma", bits=(2, 3), n_samples=1, seq_len=128, metric="output")
    assert [q.id for q in curves.quantizers] == list(DEFAULT_QUANTIZERS)
    assert curves.calibration["policy"]["block"] == 128
    d = curves.distortion
    g128 = DEFAULT_QUANTIZERS.index("minmax-g128-rhadamard-fp16-prerope")
    assert torch.isinf(d[:, :, 1, g128]).all()
    finite = torch.ones_like(d, dtype=torch.bool)
    finite[:, :, 1, g128] = False
    assert torch.isfinite(d[finite]).all()
    plan = rateq.solve(curves, 2.75)
    assert plan.policy.block == 128 and plan.effective_bits <= 2.75 + 1e-9
    ids = rateq.text_windows(tok, "austen-pp", 1, 160, seed=None, char_start=1000)
    cache = rateq.RateQCache(plan, model)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 160
    # The bytes held are the plan's accounting exactly: each quantized token of a unit at its effective bits
    # per element (`QuantSpec.bits_per_element`: codes + metadata), every other token in the model's dtype.
    n, shape, policy = 160, rateq.fingerprint(model), plan.policy
    quantized = {"k": policy.quantized_keys(n) - policy.sinks, "v": policy.quantized_values(n) - policy.sinks}
    assert quantized == {"k": 128, "v": 160}  # one whole 128-token key block; no residual window
    per_element = plan.unit_bits_per_element()  # (L, H, 2)
    fp_bytes = next(model.parameters()).element_size()
    coded_bits = sum(quantized[role] * shape.head_dim * float(per_element[..., r].sum()) for r, role in enumerate("kv"))
    plain = sum(n - quantized[role] for role in "kv") * shape.num_layers * shape.num_kv_heads * shape.head_dim
    assert coded_bits % 8 == 0
    assert cache.nbytes_by_kind()["full_precision"] == plain * fp_bytes
    assert cache.nbytes() == coded_bits // 8 + plain * fp_bytes
