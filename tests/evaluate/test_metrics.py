"""Evaluation metrics on tiny random models: PPL against a plain forward, KL, routing flips, policies."""

from __future__ import annotations

import math

import pytest
import torch

import rateq
from rateq import CachePolicy, Plan, QuantSpec
from rateq.evaluate import Method, evaluate
from rateq.evaluate.metrics import RoutingProbe, TokenStats, routing_argmax

SPEC = QuantSpec(group_size=8)  # tiny models have head_dim 16


def _ids(n=2, t=64, seed=0, vocab=256):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _plain_ppl(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return math.exp(float(-logp.gather(-1, ids[:, 1:, None]).mean()))


def test_fp_row_equals_plain_forward(tiny):
    model = tiny("llama")
    ids = _ids()
    res = evaluate(model, ids, ["fp"], flips=False)
    assert res["fp"]["ppl"] == pytest.approx(_plain_ppl(model, ids), rel=1e-6)
    assert res["fp"]["tokens"] == ids[:, 1:].numel()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_sixteen_bits_matches_plain_forward(tiny, arch):
    """A 16-bit plan only rounds K/V to fp16: PPL equals a plain forward to ~1e-4, KL ~0, no flips to speak of."""
    model = tiny(arch)
    fp = rateq.fingerprint(model)
    ids = _ids()
    res = evaluate(model, ids, ["fp", Method.from_plan(Plan.uniform(fp, 16, spec=SPEC), "p16")])
    assert res["p16"]["ppl"] == pytest.approx(_plain_ppl(model, ids), rel=1e-4)
    assert res["p16"]["kl"] < 1e-6
    assert res["p16"]["flip_rate"] <= 0.01
    assert res["p16"]["effective_bits"] == 16.0


def test_identical_transform_has_zero_kl_and_flips(tiny):
    model = tiny("llama")
    ids = _ids()
    ident = Method("same", "transform", 16.0, 16.0, build=lambda policy: (lambda layer, role, x: x))
    res = evaluate(model, ids, ["fp", ident])
    assert res["same"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert res["same"]["flip_rate"] == 0.0
    assert res["same"]["key_flip_rate"] == 0.0
    assert res["same"]["ppl"] == pytest.approx(res["fp"]["ppl"], rel=1e-6)


def test_quantization_degrades_monotonically(tiny):
    """Fewer bits: larger KL and more key flips (the rates are well separated on a random model)."""
    model = tiny("llama", kv_heads=4)
    fp = rateq.fingerprint(model)
    ids = _ids()
    plans = [Method.from_plan(Plan.uniform(fp, b, spec=SPEC), f"K{b}V{b}") for b in (8, 4, 2)]
    res = evaluate(model, ids, ["fp"] + plans)
    kls = [res[f"K{b}V{b}"]["kl"] for b in (8, 4, 2)]
    flips = [res[f"K{b}V{b}"]["key_flip_rate"] for b in (8, 4, 2)]
    assert kls[0] < kls[1] < kls[2]
    assert flips[0] < flips[1] < flips[2]
    assert all(0 <= res[f"K{b}V{b}"]["flip_rate"] <= 1 for b in (8, 4, 2))


def test_kl_matches_direct_computation(tiny):
    model = tiny("qwen3")
    fp = rateq.fingerprint(model)
    ids = _ids(n=1)
    plan = Plan.uniform(fp, 2, spec=SPEC)
    res = evaluate(model, ids, ["fp", Method.from_plan(plan, "q")], flips=False)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[:, :-1], -1)
        with rateq.simulate_plan(model, plan, CachePolicy()):
            q = torch.log_softmax(model(ids).logits[:, :-1], -1)
    kl = float((ref.exp() * (ref - q)).sum(-1).mean())
    assert res["q"]["kl"] == pytest.approx(kl, rel=1e-4)
    assert res["q"]["nll"] == pytest.approx(float(-q.gather(-1, ids[:, 1:, None]).mean()), rel=1e-5)


def test_batching_and_windows_do_not_change_results(tiny):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    ids = _ids(n=3)
    m = Method.from_plan(Plan.uniform(fp, 3, spec=SPEC), "q")
    a = evaluate(model, ids, ["fp", m], batch_size=1)
    b = evaluate(model, ids, ["fp", m], batch_size=3)
    for key in ("ppl", "kl", "flip_rate", "key_flip_rate"):
        assert a["q"][key] == pytest.approx(b["q"][key], rel=1e-4, abs=1e-6)


def test_residual_window_reduces_damage(tiny):
    """With R > 0 recent tokens stay exact, so the same plan does less harm than under R = 0."""
    model = tiny("llama", kv_heads=4)
    fp = rateq.fingerprint(model)
    ids = _ids(n=1, t=96)
    m = Method.from_plan(Plan.uniform(fp, 2, spec=SPEC), "q")
    r0 = evaluate(model, ids, ["fp", m], policy=CachePolicy(residual=0, block=8))
    r32 = evaluate(model, ids, ["fp", m], policy=CachePolicy(residual=32, block=8))
    assert r32["q"]["kl"] < r0["q"]["kl"]
    assert r32["q"]["key_flip_rate"] < r0["q"]["key_flip_rate"]


def test_flip_layers_subset(tiny):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    ids = _ids(n=1)
    m = Method.from_plan(Plan.uniform(fp, 2, spec=SPEC), "q")
    heads, T = model.config.num_attention_heads, ids.shape[1]
    one = evaluate(model, ids, ["fp", m], flip_layers=[0])
    every = evaluate(model, ids, ["fp", m])
    # Decisions are counted per (query head, query position ≥ 1) of the probed layers only.
    assert one["q"]["routing_decisions"] == heads * (T - 1)
    assert every["q"]["routing_decisions"] == model.config.num_hidden_layers * heads * (T - 1)
    assert one.settings["flip_layers"] == [0]
    assert RoutingProbe({0}).wants(0) and not RoutingProbe({0}).wants(1)


def test_routing_argmax_respects_mask():
    q = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1, 1, 2)
    k = torch.tensor([[[[0.0, 1.0], [5.0, 0.0]]]])  # key 1 scores highest
    mask = torch.tensor([[[[0.0, float("-inf")]]]])
    assert int(routing_argmax(q, k, None, 1.0)) == 1
    assert int(routing_argmax(q, k, mask, 1.0)) == 0


def test_token_stats_accumulate():
    st = TokenStats()
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: NLL = log 4 per token
    st.add(logits, torch.tensor([[1, 2]]), None)
    st.add(logits, torch.tensor([[0, 3]]), None)
    assert st.tokens == 4
    assert st.nll == pytest.approx(math.log(4))
    assert st.ppl == pytest.approx(4.0)


def test_text_data_needs_tokenizer(tiny):
    with pytest.raises(rateq.RateQError, match="tokenizer"):
        evaluate(tiny("llama"), "austen-pp", ["fp"])


def test_duplicate_and_unknown_methods_are_errors(tiny):
    model = tiny("llama")
    with pytest.raises(rateq.RateQError, match="twice"):
        evaluate(model, _ids(n=1), ["fp", "fp"])
    with pytest.raises(rateq.RateQError, match="unknown baseline"):
        evaluate(model, _ids(n=1), ["nonsense"])


def test_full_precision_row_is_always_first(tiny):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    m = Method.from_plan(Plan.uniform(fp, 2, spec=SPEC), "q")
    res = evaluate(model, _ids(n=1), [m], flips=False)
    assert [r["name"] for r in res] == ["fp", "q"]
    assert res["q"]["delta_ppl"] == pytest.approx(res["q"]["ppl"] - res["fp"]["ppl"])
    res = evaluate(model, _ids(n=1), [m, "fp"], flips=False)
    assert [r["name"] for r in res] == ["fp", "q"]


def test_plans_keep_their_policy_unless_one_is_given(tiny):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    ids = _ids(n=1, t=96)
    own = CachePolicy(residual=0, block=64)
    plan = Plan.uniform(fp, 2, spec=SPEC, policy=own)
    fixed = Method.from_plan(Plan.uniform(fp, 3, spec=SPEC), "fixed", policy=CachePolicy(residual=16, block=8))
    res = evaluate(model, ids, [plan, fixed, Method.from_plan(Plan.uniform(fp, 4, spec=SPEC), "follows")],
                   flips=False)
    rows = {r["name"]: r for r in res}
    plan_row = next(r for r in res if r["name"].startswith("plan@"))
    assert plan_row["policy"] == own.to_dict()
    assert rows["fixed"]["policy"] == {"residual": 16, "block": 8, "sinks": 0}
    assert rows["follows"]["policy"] == CachePolicy().to_dict()
    given = CachePolicy(residual=32, block=16)
    res = evaluate(model, ids, [plan, fixed], policy=given, flips=False)
    assert res[1]["policy"] == given.to_dict() and res["fixed"]["policy"]["residual"] == 16
    assert res[1]["ppl"] != pytest.approx(plan_row["ppl"], rel=1e-6)
    assert res.settings["policy"] == given.to_dict()


def test_rows_say_whether_they_are_at_a_compared_budget(tiny):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    g8 = Plan.uniform(fp, 2, spec=SPEC)  # 2 + 32/8 = 6 effective bits
    under = Method.from_plan(Plan.uniform(fp, 1, spec=SPEC), "under", budget=6.0)  # 5 bits, built for 6
    res = evaluate(model, _ids(n=1), [Method.from_plan(g8, "exact"), under,
                                      Method.from_plan(Plan.uniform(fp, 3, spec=SPEC), "other")],
                   budgets=[6.0], flips=False)
    assert [res[n]["compared_at"] for n in ("exact", "under", "other")] == [6.0, 6.0, None]
    assert res["fp"]["compared_at"] is None and res.settings["budgets"] == [6.0]
    # Without budgets, the compared budgets are those the rows were built for.
    res = evaluate(model, _ids(n=1), [under, Method.from_plan(Plan.uniform(fp, 3, spec=SPEC), "other")],
                   flips=False)
    assert res.settings["budgets"] == [6.0] and res["other"]["compared_at"] is None
    with pytest.raises(rateq.RateQError, match="positive, finite"):
        evaluate(model, _ids(n=1), [under], budgets=[float("inf")])
