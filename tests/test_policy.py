import pytest
import torch

from rateq import CachePolicy


def test_no_residual_quantizes_everything_in_whole_blocks():
    p = CachePolicy(residual=0, block=32)
    assert p.quantized_values(100) == 100
    assert p.quantized_keys(100) == 96  # the ragged last block waits for completion
    assert p.quantized_keys(31) == 0


def test_residual_and_sinks():
    p = CachePolicy(residual=64, block=32, sinks=4)
    assert p.quantized_values(50) == 4 and p.quantized_keys(50) == 4
    assert p.quantized_values(200) == 136
    assert p.quantized_keys(200) == 4 + 128  # (200 - 64 - 4) = 132 → 4 whole blocks
    # keys in full precision never exceed residual + block - 1 (beyond the sinks)
    for n in range(300):
        assert n - p.quantized_keys(n) <= max(p.sinks, 0) + p.residual + p.block - 1 or n < p.sinks


@pytest.mark.parametrize("prefill", [None, 10, 40])
def test_masks_follow_prefill_then_decode(prefill):
    p = CachePolicy(residual=8, block=4)
    T = 48
    km, vm = p.quantized_masks(T, prefill=prefill)
    for i in range(T):
        n = max(i + 1, min(prefill or T, T))
        assert int(km[i].sum()) == p.quantized_keys(n)
        assert int(vm[i].sum()) == p.quantized_values(n)
    # the quantized prefix only grows: history is never re-quantized
    assert torch.all(km[1:].sum(1) >= km[:-1].sum(1))


def test_policy_for_quantizers_fits_every_key_group():
    from rateq import parse_spec

    specs = [parse_spec(s) for s in ("minmax-g32-fp16", "minmax-g128-rhadamard-fp16-prerope", "lloydmax-g64-rhadamard-fp16")]
    assert CachePolicy.for_quantizers(specs).block == 128  # Lloyd–Max groups run along channels: no constraint
    assert CachePolicy.for_quantizers(specs[:1]).block == 32
    assert CachePolicy.for_quantizers([parse_spec("minmax-g48-fp16")], residual=8).block == 96
    assert CachePolicy.for_quantizers(specs, block=256, sinks=4) == CachePolicy(block=256, sinks=4)
    p = CachePolicy(residual=64, block=128, sinks=2)
    assert CachePolicy.from_dict(p.to_dict()) == p
