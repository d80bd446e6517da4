"""The evaluation runs plans of every quantizer family, pre-RoPE keys included, exactly as `simulate_plan` does."""

from __future__ import annotations

import math

import pytest
import torch

from rateq import CachePolicy, Plan, fingerprint, parse_spec, simulate_plan
from rateq.evaluate import Method, evaluate

POLICY = CachePolicy(residual=0, block=32)


@pytest.mark.parametrize("spec", ["minmax-g32-fp16-prerope", "minmax-g16-rhadamard-fp16-prerope",
                                  "lloydmax-g16-rhadamard-fp16"])
def test_evaluation_of_a_family_plan_matches_simulate_plan(tiny, spec):
    model = tiny("llama")
    fp = fingerprint(model)
    q = parse_spec(spec)
    v = parse_spec("lloydmax-g16-rhadamard-fp16")
    full = lambda b: torch.full((fp.num_layers, fp.num_kv_heads), b)  # noqa: E731
    zeros = torch.zeros(fp.num_layers, fp.num_kv_heads, dtype=torch.long)
    plan = Plan(full(2), full(2), zeros, zeros + 1, [q, v], fp, policy=POLICY)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, ids, ["fp", Method.from_plan(plan, "plan")], policy=POLICY, flips=False)
    with torch.no_grad(), simulate_plan(model, plan, POLICY):
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert res["plan"]["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert res["plan"]["ppl"] != pytest.approx(res["fp"]["ppl"], rel=1e-4)
    assert res["plan"]["effective_bits"] == pytest.approx(plan.effective_bits)
