"""RateQCache with the quantizer families beyond a plain grid: Hadamard rotation, Lloyd–Max codebooks with
per-group norms, the QJL residual sketch. The cache must agree with the one-pass evaluation and hold exactly the
bytes the specs count."""

from __future__ import annotations

import pytest
import torch

from rateq import CachePolicy, Plan, QuantSpec, RateQCache, RateQError, fingerprint, simulate_plan
from rateq.quant import codec_for
from rateq.runtime import rotary_of

# head_dim 16 in the tiny models: channel groups divide 16, key groups along tokens divide the block.
FAMILY_SPECS = [
    QuantSpec(group_size=16, rotation="rhadamard", seed=3),                      # keys per channel, rotated
    QuantSpec(kind="lloydmax", group_size=16, rotation="rhadamard"),             # TurboQuant-MSE
    QuantSpec(kind="lloydmax", group_size=8, rotation="hadamard", qjl=True),     # TurboQuant-prod
    QuantSpec(kind="symmetric", group_size=8, group_along="channels", rotation="hadamard", scale_dtype="fp8"),
    QuantSpec(group_size=16, rotation="hadamard", zero="code"),
    QuantSpec(group_size=16, prerope=True),                                       # KVQuant's pre-RoPE keys
    QuantSpec(group_size=16, rotation="rhadamard", prerope=True, scale_dtype="bf16"),
    QuantSpec(group_size=16, outlier_frac=0.1),                                   # KVQuant's dense-and-sparse
]
POLICY = CachePolicy(residual=8, block=16, sinks=2)
LOGIT_ATOL = 2e-3  # as in test_cache_model.py: a one-token and a whole-sequence forward differ by ~1e-7


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("qwen3", 4)])
@pytest.mark.parametrize("policy", [POLICY, CachePolicy(residual=0, block=16)], ids=lambda p: f"r{p.residual}")
def test_family_plans_decode_as_the_one_pass_evaluation(arch, kv_heads, policy, tiny, decode, mixed_plan):
    model = tiny(arch, kv_heads=kv_heads)
    plan = mixed_plan(model, seed=5, bits=(1, 2, 3, 4, 16), specs=FAMILY_SPECS)
    assert any(q.prerope for q in plan.quantizers)
    with pytest.raises(RateQError, match="rotary"):
        RateQCache(plan, model.config, policy=policy)
    cache = RateQCache(plan, model.config, policy=policy, rotary=rotary_of(model))
    ids = torch.randint(0, 256, (2, 56), generator=torch.Generator().manual_seed(1))
    got = decode(model, ids, cache, 19)
    for layer in range(len(cache.layers)):  # every bucket holds its codec's parts
        for role in "kv":
            for held in cache.stored(layer, role):
                assert set(held.parts) == {p.name for p in codec_for(held.spec).layout(held.bits, role, 16)}
    with torch.no_grad(), simulate_plan(model, plan, policy, prefill=19):
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 10 * LOGIT_ATOL


@pytest.mark.parametrize("spec", FAMILY_SPECS, ids=lambda s: s.id)
@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_family_bytes_are_the_specs_effective_bits(spec, bits, tiny):
    model = tiny("llama", kv_heads=2)
    fp = fingerprint(model)
    plan = Plan.uniform(fp, bits, bits, spec=spec)
    policy = CachePolicy(residual=0, block=16)
    cache = RateQCache(plan, model.config, policy=policy, rotary=rotary_of(model))
    g = torch.Generator().manual_seed(0)
    B, H, D, n = 2, fp.num_kv_heads, fp.head_dim, 48
    for layer in range(fp.num_layers):
        cache.update(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g), layer)
    kinds = cache.nbytes_by_kind()
    held = kinds["codes"] + kinds["metadata"]
    # keys' integer zero-points (16 per block row) fill whole bytes; values' (one per token) form one stream per
    # head: 48 codes, whole 8-code groups too
    want = fp.num_layers * B * H * n * D * 2 * plan.effective_bits / 8
    assert held == pytest.approx(want, abs=1e-6)
    assert kinds["full_precision"] == 0


def test_a_quantizer_that_cannot_hold_values_is_refused_before_anything_runs(tiny):
    model = tiny("llama", kv_heads=2)
    plan = Plan.uniform(fingerprint(model), 2, spec=QuantSpec(group_size=16, group_along="tokens"))
    with pytest.raises(RateQError, match="groups must run along channels"):
        RateQCache(plan, model.config, policy=CachePolicy(block=32))


def test_a_model_in_place_of_its_config_brings_its_rotary_tables(tiny, decode):
    model = tiny("llama", kv_heads=2)
    plan = Plan.uniform(fingerprint(model), 3, spec=QuantSpec(group_size=16, prerope=True))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    a = decode(model, ids, RateQCache(plan, model, policy=POLICY, packed=False), 10)  # the dense path: exact
    b = decode(model, ids, RateQCache(plan, model.config, policy=POLICY, rotary=rotary_of(model)), 10)
    assert torch.equal(a, b)
