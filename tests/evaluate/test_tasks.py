"""Passkey prompts and checker, greedy agreement, and cell summaries; tasks run through RateQCache and DynamicCache."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQCache, RateQError, fingerprint
from rateq.evaluate.tasks import (PASSKEY_NEEDLE, agreement, check_passkey, greedy_tokens, passkey_prompt,
                                  run_passkey, summarize)


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
    head = len(rateq.tokenize(tok, text[:text.index("<|im_start|>user\n") + len("<|im_start|>user\n")]))
    tail = len(rateq.tokenize(tok, text[text.index("\n\nWhat is the pass key?"):]))
    fill = context - head - tail - len(needle)
    assert abs(starts[0] - (head + depth * fill)) <= 1
    # the key occurs as a whole number only twice, both in the needle sentence ("… is 41190. … 41190 is …"):
    # the haystack never holds it
    assert re.findall(r"\d+", text).count(answer) == 2
    assert text.count(PASSKEY_NEEDLE.format(key=answer).strip()) == 1
    # chat template around it, question last, generation prompt open
    assert text.startswith("<|im_start|>system") and text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\n")


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
    kw = dict(contexts=[96, 160], depths=[0.0, 0.5, 1.0], trials=2, max_new_tokens=6)
    events = []
    ours = run_passkey(model, tok, lambda: RateQCache(plan, model), **kw, progress=lambda *e: events.append(e))
    ref = run_passkey(model, tok, lambda: DynamicCache(config=model.config), **kw)
    strip = lambda cells: [{k: c[k] for k in ("context", "depth", "accuracy", "answers", "outputs", "tokens")}  # noqa: E731
                           for c in cells]
    assert strip(ours) == strip(ref)
    assert [(c["context"], c["depth"]) for c in ours] == [(96, 0.0), (96, 0.5), (96, 1.0), (160, 0.0), (160, 0.5), (160, 1.0)]
    assert all(c["trials"] == 2 and len(c["answers"]) == 2 and 0.0 <= c["accuracy"] <= 1.0 for c in ours)
    assert ours[0]["answers"][0] != ours[0]["answers"][1]  # trials use different keys
    assert all(c["tokens_per_s"] > 0 for c in ours if c["new_tokens"] > c["trials"])
    assert [e[:2] for e in events] == [(i, 12) for i in range(1, 13)] and "tokens/s" in events[-1][2]
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


@pytest.mark.slow
def test_smollm_finds_a_short_passkey_through_16_bit_cache(smol):
    # SmolLM2-135M is weak at this task (measured with trials=3, seeds 0-2: 0-67% of trials at 128-512 tokens);
    # seed 1 at 128 tokens is solved at every depth, so the 16-bit cache (fp16 storage) must keep all of it.
    model, tok = smol
    plan = Plan.uniform(fingerprint(model), 16)
    kw = dict(contexts=[128], depths=[0.0, 0.5, 1.0], seed=1)
    ref = run_passkey(model, tok, lambda: DynamicCache(config=model.config), **kw)
    ours = run_passkey(model, tok, lambda: RateQCache(plan, model), **kw)
    assert [c["accuracy"] for c in ref] == [1.0, 1.0, 1.0], [c["outputs"] for c in ref]
    assert summarize(ours, ref) == {"accuracy": 1.0, "cells": 3, "reference_solved": 3, "kept": 1.0}
