"""A cache planned in engine formats (FP8, NVFP4, llama.cpp blocks) decodes, packed or dense, as the one-pass
evaluation of the same plan."""

from __future__ import annotations

import pytest
import torch

from rateq import CachePolicy, Plan, RateQCache, fingerprint, parse_spec, simulate_plan
from rateq.quant.spec import ENGINE_FORMATS
from rateq.quant.static import scale_key


@pytest.mark.parametrize("kind", sorted(ENGINE_FORMATS))
def test_a_cache_of_engine_formats_decodes_as_the_one_pass_evaluation(kind, tiny, decode):
    model = tiny("llama", kv_heads=2, head_dim=32, hidden_size=128)
    spec = parse_spec(kind)
    fp = fingerprint(model)
    params = {}
    if spec.static_scale:  # a calibrated scale per layer and role (equal across heads) or per head
        scale = torch.tensor([0.02, 0.05]).view(1, 1, 2).expand(fp.num_layers, fp.num_kv_heads, 2).clone()
        if spec.static_scale == "head":
            scale[:, 1] *= 3
        params = {scale_key(spec): scale}
    plan = Plan.uniform(fp, spec.fixed_bits, spec=spec, params=params)
    policy = CachePolicy(residual=0, block=32)
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), simulate_plan(model, plan, policy, prefill=20):
        want = model(ids, use_cache=False).logits
    for packed in (True, False):
        got = decode(model, ids, RateQCache(plan, model, policy=policy, packed=packed), 20)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 1e-3  # the format really changed the model's output
