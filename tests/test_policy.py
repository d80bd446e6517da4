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


def test_the_key_block_rule():
    from rateq import RateQError, parse_spec

    g64 = parse_spec("minmax-g64-fp16")
    for block in (64, 128, 192):
        CachePolicy(block=block).check_key_group(g64)  # whole groups in every block
    with pytest.raises(RateQError) as exc:
        CachePolicy(block=96).check_key_group(g64)
    assert str(exc.value) == (
        "key block 96 is not a multiple of quantizer minmax-g64-fp16's group of 64 tokens (keys are quantized a "
        "whole block at a time); use a block that is a multiple of 64: CachePolicy(block=128) in Python, "
        "--block 128 on the command line")
    # Keys grouped along channels (Lloyd-Max, or group_along='channels') have no token groups to fit.
    CachePolicy(block=32).check_key_group(parse_spec("lloydmax-g64-rhadamard-fp16"))
    CachePolicy(block=32).check_key_group(parse_spec("minmax-g128-channels-fp16"))
    # The rule is the same wherever a policy meets a key quantizer: the one-pass evaluation says it too.
    from rateq import ModelFingerprint, Plan, plan_transform

    plan = Plan.uniform(ModelFingerprint("m", "llama", 1, 1, 16), 3, spec=g64)
    with pytest.raises(RateQError, match="^key block 96 is not a multiple of quantizer minmax-g64-fp16's group"):
        plan_transform(plan, CachePolicy(block=96))(0, "k", torch.zeros(1, 1, 192, 16))
    fp16 = Plan.uniform(ModelFingerprint("m", "llama", 1, 1, 16), 16, spec=g64)  # 16-bit units store no groups
    x = torch.randn(1, 1, 192, 16)
    assert torch.equal(plan_transform(fp16, CachePolicy(block=96))(0, "k", x), x.half().float())  # fp16, whole
