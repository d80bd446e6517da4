"""Task evaluation through the cache: passkey retrieval and greedy agreement with full precision.

Perplexity is teacher-forced, so it never shows what a model does with its own output. These tasks generate
greedily through a real cache (`make_cache()`: a `RateQCache`, or a `DynamicCache` for full precision), so a
quantized plan is judged on what a user would get: can the model still fetch a number buried in a long
context, and how long do its tokens stay the ones full precision would pick.

    cells = run_passkey(model, tok, lambda: RateQCache(plan, model), [1024, 2048], [0.0, 0.5, 1.0])
    ref = run_passkey(model, tok, lambda: DynamicCache(config=model.config), [1024, 2048], [0.0, 0.5, 1.0])
    summarize(cells, ref)  # {"accuracy": …, "kept": …}
"""

from __future__ import annotations

import random
import re
import time
from typing import Callable, Sequence

import torch

from ..errors import RateQError
from ..text import DEFAULT_EVAL_TEXT, load_text, tokenize

Progress = Callable[[int, int, str], None]

PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key?"
_PLAIN_SUFFIX = "\n\nQuestion: What is the pass key?\nAnswer: The pass key is"  # for tokenizers without a chat template
_SLOT = "\uE000"  # a private-use character marking where the haystack goes in the rendered template
_DIGITS = re.compile(r"\d+")


def _frame(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: the chat template around the user turn (with the question
    after the haystack and the generation prompt), or a BOS and a plain question without a template."""
    if getattr(tokenizer, "chat_template", None):
        content = f"{_SLOT}\n\n{PASSKEY_QUESTION}"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        before, after = rendered.split(_SLOT)
        ids = lambda s: tokenize(tokenizer, s).tolist() if s else []  # noqa: E731
        return ids(before), ids(after)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos, tokenize(tokenizer, _PLAIN_SUFFIX).tolist()


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int,
                   haystack: str = DEFAULT_EVAL_TEXT) -> tuple[torch.Tensor, str]:
    """A passkey prompt of `context_tokens` tokens in all, as `(input_ids (1, T), answer)`.

    A random 5-digit key in `PASSKEY_NEEDLE` sits at `depth` (0: first, 1: last) of a haystack of `haystack`
    text that fills the rest, followed by the question, inside the tokenizer's chat template when it has one.
    The prompt is built from token ids, so its length and the needle's position are exact; the same seed gives
    the same key and haystack (whatever the depth, so depths differ only in where the needle is)."""
    if not 0.0 <= depth <= 1.0:
        raise RateQError(f"the needle depth must be between 0 and 1, got {depth}")
    rng = random.Random(int(seed))
    key = str(rng.randint(10_000, 99_999))
    before, after = _frame(tokenizer)
    needle = tokenize(tokenizer, PASSKEY_NEEDLE.format(key=key)).tolist()
    n_fill = int(context_tokens) - len(before) - len(needle) - len(after)
    if n_fill < 0:
        raise RateQError(f"a passkey prompt needs at least {context_tokens - n_fill} tokens (template, needle and "
                         f"question); got context_tokens={context_tokens}")
    text = load_text(haystack)
    chars = 8 * n_fill + 2_000  # comfortably more than n_fill tokens of English prose
    if len(text) < chars:
        raise RateQError(f"text {haystack!r} is too short for a {context_tokens}-token haystack")
    start = rng.randrange(0, len(text) - chars + 1)
    start = text.find(" ", start) + 1  # begin on a word
    fill = tokenize(tokenizer, text[start:start + chars]).tolist()[:n_fill]
    if len(fill) < n_fill:
        raise RateQError(f"text {haystack!r} gave {len(fill)} tokens for a {n_fill}-token haystack")
    while key in tokenizer.decode(fill):  # the key must be findable only in the needle
        key = str(rng.randint(10_000, 99_999))
        needle = tokenize(tokenizer, PASSKEY_NEEDLE.format(key=key)).tolist()
    at = round(depth * n_fill)
    ids = before + fill[:at] + needle + fill[at:] + after
    return torch.tensor([ids], dtype=torch.long), key


def check_passkey(text: str, answer: str | int) -> bool:
    """Whether the first run of digits in `text` is exactly `answer`: a wrong, partial or longer number fails,
    and so does an answer with no number."""
    found = _DIGITS.search(text)
    return found is not None and found.group() == str(answer)


@torch.no_grad()
def greedy_tokens(model, ids: torch.Tensor, cache, n_tokens: int, *, stop: Sequence[int] = ()) -> torch.Tensor:
    """Up to `n_tokens` greedy tokens after `ids (1, T)` through `cache`: one prefill, then one token per step,
    each read back from the cache. Stops after a token in `stop`. A 1-D LongTensor on the CPU."""
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise RateQError(f"greedy decoding takes one sequence, got a batch of {ids.shape[0]}")
    device = next(model.parameters()).device
    out: list[int] = []
    logits = model(ids.to(device), past_key_values=cache, use_cache=True).logits[:, -1]
    while len(out) < n_tokens:
        token = int(logits.argmax(-1))
        out.append(token)
        if token in stop or len(out) == n_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.tensor(out, dtype=torch.long)


def _stop_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids = []
    for eos in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids += [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return sorted(set(ids))


def run_passkey(model, tokenizer, make_cache: Callable[[], object], contexts: Sequence[int],
                depths: Sequence[float], *, trials: int = 1, seed: int = 0, max_new_tokens: int = 12,
                haystack: str = DEFAULT_EVAL_TEXT, progress: Progress | None = None) -> list[dict]:
    """Passkey accuracy per (context, depth) cell, greedy through a new `make_cache()` per prompt.

    Trial `t` of every cell uses prompt seed `seed + t`: the same key in every cell, and the same haystack at
    every depth of a context, so a row of cells differs only in where the needle is. Each cell row holds `context`, `depth`, `accuracy` (share of trials
    answered exactly), `trials`, `answers`, `outputs` (decoded generations), `tokens`, `new_tokens`, `prefill_s`,
    `decode_s` and `tokens_per_s` (generated tokens per second of decoding). `progress(done, total, message)`
    reports each prompt with its speed."""
    if trials < 1 or max_new_tokens < 1:
        raise RateQError(f"trials and max_new_tokens must be 1 or more, got {trials} and {max_new_tokens}")
    stop = _stop_ids(model, tokenizer)
    cells, done, total = [], 0, len(contexts) * len(depths) * trials
    for context in contexts:
        for depth in depths:
            row = {"context": int(context), "depth": float(depth), "trials": trials, "answers": [], "outputs": [],
                   "tokens": [], "new_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}
            right = 0
            for t in range(trials):
                ids, answer = passkey_prompt(tokenizer, context, depth, seed + t, haystack)
                cache = make_cache()
                start = time.perf_counter()
                first = greedy_tokens(model, ids, cache, 1, stop=stop)
                mid = time.perf_counter()
                rest = greedy_tokens(model, first[None], cache, max_new_tokens - 1, stop=stop) \
                    if max_new_tokens > 1 and int(first[0]) not in stop else first[:0]
                end = time.perf_counter()
                new = torch.cat([first, rest])
                text = tokenizer.decode(new, skip_special_tokens=True)
                right += check_passkey(text, answer)
                row["answers"].append(answer)
                row["outputs"].append(text)
                row["tokens"].append(new.tolist())
                row["new_tokens"] += int(new.numel())
                row["prefill_s"] += mid - start
                row["decode_s"] += end - mid
                done += 1
                if progress:
                    speed = (new.numel() - 1) / (end - mid) if end > mid and new.numel() > 1 else float("nan")
                    progress(done, total, f"passkey {context} tokens, depth {depth:g}: {ids.shape[1] / (mid - start):.0f} "
                                          f"prefill tokens/s, {speed:.1f} decode tokens/s")
            row["accuracy"] = right / trials
            decoded = row["new_tokens"] - trials
            row["tokens_per_s"] = decoded / row["decode_s"] if row["decode_s"] > 0 else float("nan")
            cells.append(row)
    return cells


def agreement(model, ids: torch.Tensor, make_cache: Callable[[], object], reference_tokens, n_tokens: int) -> dict:
    """How closely greedy decoding through `make_cache()` follows `reference_tokens` (typically full precision's
    greedy tokens from the same `ids`): `agreement`, the share of the `n_tokens` positions holding the same
    token, `first_divergence`, the first position that differs (None when none does), and `tokens`."""
    reference = torch.as_tensor(reference_tokens, dtype=torch.long).flatten()
    if n_tokens < 1:
        raise RateQError(f"n_tokens must be 1 or more, got {n_tokens}")
    if reference.numel() < n_tokens:
        raise RateQError(f"the reference holds {reference.numel()} tokens, fewer than the {n_tokens} compared")
    got = greedy_tokens(model, ids, make_cache(), n_tokens)
    same = got == reference[:n_tokens]
    differ = (~same).nonzero()
    return {"agreement": float(same.float().mean()), "first_divergence": int(differ[0]) if differ.numel() else None,
            "n_tokens": n_tokens, "tokens": got.tolist()}


def summarize(cells: Sequence[dict], reference_cells: Sequence[dict]) -> dict:
    """`accuracy`, the mean over `cells`, and `kept`, the share of the cells full precision solves (accuracy 1
    in `reference_cells`) that these cells solve too (None when full precision solves none). Cells are matched
    by (context, depth)."""
    if not cells:
        raise RateQError("no passkey cells to summarize")
    key = lambda c: (int(c["context"]), float(c["depth"]))  # noqa: E731
    mine = {key(c): float(c["accuracy"]) for c in cells}
    solved = [key(c) for c in reference_cells if float(c["accuracy"]) == 1.0]
    missing = [k for k in solved if k not in mine]
    if missing:
        raise RateQError(f"cells missing from the run compared with full precision: {missing}")
    return {"accuracy": sum(mine.values()) / len(mine), "cells": len(mine), "reference_solved": len(solved),
            "kept": sum(mine[k] == 1.0 for k in solved) / len(solved) if solved else None}
