"""Passkey and multi-key prompts and their checker, greedy agreement, decode-mode perplexity, cell summaries and
`run_tasks`; tasks run through RateQCache and DynamicCache."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQCache, RateQError, fingerprint
from rateq.evaluate.method import Method
from rateq.evaluate.task_report import per_context
from rateq.evaluate.tasks import (NEEDLE_FACT, PASSKEY_ANSWER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION,
                                  TaskSettings,
                                  agreement, check_passkey, check_settings, decode_perplexity, greedy_tokens,
                                  needle_prompt, parse_tasks, passkey_prompt, run_passkey, run_tasks, summarize)


@pytest.fixture(scope="module")
def tok():
    return rateq.models.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_lm(tiny, tok):
    """A tiny random llama over the real tokenizer's vocabulary, in fp16: 16-bit units are stored in fp16, so
    a 16-bit plan then holds exactly what a DynamicCache holds."""
    return tiny("llama", kv_heads=2, vocab_size=len(tok), max_position_embeddings=1024).to(torch.float16)


def _needle_start(ids: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(needle) + 1) if ids[i:i + len(needle)] == needle]


@pytest.mark.parametrize("context", [200, 600])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_length_depth_and_single_needle(tok, context, depth):
    ids, answer = passkey_prompt(tok, context, depth, seed=5)
    assert ids.shape == (1, context) and ids.dtype == torch.long
    assert re.fullmatch(r"[1-9]\d{4}", answer)
    ids = ids[0].tolist()
    # the needle's tokens occur exactly once, at the requested depth of the haystack (to within a token)
    needle = rateq.tokenize(tok, PASSKEY_NEEDLE.format(key=answer)).tolist()
    starts = _needle_start(ids, needle)
    assert len(starts) == 1
    text = tok.decode(ids)
    user = "<|im_start|>user\n" + PASSKEY_INTRO
    head = len(rateq.tokenize(tok, text[:text.index(user) + len(user)]))
    tail = len(rateq.tokenize(tok, text[text.index("\n\nWhat is the pass key?"):]))
    fill = context - head - tail - len(needle)
    assert abs(starts[0] - (head + depth * fill)) <= 1
    # the key occurs as a whole number only twice, both in the needle sentence ("… is 41190. … 41190 is …"):
    # the haystack never holds it
    assert re.findall(r"\d+", text).count(answer) == 2
    assert text.count(PASSKEY_NEEDLE.format(key=answer).strip()) == 1
    # chat template around it, instruction first, question last, the answer started for the model
    assert text.startswith("<|im_start|>system") and user in text
    assert text.endswith(f"{PASSKEY_QUESTION}<|im_end|>\n<|im_start|>assistant\n{PASSKEY_ANSWER}")


def test_passkey_prompt_is_deterministic_by_seed(tok):
    a, key_a = passkey_prompt(tok, 300, 0.5, seed=1)
    b, key_b = passkey_prompt(tok, 300, 0.5, seed=1)
    c, key_c = passkey_prompt(tok, 300, 0.5, seed=2)
    assert torch.equal(a, b) and key_a == key_b
    assert key_a != key_c and not torch.equal(a, c)
    # the same seed at another depth: the same key and haystack, the needle moved
    d, key_d = passkey_prompt(tok, 300, 0.0, seed=1)
    assert key_d == key_a and sorted(d[0].tolist()) == sorted(a[0].tolist()) and not torch.equal(a, d)


def test_passkey_prompt_rejects_bad_requests(tok):
    with pytest.raises(RateQError, match="depth"):
        passkey_prompt(tok, 300, 1.5, seed=0)
    with pytest.raises(RateQError, match="at least"):
        passkey_prompt(tok, 20, 0.5, seed=0)


def test_check_passkey_is_exact():
    assert check_passkey("48213", "48213")
    assert check_passkey("The pass key is 48213.", 48213)
    assert check_passkey(" 48213 is the pass key. 11111", "48213")
    assert not check_passkey("48214", "48213")  # wrong
    assert not check_passkey("4821", "48213")  # partial
    assert not check_passkey("482130", "48213")  # extra digit
    assert not check_passkey("148213", "48213")
    assert not check_passkey("It is 12345, no, 48213", "48213")  # the first number counts
    assert not check_passkey("I do not remember.", "48213")


def test_16_bit_plan_through_rateq_cache_matches_dynamic_cache(tiny_lm, tok):
    model = tiny_lm
    plan = Plan.uniform(fingerprint(model), 16)
    kw = dict(contexts=[128, 192], depths=[0.0, 0.5, 1.0], trials=2, max_new_tokens=6)
    events = []
    ours = run_passkey(model, tok, lambda: RateQCache(plan, model), **kw, progress=lambda *e: events.append(e))
    ref = run_passkey(model, tok, lambda: DynamicCache(config=model.config), **kw)
    strip = lambda cells: [{k: c[k] for k in ("context", "depth", "accuracy", "answers", "outputs", "tokens")}  # noqa: E731
                           for c in cells]
    assert strip(ours) == strip(ref)
    assert [(c["context"], c["depth"]) for c in ours] == [(128, 0.0), (128, 0.5), (128, 1.0), (192, 0.0), (192, 0.5), (192, 1.0)]
    assert [c["prompt_tokens"] for c in ours] == [122] * 3 + [186] * 3  # prompt and answer fit in the context
    assert all(c["trials"] == 2 and len(c["answers"]) == len(c["correct"]) == 2 and 0.0 <= c["accuracy"] <= 1.0 for c in ours)
    assert ours[0]["answers"][0] != ours[0]["answers"][1]  # trials use different keys
    assert all(c["tokens_per_s"] > 0 for c in ours if c["new_tokens"] > c["trials"])
    # progress counts the cells' tokens (prompt and answer), one event per prompt, with its speeds
    assert [e[0] for e in events] == [128 * i for i in range(1, 7)] + [768 + 192 * i for i in range(1, 7)]
    assert all(e[1] == 6 * 128 + 6 * 192 for e in events) and "decode tok/s" in events[-1][2]
    assert summarize(ours, ref)["accuracy"] == summarize(ref, ref)["accuracy"]


def test_agreement_same_cache_and_first_divergence(tiny_lm):
    model = tiny_lm
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    make = lambda: DynamicCache(config=model.config)  # noqa: E731
    reference = greedy_tokens(model, ids, make(), 10)
    assert reference.shape == (10,)
    same = agreement(model, ids, make, reference, 10)
    assert same["agreement"] == 1.0 and same["first_divergence"] is None and same["tokens"] == reference.tolist()
    plan16 = Plan.uniform(fingerprint(model), 16)
    assert agreement(model, ids, lambda: RateQCache(plan16, model), reference, 10)["agreement"] == 1.0
    # while a 2-bit cache leaves the reference's path (so the 16-bit identity above is not vacuous)
    plan2 = Plan.uniform(fingerprint(model), 2, spec=QuantSpec(group_size=16))
    low = agreement(model, ids, lambda: RateQCache(plan2, model, policy=CachePolicy(residual=0, block=16)), reference, 10)
    assert low["agreement"] < 1.0 and low["first_divergence"] is not None
    # a reference changed at positions 3 and 7: 8 of 10 agree, the first divergence is at 3
    changed = reference.clone()
    changed[3] += 1
    changed[7] += 1
    got = agreement(model, ids, make, changed, 10)
    assert got["agreement"] == pytest.approx(0.8) and got["first_divergence"] == 3
    # only the first n_tokens count
    assert agreement(model, ids, make, changed, 3) == {"agreement": 1.0, "first_divergence": None, "n_tokens": 3,
                                                       "tokens": reference[:3].tolist()}
    with pytest.raises(RateQError, match="fewer"):
        agreement(model, ids, make, reference[:5], 10)


def test_summarize_accuracy_and_kept():
    cell = lambda c, d, a: {"context": c, "depth": d, "accuracy": a}  # noqa: E731
    ref = [cell(512, 0.0, 1.0), cell(512, 1.0, 1.0), cell(1024, 0.0, 1.0), cell(1024, 1.0, 0.5)]
    ours = [cell(512, 0.0, 1.0), cell(512, 1.0, 0.5), cell(1024, 0.0, 0.0), cell(1024, 1.0, 1.0)]
    got = summarize(ours, ref)
    assert got["accuracy"] == pytest.approx(2.5 / 4)
    # full precision solves 3 cells; this method solves 1 of them (its win at (1024, 1.0) is not counted)
    assert got["kept"] == pytest.approx(1 / 3) and got["reference_solved"] == 3
    assert summarize(ref, ref)["kept"] == 1.0
    assert summarize(ours, [cell(512, 0.0, 0.5)])["kept"] is None
    with pytest.raises(RateQError, match="missing"):
        summarize(ours[:1], ref)


def test_kept_counts_prompts_when_cells_hold_several_trials():
    # with trials, a cell half answered keeps the prompts it answers: kept is over full precision's answered prompts
    cell = lambda c, d, *right: {"context": c, "depth": d, "accuracy": sum(right) / len(right),  # noqa: E731
                                 "correct": list(right)}
    ref = [cell(512, 0.0, True, True, True), cell(512, 1.0, True, False, True), cell(1024, 0.0, False, False, False)]
    ours = [cell(512, 0.0, True, False, True), cell(512, 1.0, True, True, False), cell(1024, 0.0, True, True, True)]
    got = summarize(ours, ref)
    # full precision answers 5 prompts; ours answers 3 of those (its wins where full precision misses do not count)
    assert got["reference_solved"] == 5 and got["kept"] == pytest.approx(3 / 5) and got["cells"] == 3
    assert got["accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert summarize(ref, ref)["kept"] == 1.0
    assert per_context(ours, ref) == {512: {"accuracy": pytest.approx(2 / 3), "kept": pytest.approx(3 / 5), "solved": 3,
                                            "reference_solved": 5},
                                      1024: {"accuracy": 1.0, "kept": None, "solved": 0, "reference_solved": 0}}
    # a wrong answer in a trial full precision answers lowers kept by exactly one prompt
    worse = [dict(ours[0], correct=[False, False, True], accuracy=1 / 3)] + ours[1:]
    assert summarize(worse, ref)["kept"] == pytest.approx(2 / 5)


@pytest.mark.slow
def test_smollm_finds_the_passkey_through_16_bit_cache(smol):
    # With the instruction first and the answer started, full precision answers every depth at 512 tokens (and
    # every 1k and 4k cell measured on three bundled texts); the 16-bit cache (fp16 storage) must keep all of it.
    model, tok = smol
    plan = Plan.uniform(fingerprint(model), 16)
    kw = dict(contexts=[512], depths=[0.0, 0.5, 1.0], seed=1)
    ref = run_passkey(model, tok, lambda: DynamicCache(config=model.config), **kw)
    ours = run_passkey(model, tok, lambda: RateQCache(plan, model), **kw)
    assert [c["accuracy"] for c in ref] == [1.0, 1.0, 1.0], [c["outputs"] for c in ref]
    assert summarize(ours, ref) == {"accuracy": 1.0, "cells": 3, "reference_solved": 3, "kept": 1.0}


@pytest.mark.parametrize("depth", [0.0, 0.6, 1.0])
def test_needle_prompt_hides_every_fact_once_and_asks_one(tok, depth):
    ids, answer = needle_prompt(tok, 400, depth, seed=3, keys=4)
    assert ids.shape == (1, 400) and re.fullmatch(r"[1-9]\d{6}", answer)
    text = tok.decode(ids[0])
    facts = re.findall(r"One of the special magic numbers for (\w+) is: (\d+)\.", text)
    assert len(facts) == 4 and len({w for w, _ in facts}) == 4 and len({v for _, v in facts}) == 4
    asked = re.search(r"What is the special magic number for (\w+) mentioned", text).group(1)
    assert dict(facts)[asked] == answer and re.findall(r"\d+", text).count(answer) == 1
    assert text.endswith(f"only.<|im_end|>\n<|im_start|>assistant\nThe special magic number for {asked} mentioned in "
                         "the provided text is")
    # the asked fact sits at the depth (to within the other facts' lengths), the others where the seed puts them
    fact = rateq.tokenize(tok, NEEDLE_FACT.format(word=asked, value=answer)).tolist()
    start = _needle_start(ids[0].tolist(), fact)
    assert len(start) == 1
    same, key = needle_prompt(tok, 400, depth, seed=3, keys=4)
    assert torch.equal(same, ids) and key == answer
    other, key_other = needle_prompt(tok, 400, depth, seed=4, keys=4)
    assert key_other != answer
    # the same seed at another depth: the same facts, the asked one moved
    moved, key_moved = needle_prompt(tok, 400, 1.0 - depth if depth != 0.6 else 0.0, seed=3, keys=4)
    assert key_moved == answer and sorted(moved[0].tolist()) == sorted(ids[0].tolist())
    with pytest.raises(RateQError, match="depth"):
        needle_prompt(tok, 400, -0.1, seed=0)
    with pytest.raises(RateQError, match="at least"):
        needle_prompt(tok, 60, 0.5, seed=0, keys=8)


def test_tasks_parse_and_settings_are_checked_before_any_model():
    assert parse_tasks(["decode-ppl,passkey", "agreement", "passkey"]) == ("passkey", "agreement", "decode-ppl")
    with pytest.raises(RateQError, match="unknown task 'ruler'"):
        parse_tasks("passkey,ruler")
    with pytest.raises(RateQError, match="between 0 and 1"):
        check_settings(TaskSettings(depths=(0.5, 1.5)))
    with pytest.raises(RateQError, match="beyond the model's limit of 8192"):
        check_settings(TaskSettings(contexts=(1024, 16384)), limit=8192)
    with pytest.raises(RateQError, match="agreement prompts of 8192 tokens and 128 generated"):
        check_settings(TaskSettings(tasks=("agreement",), agree_context=8192), limit=8192)
    with pytest.raises(RateQError, match="trials must be at least 1"):
        check_settings(TaskSettings(trials=0))
    check_settings(TaskSettings(contexts=(8192,)), limit=8192)  # prompt and answer fit in the context: allowed


def test_decode_perplexity_is_apply_data_and_16_bits_is_full_precision(tiny_lm):
    from rateq.runtime.run import cache_perplexity

    model = tiny_lm
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    plan2 = Plan.uniform(fingerprint(model), 2, spec=QuantSpec(group_size=16))
    policy = CachePolicy(residual=0, block=16)
    got = decode_perplexity(model, ids, plan=plan2, policy=policy)
    assert got["ppl"] == cache_perplexity(model, ids, plan2, policy=policy)["ppl"] and got["prefill"] == 20
    fp = decode_perplexity(model, ids, make_cache=lambda: DynamicCache(config=model.config))
    plan16 = Plan.uniform(fingerprint(model), 16)
    # a 16-bit cache holds what a DynamicCache holds; its decode steps attend through rateq's own kernels, so
    # the log-probabilities agree to rounding, not bit for bit
    assert decode_perplexity(model, ids, plan=plan16)["nll"] == pytest.approx(fp["nll"], rel=1e-5)
    assert abs(got["nll"] - fp["nll"]) > 1e-3
    with pytest.raises(RateQError, match="not both"):
        decode_perplexity(model, ids)


SMALL = dict(tasks=("passkey", "needle", "agreement", "decode-ppl"), contexts=(160, 192), depths=(0.0, 1.0),
             keys=2, max_new_tokens=4, agree_tokens=5, agree_context=48, ppl_context=40, trials=1, seed=2)


def _strip(row: dict) -> dict:
    """A row's answers, without timings."""
    out = {}
    for task in ("passkey", "needle"):
        out[task] = [(c["context"], c["depth"], c["accuracy"], c["outputs"], c["tokens"]) for c in row[task]["cells"]]
    out["agreement"] = [(p["agreement"], p["first_divergence"], p["tokens"]) for p in row["agreement"]["prompts"]]
    return out


def test_run_tasks_16_bit_plan_is_full_precision_deterministic_and_serializable(tiny_lm, tok):
    import json

    model = tiny_lm
    plan16 = Plan.uniform(fingerprint(model), 16)
    plan2 = Plan.uniform(fingerprint(model), 2, spec=QuantSpec(group_size=16), policy=CachePolicy(block=16))
    events = []
    result = run_tasks(model, tok, [Method.from_plan(plan16, "p16", policy=plan16.policy),
                                    Method.from_plan(plan2, "p2", policy=plan2.policy)],
                       progress=lambda *e: events.append(e), **SMALL)
    fp, p16, p2 = result.rows
    assert [r["name"] for r in result] == ["fp", "p16", "p2"] and result["p16"] is p16
    # 16 bits through RateQCache (fp16 storage of an fp16 model): exactly full precision's answers
    assert _strip(p16) == _strip(fp)
    assert p16["decode_ppl"]["nll"] == pytest.approx(fp["decode_ppl"]["nll"], rel=1e-5)  # to rounding (see above)
    assert p16["agreement"]["agreement"] == 1.0 and p16["agreement"]["first_divergence"] == [None]
    for task in ("passkey", "needle"):
        assert p16[task]["kept"] in (None, 1.0) and p16[task]["accuracy"] == fp[task]["accuracy"]
        assert len(p16[task]["cells"]) == 4
    # the 2-bit plan leaves full precision's path (the identity above is not vacuous)
    assert p2["agreement"]["agreement"] < 1.0 and p2["decode_ppl"]["nll"] != fp["decode_ppl"]["nll"]
    assert p2["policy"] == {"residual": 0, "block": 16, "sinks": 0} and fp["policy"] is None
    # deterministic by seed: the same run gives the same answers; another seed other prompts
    again = run_tasks(model, tok, [plan2], **SMALL)
    assert _strip(again[1]) == _strip(p2) and again[1]["decode_ppl"]["nll"] == p2["decode_ppl"]["nll"]
    other = run_tasks(model, tok, [], **{**SMALL, "seed": 3, "tasks": ("passkey",)})
    assert [c["answers"] for c in other[0]["passkey"]["cells"]] != [c["answers"] for c in fp["passkey"]["cells"]]
    # progress counts tokens up to the total, per row
    per_row = 2 * (160 + 192) * 2 + (48 + 5) + 40
    assert events[-1][0] == events[-1][1] == 3 * per_row and all(e[0] <= e[1] for e in events)
    # JSON: settings and rows, each retrieval task with accuracy, kept and per-cell results
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["settings"]["tasks"] == list(SMALL["tasks"]) and doc["settings"]["contexts"] == [160, 192]
    for row in doc["rows"]:
        for task in ("passkey", "needle"):
            assert {"accuracy", "kept", "reference_solved", "cells"} <= set(row[task])
            assert {"context", "depth", "accuracy", "answers", "outputs"} <= set(row[task]["cells"][0])
        assert {"agreement", "first_divergence", "prompts"} <= set(row["agreement"])
        assert {"ppl", "nll", "predictions"} <= set(row["decode_ppl"])


def test_run_tasks_refuses_rows_without_a_plan_and_builds_kivi(tiny_lm, tok):
    with pytest.raises(RateQError, match="no RateQCache holds it"):
        run_tasks(tiny_lm, tok, ["rank@4"], tasks=("agreement",), agree_tokens=2, agree_context=16)
    result = run_tasks(tiny_lm, tok, ["kivi"], budgets=[3], tasks=("agreement",), agree_tokens=2, agree_context=16)
    assert [r["name"] for r in result] == ["fp", "kivi@3"] and result[1]["compared_at"] == 3
    assert result[1]["policy"]["block"] % 32 == 0


def test_task_report_writes_markdown_json_and_heatmaps(tiny_lm, tok, tmp_path, png_size):
    import json

    from rateq.evaluate.task_report import write_report

    plan2 = Plan.uniform(fingerprint(tiny_lm), 2, spec=QuantSpec(group_size=16), policy=CachePolicy(block=16))
    result = run_tasks(tiny_lm, tok, [plan2], **{**SMALL, "tasks": ("passkey", "agreement")})
    paths = write_report(result, tmp_path / "r", title="t")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
        ["report.md", "results.json", "passkey_fp.png", f"passkey_{result[1]['name'].replace('@', '_')}.png"])
    for p in paths.values():
        if p.suffix == ".png":
            png_size(p)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| fp | full precision | 16 |" in md and "agreement (5 tokens)" in md and "![" in md
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(doc["per_context"]["passkey"]) == {"fp", result[1]["name"]}
    ref = [{"context": 1, "depth": d, "accuracy": a} for d, a in ((0.0, 1.0), (1.0, 0.0))]
    assert per_context(ref, ref)[1] == {"accuracy": 0.5, "kept": 1.0, "solved": 1, "reference_solved": 1}
