"""Decode attention from the packed codes equals attention over the dequantized history: every family, GQA and
MHA, with and without a residual window and sinks, sliding-window layers; and greedy generation on the default
model is the same token for token."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQCache, parse_spec
from rateq.runtime.run import peak_allocated

from .conftest import TINY_SPECS
from .test_families import FAMILY_SPECS

SPECS = TINY_SPECS + FAMILY_SPECS + [parse_spec("lloydmax-qjl-g16-rhadamard-fp16")]
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 sums in another order


def attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


@pytest.mark.parametrize("arch,kv_heads", [("llama", 4), ("llama", 1), ("qwen3", 2), ("gemma3", 2)])
@pytest.mark.parametrize("policy", [CachePolicy(residual=0, block=16), CachePolicy(residual=8, block=16, sinks=3)],
                         ids=lambda p: f"r{p.residual}s{p.sinks}")
def test_packed_decode_attention_equals_attention_on_the_dense_history(arch, kv_heads, policy, tiny, mixed_plan):
    model = tiny(arch, kv_heads=kv_heads)
    plan = mixed_plan(model, seed=kv_heads, bits=(1, 2, 3, 4, 8, 16), specs=SPECS)
    packed = RateQCache(plan, model, policy=policy, packed=True)
    dense = RateQCache(plan, model, policy=policy, packed=False)
    assert packed.packed and not dense.packed
    attend = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    g = torch.Generator().manual_seed(7)
    H, D, Hq = kv_heads, 16, model.config.num_attention_heads
    T = 90  # past the sliding window (16), several key blocks
    K, V = torch.randn(1, H, T, D, generator=g) * 2, torch.randn(1, H, T, D, generator=g)
    for layer, module in enumerate(attention_modules(model)):
        for cache in (packed, dense):
            cache.update(K[:, :, :20], V[:, :, :20], layer)
        for t in range(20, T):
            kp, vp = packed.update(K[:, :, t:t + 1], V[:, :, t:t + 1], layer)
            kd, vd = dense.update(K[:, :, t:t + 1], V[:, :, t:t + 1], layer)
            assert kp.numel() == 0  # handles: no dense history is formed
            q = torch.randn(1, Hq, 1, D, generator=g)
            got, _ = attend(module, q, kp, vp, None, scaling=0.25)
            want, _ = sdpa_attention_forward(module, q, kd, vd, None, scaling=0.25)
            torch.testing.assert_close(got, want, **TOL, msg=f"layer {layer} step {t}")
        assert packed.layers[layer].held_positions() == dense.layers[layer].held_positions()
    assert packed.nbytes_by_kind() == dense.nbytes_by_kind()


def test_prefill_padding_and_other_caches_use_the_models_own_attention(tiny, mixed_plan, decode):
    model = tiny("llama", kv_heads=2)
    plan = mixed_plan(model, seed=1, specs=TINY_SPECS)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits
    RateQCache(plan, model, packed=True)  # installs the packed path on the model
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)  # a forward without a RateQCache runs exactly as before
    # a padded batch decodes through the dense path, each row as alone
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    got = model.generate(ids, attention_mask=mask, past_key_values=RateQCache(plan, model, packed=True),
                         max_new_tokens=6, do_sample=False)
    alone = model.generate(ids[1:, 5:], past_key_values=RateQCache(plan, model, packed=False), max_new_tokens=6, do_sample=False)
    assert torch.equal(got[1, 40:], alone[0, 35:])


def test_packed_needs_the_model():
    from rateq import ModelFingerprint, RateQError
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=32)
    plan = Plan.uniform(ModelFingerprint("tiny", "llama", 1, 2, 16), 2, spec=QuantSpec(group_size=8))
    assert not RateQCache(plan, config).packed
    with pytest.raises(RateQError, match="with the model"):
        RateQCache(plan, config, packed=True)


@pytest.mark.slow
def test_greedy_generation_on_the_default_model_is_the_same_token_for_token(smol):
    import rateq
    from pathlib import Path

    model, tok = smol
    plan = rateq.load_profile(Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m-b2.5.safetensors")
    text = rateq.load_text("austen-pp")[100_000:103_000]
    ids = tok(text, return_tensors="pt").input_ids[:, :600]
    outs = []
    for packed in (True, False):
        cache = RateQCache(plan, model, packed=packed)
        assert cache.packed == packed
        with torch.no_grad():
            outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=64, do_sample=False,
                                       min_new_tokens=64)[0, ids.shape[1]:])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("plan_kind", ["kivi", "families"])
def test_a_decode_step_allocates_a_small_share_of_the_dense_history(plan_kind, tiny):
    # smollm2-135m's head shape (3 KV heads of 64, 9 query heads), one layer, 16384 tokens
    model = tiny("llama", kv_heads=3, num_attention_heads=9, head_dim=64, hidden_size=576, num_hidden_layers=1)
    fp = rateq.fingerprint(model)
    if plan_kind == "kivi":
        plan = Plan.uniform(fp, 2, spec=QuantSpec())
    else:  # a plan of the default candidates: pre-RoPE grouped keys, rotated keys, Lloyd–Max values
        specs = [parse_spec("minmax-g128-rhadamard-fp16-prerope"), parse_spec("lloydmax-g64-rhadamard-fp16"),
                 parse_spec("minmax-g32-fp16-prerope"), QuantSpec()]
        plan = Plan(torch.tensor([[2, 3, 2]]), torch.tensor([[2, 2, 3]]), torch.tensor([[0, 2, 3]]),
                    torch.tensor([[1, 3, 1]]), specs, fp)
    cache = RateQCache(plan, model, policy=CachePolicy(residual=128, block=128), packed=True)
    T, H, D = 16384, 3, 64
    g = torch.Generator().manual_seed(0)
    cache.update(torch.randn(1, H, T, D, generator=g), torch.randn(1, H, T, D, generator=g), 0)
    k, v = cache.update(torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g), 0)
    q = torch.randn(1, 9, 1, D, generator=g)
    attend = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    module = model.model.layers[0].self_attn
    peak = peak_allocated(lambda: attend(module, q, k, v, None, scaling=0.125))
    dense_history = 2 * H * (T + 1) * D * 4  # K and V of the layer in fp32
    assert peak <= 0.10 * dense_history, (peak, dense_history)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_beam_search_and_crop_through_the_packed_path(arch, tiny, mixed_plan):
    model = tiny(arch, kv_heads=2)
    plan = mixed_plan(model, seed=4, specs=TINY_SPECS)
    policy = CachePolicy(residual=0, block=16)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    outs = []
    for packed in (True, False):
        cache = RateQCache(plan, model, policy=policy, packed=packed)
        with torch.no_grad():
            outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=12, num_beams=3, do_sample=False))
    assert torch.equal(outs[0], outs[1])
    # a rollback that un-quantizes nothing, then decoding on: the same as the dense path
    caches = [RateQCache(plan, model, policy=policy, packed=p) for p in (True, False)]
    logits = []
    for cache in caches:
        with torch.no_grad():
            model(ids[:, :10], past_key_values=cache)
            for t in range(10, 14):  # inside gemma3's 16-token window: nothing dropped yet
                model(ids[:, t:t + 1], past_key_values=cache)
            cache.crop(-2)  # back to 12 tokens
            logits.append(torch.cat([model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(12, 20)], 1))
    torch.testing.assert_close(logits[0], logits[1], **TOL)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_decode_steps_read_nothing_back_from_the_device(arch, tiny, mixed_plan):
    # On a GPU a read-back (an item, a nonzero, a tensor's truth value) waits for every queued kernel: a decode step
    # through the packed path (every family, blocks of keys filling and flushing on the way) takes none.
    from dispatch_count import Dispatched  # tests/dispatch_count.py

    model = tiny(arch, kv_heads=2)
    cache = RateQCache(mixed_plan(model, seed=3, bits=(1, 2, 3, 4, 8, 16), specs=SPECS), model,
                       policy=CachePolicy(residual=8, block=16, sinks=3), packed=True)
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :24], past_key_values=cache, use_cache=True)
        with Dispatched() as d:
            for t in range(24, 60):  # past the sliding window (16), two key blocks flushed
                model(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]), use_cache=True)
    assert d.ops > 0 and d.read_backs == 0
