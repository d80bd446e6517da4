"""What `rateq apply` reports about memory: bytes against a DynamicCache in the dtype the model runs in, and why
a short run holds more than one (keys are quantized a whole key block at a time)."""

from __future__ import annotations

import pytest
import torch

import rateq
from cli.apply import unquantized_note
from rateq.runtime.run import cache_perplexity


@pytest.fixture(scope="module")
def model_and_plan(tiny):
    model = tiny("llama", kv_heads=2)  # fp32, 3 layers, 2 KV heads of 16 channels
    plan = rateq.Plan.uniform(rateq.fingerprint(model), 2, 2, spec=rateq.QuantSpec(group_size=16),
                              policy=rateq.CachePolicy(block=32))
    return model, plan


def _run(model, plan, tokens):
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    return cache_perplexity(model, ids, plan, prefill=tokens // 2)


def test_a_short_run_says_nothing_of_the_keys_is_quantized_yet(model_and_plan):
    model, plan = model_and_plan
    result = _run(model, plan, 20)
    assert result["dtype"] == "float32" and result["quantized_key_tokens"] == 0
    assert result["quantized_value_tokens"] == result["tokens"] == 19
    assert result["dynamic_nbytes"] == 2 * result["fp16_dynamic_nbytes"]  # fp32 against fp16
    assert result["ratio_to_dynamic"] == pytest.approx(result["nbytes"] / result["dynamic_nbytes"])
    assert result["ratio_to_fp16"] > 1 > result["ratio_to_dynamic"]  # fp32 keys are larger than fp16 ones
    note = unquantized_note(result)
    assert note.startswith("no key quantized yet: keys stay full precision (float32) until a whole key block of 32")
    assert "more than an fp16 DynamicCache" in note


def test_a_run_past_one_key_block_quantizes_keys(model_and_plan):
    model, plan = model_and_plan
    result = _run(model, plan, 80)
    assert result["quantized_key_tokens"] == 64 and result["quantized_value_tokens"] == 79
    assert result["ratio_to_dynamic"] < result["ratio_to_fp16"] < 1
    assert unquantized_note(result) is None


def test_nothing_quantized_within_the_residual_window(model_and_plan):
    import dataclasses

    model, plan = model_and_plan
    plan = dataclasses.replace(plan, policy=rateq.CachePolicy(residual=64, block=32))
    result = _run(model, plan, 20)
    assert result["quantized_key_tokens"] == result["quantized_value_tokens"] == 0
    note = unquantized_note(result)
    assert note.startswith("nothing quantized yet") and "beyond the 64-token residual window" in note
    assert result["ratio_to_dynamic"] == 1 and "as much as a float32 DynamicCache" in note


def test_the_report_gives_learned_bytes_beside_the_cache_and_their_share_of_the_weights(model_and_plan):
    from rateq.quant.params import param_key

    model, _ = model_and_plan
    spec = rateq.parse_spec("codebook-g2")
    books = torch.randn(3, 2, 2, 8, 16, 2, generator=torch.Generator().manual_seed(1))
    plan = rateq.Plan.uniform(rateq.fingerprint(model), 2, spec=spec, params={param_key(spec, 2): books},
                              policy=rateq.CachePolicy(block=32))
    result = _run(model, plan, 40)
    n = sum(p.numel() for p in model.parameters())
    assert result["learned_bytes"] == plan.learned_nbytes() == 3 * 2 * 2 * 8 * 16 * 2 * 2
    assert result["fp16_weight_bytes"] == 2 * n
    assert result["learned_share"] == pytest.approx(result["learned_bytes"] / (2 * n))
    assert result["nbytes"] == result["nbytes_codes"] + result["nbytes_metadata"] + result["nbytes_full_precision"]
    plain = _run(model, model_and_plan[1], 40)
    assert plain["learned_bytes"] == 0 and plain["learned_share"] == 0.0
