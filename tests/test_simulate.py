import pytest
import torch

import rateq
from rateq import CachePolicy, Plan, QuantSpec
from rateq.quant import fake_quantize
from rateq.simulate import plan_transform, simulate, simulate_plan


def logits(model, ids, ctx=None):
    with torch.no_grad():
        if ctx is None:
            return model(ids, use_cache=False).logits
        with ctx:
            return model(ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("policy", [CachePolicy(), CachePolicy(residual=8, block=4, sinks=2)])
def test_identity_transform_is_the_plain_model(tiny, arch, policy):
    model = tiny(arch)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    got = logits(model, ids, simulate(model, lambda layer, role, x: x, policy, prefill=12))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_plan_transform_quantizes_each_head_at_its_bits(tiny):
    model = tiny("llama", kv_heads=2)
    fp = rateq.fingerprint(model)
    spec = QuantSpec(group_size=8)
    plan = Plan.uniform(fp, 4, 2, spec=spec)
    plan.k_bits[1, 1] = 1
    plan.v_bits[2, 0] = 16
    policy = CachePolicy(block=8, sinks=3)
    x = torch.randn(1, 2, 30, 16)
    t = plan_transform(plan, policy)
    k = t(1, "k", x)
    assert torch.equal(k[:, :, :3], x[:, :, :3])  # sinks stay full precision
    assert torch.equal(k[:, :, 27:], x[:, :, 27:])  # ragged block after 3 + 3*8 = 27 is never seen quantized
    assert torch.equal(k[:, 0:1, 3:27], fake_quantize(x[:, 0:1, 3:27], 4, spec, "k"))
    assert torch.equal(k[:, 1:2, 3:27], fake_quantize(x[:, 1:2, 3:27], 1, spec, "k"))
    v = t(2, "v", x)
    assert torch.equal(v[:, 0, 3:], x[:, 0, 3:].half().float())
    assert torch.equal(v[:, 1:2, 3:], fake_quantize(x[:, 1:2, 3:], 2, spec, "v"))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_each_query_sees_the_cache_as_it_was_at_its_step(tiny, kv_heads):
    # One layer: the logits at position t depend only on query t's view of the cache. Under decoding that view is
    # the cache after t+1 tokens, which a full-prefill run on the first t+1 tokens reproduces at its last row.
    model = tiny("llama", kv_heads=kv_heads, num_hidden_layers=1)
    plan = Plan.uniform(rateq.fingerprint(model), 2, 1, spec=QuantSpec(group_size=4))
    policy = CachePolicy(residual=6, block=4, sinks=1)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    prefill = 9
    got = logits(model, ids, simulate_plan(model, plan, policy, prefill=prefill))
    for t in range(prefill, 30):
        ref = logits(model, ids[:, : t + 1], simulate_plan(model, plan, policy))[:, -1]
        torch.testing.assert_close(got[:, t], ref, atol=1e-5, rtol=1e-5)
    ref = logits(model, ids[:, :prefill], simulate_plan(model, plan, policy))
    torch.testing.assert_close(got[:, :prefill], ref, atol=1e-5, rtol=1e-5)


def test_quantization_changes_logits_monotonically_with_bits(tiny):
    model = tiny("qwen3")
    fp = rateq.fingerprint(model)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    ref = logits(model, ids)
    errs = [float((logits(model, ids, simulate_plan(model, Plan.uniform(fp, b, spec=QuantSpec(group_size=16)))) - ref)
                  .pow(2).mean()) for b in (1, 2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3] > 0
