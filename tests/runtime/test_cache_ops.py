"""crop / reset / beam reordering / batch selection act on the packed store, residual and sinks alike — the
result equals a fresh cache fed the same tokens — or refuse, changing nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from rateq import CachePolicy, RateQCache, RateQError

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, vocab_size=32)
POLICY = CachePolicy(residual=6, block=16, sinks=2)


def kv(B=3, T=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, T, 16, generator=g), torch.randn(B, 4, T, 16, generator=g)


def feed(cache, K, V, prefill=10):
    """Write K/V `(B, H, T, D)` into every layer: a prefill chunk, then token by token."""
    T = K.shape[2]
    for a, b in [(0, min(prefill, T))] + [(t, t + 1) for t in range(prefill, T)]:
        for layer in range(len(cache.layers)):
            cache.update(K[:, :, a:b], V[:, :, a:b], layer)
    return cache


def same_state(a: RateQCache, b: RateQCache) -> None:
    """Two caches hold the same: positions, bytes, and what the next token's update returns."""
    assert a.get_seq_length() == b.get_seq_length()
    assert a.held_positions() == b.held_positions()
    assert a.nbytes_by_kind() == b.nbytes_by_kind()
    B = a.layers[0].batch_size
    k1, v1 = kv(B=B, T=1, seed=99)
    for layer in range(len(a.layers)):
        ka, va = a.update(k1, v1, layer)
        kb, vb = b.update(k1, v1, layer)
        assert torch.equal(ka, kb) and torch.equal(va, vb), layer


@pytest.fixture
def config():
    return LlamaConfig(**CONFIG)


def test_crop_before_anything_is_quantized_equals_a_fresh_cache(config, mixed_plan):
    plan = mixed_plan(config, seed=4)
    K, V = kv(T=8)
    cache = feed(RateQCache(plan, config, policy=POLICY), K, V)  # 8 = sinks + R tokens: all full precision
    cache.crop(-0)
    cache.crop(-3)
    same_state(cache, feed(RateQCache(plan, config, policy=POLICY), K[:, :, :5], V[:, :, :5]))


def test_crop_is_refused_where_quantized_history_would_have_to_be_undone(config, mixed_plan):
    plan = mixed_plan(config, seed=5)
    K, V = kv()
    cache = feed(RateQCache(plan, config, policy=POLICY), K, V)
    before = feed(RateQCache(plan, config, policy=POLICY), K, V)
    with pytest.raises(RateQError, match="already stored quantized"):
        cache.crop(-3)  # 67 tokens: a fresh cache holds values [61, 67) in full precision, these are quantized
    with pytest.raises(RateQError, match="already stored quantized"):
        cache.crop(-21)  # 49 tokens: the key block [34, 50) would be full precision too
    same_state(cache, before)  # nothing changed, in any layer
    with pytest.raises(RateQError, match="negative"):
        cache.crop(5)


def test_crop_with_no_residual_window(config, mixed_plan):
    # With R = 0 every value is stored quantized at once, so dropping values loses nothing; keys only within
    # the key block still filling up.
    policy = CachePolicy(residual=0, block=16)
    plan = mixed_plan(config, seed=6)
    K, V = kv(T=70)
    cache = feed(RateQCache(plan, config, policy=policy), K, V)  # keys quantized up to 64
    cache.crop(-5)
    same_state(cache, feed(RateQCache(plan, config, policy=policy), K[:, :, :65], V[:, :, :65]))
    with pytest.raises(RateQError):
        cache.crop(-3)  # 63 tokens: the block [48, 64) would be full precision in a fresh cache


def test_reset_then_reuse(config, mixed_plan):
    plan = mixed_plan(config, seed=7)
    K, V = kv()
    cache = feed(RateQCache(plan, config, policy=POLICY), K, V)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    K2, V2 = kv(B=2, T=40, seed=3)  # another batch size after the reset
    same_state(feed(cache, K2, V2), feed(RateQCache(plan, config, policy=POLICY), K2, V2))


def test_beam_reorder_and_batch_ops_equal_a_cache_fed_the_rearranged_batch(config, mixed_plan):
    plan = mixed_plan(config, seed=8)
    K, V = kv(B=3)
    fresh = lambda idx: feed(RateQCache(plan, config, policy=POLICY), K[idx], V[idx])  # noqa: E731

    idx = torch.tensor([2, 0, 0])
    cache = feed(RateQCache(plan, config, policy=POLICY), K, V)
    cache.reorder_cache(idx)
    same_state(cache, fresh(idx))

    cache = feed(RateQCache(plan, config, policy=POLICY), K, V)
    cache.batch_select_indices(torch.tensor([1, 2]))
    same_state(cache, fresh(torch.tensor([1, 2])))

    cache = feed(RateQCache(plan, config, policy=POLICY), K, V)
    cache.batch_repeat_interleave(2)
    same_state(cache, fresh(torch.tensor([0, 0, 1, 1, 2, 2])))


def test_sliding_layers_refuse_crop_once_they_have_forgotten_tokens(mixed_plan):
    # With R = 0 the full layer alone could drop its last token; the sliding layer cannot, so nothing is cropped.
    config = Gemma3TextConfig(**CONFIG, sliding_window=16, layer_types=["full_attention", "sliding_attention"])
    plan = mixed_plan(config, seed=9)
    policy = CachePolicy(residual=0, block=16)
    K, V = kv(T=10)
    cache = feed(RateQCache(plan, config, policy=policy), K, V)
    cache.crop(-2)  # nothing forgotten yet: fine
    same_state(cache, feed(RateQCache(plan, config, policy=policy), K[:, :, :8], V[:, :, :8]))
    K, V = kv(T=40)
    cache = feed(RateQCache(plan, config, policy=policy), K, V)
    assert cache.layers[0].crop_problem(1) is None
    full_before = cache.layers[0].held_positions()
    with pytest.raises(RateQError, match="sliding-window layer"):
        cache.crop(-1)
    assert cache.layers[0].held_positions() == full_before  # the full layer was not cropped alone
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == 40
