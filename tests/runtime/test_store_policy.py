"""Cache-level exactness: what `RateQCache.update` returns is, bit for bit, what the one-pass evaluation's
transform shows a query at the same cache length (same plan, same policy), for every step of a decode."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from rateq import CachePolicy, RateQCache
from rateq.simulate import plan_transform

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, vocab_size=32)
POLICIES = [CachePolicy(residual=8, block=16), CachePolicy(residual=0, block=16, sinks=3),
            CachePolicy(residual=5, block=32, sinks=2), CachePolicy(residual=0, block=48)]


def expected_view(kv_hat, kv, n, end, sinks):
    """Positions [0, n): stored (quantized) form on [sinks, end), full precision elsewhere."""
    out = kv[:, :, :n].clone()
    out[:, :, sinks:end] = kv_hat[:, :, sinks:end]
    return out


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("prefill", [1, 20, 37])
def test_update_returns_the_simulated_view_exactly(policy, prefill, mixed_plan):
    config = LlamaConfig(**CONFIG)
    plan = mixed_plan(config, seed=prefill)
    T = 100  # several key blocks, well beyond the residual window
    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(2, 4, T, 16, generator=g) * 3, torch.randn(2, 4, T, 16, generator=g)
    transform = plan_transform(plan, policy)
    cache = RateQCache(plan, config, policy=policy)
    for layer in range(2):
        k_hat, v_hat = transform(layer, "k", K), transform(layer, "v", V)
        history = None
        for a, b in [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]:
            k, v = cache.update(K[:, :, a:b], V[:, :, a:b], layer)
            assert torch.equal(k, expected_view(k_hat, K, b, policy.quantized_keys(b), policy.sinks)), (layer, b)
            assert torch.equal(v, expected_view(v_hat, V, b, policy.quantized_values(b), policy.sinks)), (layer, b)
            # Stored history is never re-quantized: every bucket's earlier parts are unchanged, only appended to.
            now = [{name: t.clone() for name, t in held.values().items()}
                   for role in "kv" for held in cache.stored(layer, role)]
            if history is not None:
                for old, new in zip(history, now):
                    for name, t in old.items():
                        assert torch.equal(new[name][:, :, :t.shape[2]], t), name
            history = now
        assert cache.get_seq_length(layer) == T


def test_buckets_group_heads_by_bits_and_quantizer(mixed_plan):
    config = LlamaConfig(**CONFIG)
    plan = mixed_plan(config, seed=3)
    cache = RateQCache(plan, config)
    for layer in range(2):
        for role in "kv":
            buckets = cache.stored(layer, role)
            pairs = list(zip(plan.bits(role)[layer].tolist(), plan.quantizer_ids(role)[layer].tolist()))
            assert len(buckets) == len(set(pairs))
            heads = sorted(h for b in buckets for h in b.heads)
            assert heads == list(range(4))
            for b in buckets:
                assert all(pairs[h] == (b.bits, plan.quantizers.index(b.spec)) for h in b.heads)


@pytest.mark.parametrize("policy", [CachePolicy(residual=4, block=16), CachePolicy(residual=0, block=16, sinks=2)],
                         ids=str)
def test_sliding_layer_returns_the_window_and_forgets_the_rest(policy, mixed_plan):
    W = 16
    config = Gemma3TextConfig(**CONFIG, sliding_window=W, layer_types=["sliding_attention", "full_attention"])
    plan = mixed_plan(config, seed=1)
    cache = RateQCache(plan, config, policy=policy)
    assert cache.is_sliding == [True, False]
    T = 90
    g = torch.Generator().manual_seed(1)
    K, V = torch.randn(1, 4, T, 16, generator=g), torch.randn(1, 4, T, 16, generator=g)
    k_hat, v_hat = plan_transform(plan, policy)(0, "k", K), plan_transform(plan, policy)(0, "v", V)
    n0 = 0
    for a, b in [(0, 20)] + [(t, t + 1) for t in range(20, T)]:
        assert cache.get_mask_sizes(b - a, 0) == (min(b, b - a + W - 1) if n0 >= W else b, max(n0 - W + 1, 0))
        k, v = cache.update(K[:, :, a:b], V[:, :, a:b], 0)
        first = max(n0 - W + 1, 0)  # as DynamicSlidingWindowLayer: the W - 1 tokens before, and the new ones
        ek = expected_view(k_hat, K, b, policy.quantized_keys(b), policy.sinks)[:, :, first:]
        ev = expected_view(v_hat, V, b, policy.quantized_values(b), policy.sinks)[:, :, first:]
        assert torch.equal(k, ek) and torch.equal(v, ev), b
        held = cache.layers[0].held_positions()
        # bounded: the window, plus less than a key block (keys are dropped whole blocks at a time) and sinks
        assert sum(held["k"].values()) <= W - 1 + policy.block + policy.sinks
        assert sum(held["v"].values()) <= W - 1 + policy.sinks
        n0 = b
    assert cache.get_seq_length(0) == T


def test_plans_the_runtime_cannot_hold_exactly_are_refused(mixed_plan):
    from rateq import QuantSpec, RateQError

    config = LlamaConfig(**CONFIG)
    with pytest.raises(RateQError, match="not a multiple of quantizer"):
        RateQCache(mixed_plan(config, specs=[QuantSpec(group_size=16)]), config, policy=CachePolicy(block=8))
    with pytest.raises(RateQError, match="along channels"):  # values leave the window one token at a time
        RateQCache(mixed_plan(config, bits=(2,), specs=[QuantSpec(group_size=8, group_along="tokens")]), config)
    with pytest.raises(RateQError, match="head_dim 16"):
        RateQCache(mixed_plan(config, bits=(2,), specs=[QuantSpec(group_size=32)]), config)
    other = LlamaConfig(**{**CONFIG, "num_key_value_heads": 2})
    with pytest.raises(RateQError, match="num_kv_heads 4 vs 2"):
        RateQCache(mixed_plan(config), other)
