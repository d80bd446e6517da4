"""Left-padded batches: each row is stored, returned and decoded exactly as it would be alone.

Padding shifts a row's tokens to later absolute positions. Key groups aligned to absolute positions, or pad
keys inside a row's key groups, would change how its real tokens are quantized; the cache and the one-pass
evaluation both count a row's blocks, sinks and residual window from its first real token instead."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma3TextConfig, LlamaConfig

from rateq import CachePolicy, Plan, QuantSpec, RateQCache, RateQError, fingerprint, simulate_plan
from rateq.policy import left_padding

from .conftest import TINY_SPECS
from .test_families import FAMILY_SPECS

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=32)
POLICIES = [CachePolicy(residual=8, block=16, sinks=2), CachePolicy(residual=0, block=16),
            CachePolicy(residual=5, block=32, sinks=3)]
PADS = [0, 5, 17, 33]  # none, inside a block, across a block, across two


def _rope_tables(head_dim: int):
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def tables(like, position_ids, layer):
        ang = position_ids[..., None].to(torch.float32) * inv * (1 + layer)  # another table per layer
        emb = torch.cat([ang, ang], -1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    return tables


def _feed(cache, layer, K, V, chunks):
    """Every update's returned (keys, values) for `chunks` [(a, b), …] of K/V `(B, H, T, D)`."""
    return [cache.update(K[:, :, a:b], V[:, :, a:b], layer) for a, b in chunks]


def _chunks(prefill: int, T: int):
    return [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("specs", [TINY_SPECS, FAMILY_SPECS], ids=["grids", "families"])
@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding"])
def test_each_padded_row_is_returned_as_it_would_be_alone(policy, specs, sliding, mixed_plan):
    if sliding:
        config = Gemma3TextConfig(**CONFIG, sliding_window=24, layer_types=["sliding_attention", "full_attention"])
    else:
        config = LlamaConfig(**CONFIG)
    plan = mixed_plan(config, seed=11, bits=(1, 2, 3, 4, 16), specs=specs)
    rotary = _rope_tables(16)
    if specs is TINY_SPECS:  # plain grids: elementwise arithmetic only, the same bits however rows are batched
        def same(a, b, where):
            assert torch.equal(a, b), where
    else:
        # Rotations and the QJL sketch are matrix products, and BLAS sums a one-row product in another order
        # than a many-row one: the stored codes are the same, a decoded value may differ in its last bit.
        def same(a, b, where):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=str(where))
    T_real, B = 70, len(PADS)
    g = torch.Generator().manual_seed(0)
    real_k = torch.randn(B, 2, T_real, 16, generator=g) * 3
    real_v = torch.randn(B, 2, T_real, 16, generator=g)
    # Row b: PADS[b] junk tokens (they must not matter), then its own real tokens, all rows ending together.
    P = max(PADS)
    T = T_real
    K = torch.randn(B, 2, T, 16, generator=g) * 100
    V = torch.randn(B, 2, T, 16, generator=g) * 100
    mask = torch.zeros(B, T, dtype=torch.long)
    lengths = []
    for b, p in enumerate(PADS):
        L = T - p
        K[b, :, p:], V[b, :, p:] = real_k[b, :, :L], real_v[b, :, :L]
        mask[b, p:] = 1
        lengths.append(L)
    prefill = P + 3
    padded = RateQCache(plan, config, policy=policy, rotary=rotary)
    padded.set_padding(mask)  # without position ids: the model's positions are the token indices
    for layer in range(2):
        got = _feed(padded, layer, K, V, _chunks(prefill, T))
        for b, p in enumerate(PADS):
            alone = RateQCache(plan, config, policy=policy, rotary=_shifted(rotary, p))
            L = lengths[b]
            want = _feed(alone, layer, real_k[b:b + 1, :, :L], real_v[b:b + 1, :, :L], _chunks(prefill - p, L))
            for step, ((gk, gv), (wk, wv)) in enumerate(zip(got, want)):
                m = wk.shape[2]  # the row's real positions are the last m of what the padded cache returns
                same(gk[b:b + 1, :, -m:], wk, (layer, b, step))
                same(gv[b:b + 1, :, -m:], wv, (layer, b, step))
                assert not gk[b, :, :-m].any() and not gv[b, :, :-m].any()  # padding comes back as zeros


def _shifted(rotary, shift):
    """The tables of a row that the model numbers from `shift` on (positions = token indices of the batch)."""
    return lambda like, pos, layer: rotary(like, pos + shift, layer)


def test_padding_is_never_stored_and_costs_only_the_spread(mixed_plan):
    config = LlamaConfig(**CONFIG)
    plan = Plan.uniform(fingerprint(config), 2, spec=QuantSpec(group_size=16))
    policy = CachePolicy(block=16)
    g = torch.Generator().manual_seed(0)
    T = 80
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :20] = 0
    cache = RateQCache(plan, config, policy=policy)
    cache.set_padding(mask)
    K, V = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
    cache.update(K, V, 0)
    held = cache.held_positions()[0]
    # the shared store holds what the shorter row (60 tokens) quantizes; the longer row's extra 20 stay full
    # precision until the shorter row catches up
    assert held["k"]["quantized"] == 48 and held["k"]["tail"] == 80 - 48
    assert held["v"]["quantized"] == 60 and held["v"]["tail"] == 20


def test_right_padding_is_refused():
    with pytest.raises(RateQError, match="left padding"):
        left_padding(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert left_padding(torch.ones(2, 5)) is None
    assert left_padding(torch.tensor([[0, 0, 1], [1, 1, 1]])).tolist() == [2, 0]


def test_set_padding_only_before_the_first_token(mixed_plan):
    config = LlamaConfig(**CONFIG)
    cache = RateQCache(mixed_plan(config), config, policy=CachePolicy(block=16))
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(RateQError, match="empty cache"):
        cache.set_padding(torch.tensor([[0, 1, 1]]))


PLANS = {
    "grids": dict(bits=(2, 3, 4, 16), specs=TINY_SPECS),
    "families": dict(bits=(1, 2, 3, 4), specs=FAMILY_SPECS),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("family", list(PLANS))
def test_generate_gives_each_row_its_own_continuation(arch, family, tiny, mixed_plan):
    """Greedy generation through a cache built from the model: a left-padded batch continues every prompt
    exactly as each prompt alone does (DynamicCache's own behaviour, checked first)."""
    model = tiny(arch, kv_heads=2)
    plan = mixed_plan(model, seed=4, **PLANS[family])
    policy = CachePolicy(residual=4, block=16, sinks=1)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (30, 11, 23)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)  # several key blocks past every prompt
    for make in (lambda: DynamicCache(config=model.config), lambda: RateQCache(plan, model, policy=policy)):
        batch = model.generate(ids, attention_mask=mask, past_key_values=make(), **kw)[:, T:]
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   past_key_values=make(), **kw)[:, len(p):]
            assert torch.equal(batch[b], alone[0]), (type(make()).__name__, b)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", [CachePolicy(residual=4, block=16, sinks=1), CachePolicy(block=16)], ids=str)
def test_one_pass_evaluation_of_a_padded_batch_agrees_with_rows_alone_and_the_cache(arch, policy, tiny, mixed_plan,
                                                                                  decode):
    model = tiny(arch, kv_heads=2)
    plan = mixed_plan(model, seed=9, bits=(1, 2, 3, 4), specs=FAMILY_SPECS)
    g = torch.Generator().manual_seed(3)
    T, pads = 56, [0, 13, 21]
    ids = torch.randint(1, 256, (len(pads), T), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded row
    prefill = 25
    with torch.no_grad(), simulate_plan(model, plan, policy, prefill=prefill):
        batch = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for b, p in enumerate(pads):
        with torch.no_grad(), simulate_plan(model, plan, policy, prefill=prefill - p):
            alone = model(ids[b:b + 1, p:], use_cache=False).logits
        torch.testing.assert_close(batch[b:b + 1, p:], alone, atol=2e-3, rtol=0)
    # token by token through RateQCache, padded the same way: the one-pass evaluation of the padded batch
    cache = RateQCache(plan, model, policy=policy)
    with torch.no_grad():
        outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                      past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, T):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                              past_key_values=cache, use_cache=True).logits)
    got = torch.cat(outs, dim=1)
    for b, p in enumerate(pads):
        torch.testing.assert_close(got[b, p:], batch[b, p:], atol=2e-3, rtol=0)
