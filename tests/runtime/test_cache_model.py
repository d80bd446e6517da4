"""RateQCache inside real forward passes and `generate`, on tiny random models (GQA, MHA, sliding window)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from rateq import CachePolicy, Plan, QuantSpec, RateQCache, fingerprint, simulate_plan

POLICY = CachePolicy(residual=8, block=16, sinks=2)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_16_bit_plan_gives_dynamic_cache_logits(arch, tiny, decode):
    # 16-bit units are stored in fp16, so in an fp16 model they hold exactly what DynamicCache holds.
    model = tiny(arch).to(torch.float16)
    plan = Plan.uniform(fingerprint(model), 16)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(0))
    got = decode(model, ids, RateQCache(plan, model.config, policy=POLICY), 20)
    want = decode(model, ids, DynamicCache(config=model.config), 20)
    assert torch.equal(got, want)


# Tolerance of decode vs the one-pass evaluation. At the cache level the two agree bit for bit
# (test_store_policy.py); here the K/V themselves come from a one-token forward in one case and a whole-sequence
# forward in the other, which differ in the last float bits (~1e-7) and now and then flip a rounding decision of
# the quantizer. Measured on these models and plans: max |Δlogit| ≤ 2e-4 (mostly ~3e-7), while full precision
# differs from the quantized runs by ≥ 3.5e-2.
LOGIT_ATOL = 2e-3
R0 = CachePolicy(residual=0, block=16)
CASES = [("llama", 2, POLICY), ("llama", 2, R0), ("qwen3", 4, POLICY), ("qwen3", 4, R0), ("mistral", 1, POLICY),
         ("gemma3", 2, POLICY), ("gemma3", 2, R0)]


@pytest.mark.parametrize("arch,kv_heads,policy", CASES,
                         ids=lambda v: v if isinstance(v, str) else (f"r{v.residual}" if isinstance(v, CachePolicy) else f"kv{v}"))
def test_token_by_token_decoding_matches_one_pass_simulation(arch, kv_heads, policy, tiny, decode, mixed_plan):
    # GQA (llama), MHA (qwen3: 4 KV heads = 4 query heads), MQA (mistral), sliding-window layers (gemma3)
    model = tiny(arch, kv_heads=kv_heads)
    plan = mixed_plan(model, seed=kv_heads, bits=(2, 3, 4, 6, 8, 16))
    ids = torch.randint(0, 256, (2, 56), generator=torch.Generator().manual_seed(1))  # 3 key blocks, > R, > window
    prefill = 19
    got = decode(model, ids, RateQCache(plan, model.config, policy=policy), prefill)
    with torch.no_grad(), simulate_plan(model, plan, policy, prefill=prefill):
        want = model(ids, use_cache=False).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    # and the quantization is not a no-op: full precision differs from both by far more than the tolerance
    with torch.no_grad():
        fp = model(ids).logits
    assert (fp - want).abs().max() > 10 * LOGIT_ATOL


def test_greedy_and_beam_search_generate(tiny):
    model = tiny("llama").to(torch.float16)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    for beams in (1, 2):
        # a 16-bit plan reproduces DynamicCache's search exactly, beam reordering included
        plan16 = Plan.uniform(fingerprint(model), 16)
        ours = model.generate(ids, past_key_values=RateQCache(plan16, model.config, policy=POLICY), num_beams=beams, **kw)
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), num_beams=beams, **kw)
        assert torch.equal(ours, ref), beams
        # a quantized plan runs through the same paths (beyond R, across blocks)
        cache = RateQCache(Plan.uniform(fingerprint(model), 3, 2, spec=QuantSpec(group_size=8)), model.config, policy=POLICY)
        out = model.generate(ids, past_key_values=cache, num_beams=beams, **kw)
        assert out.shape == (1, 42)
        assert cache.get_seq_length() == 41  # the last token is never fed back
        held = cache.held_positions()[0]["v"]
        assert held["quantized"] == 41 - POLICY.sinks - POLICY.residual
