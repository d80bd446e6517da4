"""calibrate() on the bundled smollm2-135m: one short pass over Emma (1 × 256 tokens)."""

import pytest
import torch

import rateq
from rateq.calibrate import calibrate_metrics

pytestmark = pytest.mark.slow


def test_calibrate_the_default_model(smol):
    model, tok = smol
    by = calibrate_metrics(model, tok, "austen-emma", metrics=("mse", "output", "fisher"), bits=(1, 2, 4, 8),
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
