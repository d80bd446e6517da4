"""`nbytes()` is what the cache's tensors hold, and equals a count made from the plan's specs alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma3TextConfig, LlamaConfig

from rateq import CachePolicy, ModelFingerprint, Plan, QuantSpec, RateQCache, parse_spec
from rateq.quant.params import param_key
from rateq.quant.spec import SCALE_DTYPE_BITS

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, vocab_size=32)


def analytic_nbytes(plan: Plan, policy: CachePolicy, n: int, B: int, D: int, fp_itemsize: int) -> int:
    """Bytes a cache of `n` tokens must hold, from the specs: packed codes at `bits` bits, scales and float
    zero-points in their dtype, integer zero-points packed at `bits` bits — along the row when a row holds whole
    8-code groups, else as one stream per head (its last 8-code group padded)."""
    total = 0
    for role in ("k", "v"):
        q = (policy.quantized_keys(n) if role == "k" else policy.quantized_values(n)) - policy.sinks
        q = max(q, 0)
        fp_tokens = n - q  # sinks and the full-precision tail
        for layer in range(plan.num_layers):
            for head in range(plan.num_kv_heads):
                bits, spec = int(plan.bits(role)[layer, head]), plan.spec(layer, head, role)
                total += B * fp_tokens * D * fp_itemsize
                if bits == 16:
                    total += B * q * D * 2
                    continue
                total += B * q * D * bits // 8
                G = spec.group_size
                rows, per_row = (q, D // G) if spec.axis_for(role) == "channels" else (q // G, D)
                sbytes = SCALE_DTYPE_BITS[spec.scale_dtype] // 8
                total += B * rows * per_row * sbytes
                if spec.kind == "minmax" and spec.zero == "float":
                    total += B * rows * per_row * sbytes
                elif spec.kind == "minmax" and (per_row % 8 == 0 or bits == 8):
                    total += B * rows * per_row * bits // 8
                elif spec.kind == "minmax":
                    total += B * -(-rows * per_row // 8) * bits
    return total


@pytest.mark.parametrize("policy", [CachePolicy(residual=8, block=16, sinks=2), CachePolicy(residual=0, block=32)],
                         ids=str)
def test_nbytes_equals_the_count_from_the_specs(policy, mixed_plan):
    config = LlamaConfig(**CONFIG)
    plan = mixed_plan(config, seed=11)
    cache = RateQCache(plan, config, policy=policy)
    g = torch.Generator().manual_seed(0)
    B, n = 2, 0
    for t in [23] + [1] * 60:
        K, V = torch.randn(B, 4, t, 16, generator=g), torch.randn(B, 4, t, 16, generator=g)
        for layer in range(2):
            cache.update(K, V, layer)
        n += t
        assert cache.nbytes() == analytic_nbytes(plan, policy, n, B, 16, 4), n
    kinds = cache.nbytes_by_kind()
    # the full-precision part is exactly sinks + tails, in the model's dtype (fp32 here)
    fp_tokens = (2 * n - (policy.quantized_keys(n) - policy.sinks) - (policy.quantized_values(n) - policy.sinks))
    assert kinds["full_precision"] == 2 * B * 4 * 16 * fp_tokens * 4
    assert kinds["codes"] > 0 and kinds["metadata"] > 0


def test_held_bytes_follow_the_plans_effective_bits():
    # smollm2-135m's shape at 1024 tokens, fp16 K/V: held = effective bits × elements + residual window
    fp = ModelFingerprint("smollm2-135m", "llama", 30, 3, 64)
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=32)
    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([2, 3, 4])
    plan = Plan(bits[torch.randint(0, 3, (30, 3), generator=g)], bits[torch.randint(0, 3, (30, 3), generator=g)],
                torch.zeros(30, 3, dtype=torch.long), torch.ones(30, 3, dtype=torch.long),
                [QuantSpec(group_size=32), QuantSpec(group_size=64, zero="code")], fp)
    policy = CachePolicy(residual=128, block=32)
    cache = RateQCache(plan, config, policy=policy)
    n = 1024
    K = torch.randn(1, 3, n, 64, generator=g, dtype=torch.float32).to(torch.float16)
    for layer in range(30):
        cache.update(K, K, layer)
    kinds = cache.nbytes_by_kind()
    qk, qv = policy.quantized_keys(n), policy.quantized_values(n)
    elements = 30 * 3 * 64  # per token, per role
    predicted = (plan.unit_bits_per_element()[..., 0].mean() * qk + plan.unit_bits_per_element()[..., 1].mean() * qv)
    predicted = float(predicted) * elements / 8
    assert kinds["codes"] + kinds["metadata"] == pytest.approx(predicted, rel=0.02)
    assert kinds["full_precision"] == elements * ((n - qk) + (n - qv)) * 2


def test_dense_nbytes_is_what_a_dynamic_cache_would_hold():
    config = Gemma3TextConfig(**CONFIG, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    plan = Plan.uniform(ModelFingerprint("tiny", "gemma3_text", 2, 4, 16), 4, spec=QuantSpec(group_size=8))
    ours, ref = RateQCache(plan, config, policy=CachePolicy(residual=4, block=16)), DynamicCache(config=config)
    g = torch.Generator().manual_seed(0)
    for t in [20] + [1] * 10:
        K = torch.randn(2, 4, t, 16, generator=g, dtype=torch.float32).to(torch.float16)
        for layer in range(2):
            ours.update(K, K, layer)
            ref.update(K, K, layer)
    held = sum(t.numel() * t.element_size() for layer in ref.layers for t in (layer.keys, layer.values))
    assert ours.dense_nbytes(torch.float16) == held


def test_learned_bytes_are_the_plans_and_stay_out_of_nbytes():
    """Codebooks (fp16) and static scales (fp32; a per-layer format's once per layer and role) are counted once
    per bucket of heads, as `Plan.learned_nbytes` counts them from the plan, and never in the per-token bytes."""
    config = LlamaConfig(**CONFIG)  # 2 layers, 4 KV heads of 16 channels
    specs = [QuantSpec(group_size=8), parse_spec("codebook-g2"), parse_spec("fp8_tensor"), parse_spec("int8_head")]
    k_bits, k_q = torch.tensor([[2, 2, 1, 8], [8, 8, 4, 16]]), torch.tensor([[1, 1, 1, 2], [2, 2, 0, 0]])
    v_bits, v_q = torch.tensor([[8, 8, 2, 2], [1, 8, 16, 3]]), torch.tensor([[3, 3, 0, 1], [1, 3, 0, 0]])
    g = torch.Generator().manual_seed(0)
    params = {param_key(specs[1], b): torch.randn(2, 4, 2, 8, 4 ** b, 2, generator=g) for b in (1, 2)}
    params[param_key(specs[2], 8)] = torch.rand(2, 1, 2, generator=g).add(0.1).expand(2, 4, 2).clone()
    params[param_key(specs[3], 8)] = torch.rand(2, 4, 2, generator=g).add(0.1)
    plan = Plan(k_bits, v_bits, k_q, v_q, specs, ModelFingerprint("tiny", "llama", 2, 4, 16), params=params)
    cache = RateQCache(plan, config, policy=CachePolicy(residual=0, block=16))
    book = lambda heads, b: heads * 8 * 4 ** b * 2 * 2  # noqa: E731 — groups × centroids × channels, fp16
    # K: layer 0 two heads of 2-bit and one of 1-bit codebooks, fp8_tensor in both layers (one scale each);
    # V: int8_head on three heads, a 2-bit codebook on one head of layer 0, a 1-bit one on one of layer 1
    expected = book(2, 2) + book(1, 1) + 4 + 4 + 3 * 4 + book(1, 2) + book(1, 1)
    assert cache.learned_nbytes() == plan.learned_nbytes() == expected
    assert cache.nbytes() == 0  # nothing cached yet: the learned parameters are not per-token storage
    K = torch.randn(2, 4, 40, 16, generator=g)
    for layer in range(2):
        cache.update(K, K, layer)
    assert cache.nbytes() == sum(cache.nbytes_by_kind().values()) > 0
    assert cache.learned_nbytes() == expected
    assert RateQCache(Plan.uniform(plan.model, 4, spec=specs[0]), config).learned_nbytes() == 0
