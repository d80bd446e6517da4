"""Task evaluation through the cache: passkey and multi-key retrieval, greedy agreement with full precision,
and perplexity decoded token by token.

Perplexity in one teacher-forced pass never shows what a model does with its own output, and never reads a
quantized cache back. These tasks run through a real cache (`make_cache()`: a `RateQCache`, or a
`DynamicCache` for full precision), so a plan is judged on what a user would get: can the model still fetch a
number buried in a long context, and how long do its tokens stay the ones full precision would pick.

    cells = run_passkey(model, tok, lambda: RateQCache(plan, model), [1024, 2048], [0.0, 0.5, 1.0])
    ref = run_passkey(model, tok, lambda: DynamicCache(config=model.config), [1024, 2048], [0.0, 0.5, 1.0])
    summarize(cells, ref)  # {"accuracy": …, "kept": …}

`run_tasks` runs every task for full precision, plans, profiles and baselines at matched effective bits (what
`rateq eval --task …` prints); `rateq.evaluate.task_report` writes its markdown, JSON and heatmaps.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import RateQError
from ..models import count_parameters
from ..text import DEFAULT_EVAL_TEXT, load_text, text_windows, tokenize
from .core import Evaluation

Progress = Callable[[int, int, str], None]

TASKS = ("passkey", "needle", "agreement", "decode-ppl")

# Passkey: the instruction comes first, the needle sits in the haystack, the question is asked last, and the
# assistant's answer is started for the model ("The pass key is"), so that its next tokens are the number.
# Of the designs measured with the default model, this one let full precision answer every 1k and 4k cell on
# three bundled texts; without the started answer, or without the instruction first, it missed many.
PASSKEY_INTRO = "Read the text below and remember the pass key hidden in it.\n\n"
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
PASSKEY_ANSWER = "The pass key is"

# Multi-key retrieval (RULER's niah_multikey): several facts of the same form, one asked.
NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n\n")
NEEDLE_FACT = " One of the special magic numbers for {word} is: {value}. "
NEEDLE_QUESTION = ("What is the special magic number for {word} mentioned in the provided text? Answer with the number "
                   "only.")
NEEDLE_ANSWER = "The special magic number for {word} mentioned in the provided text is"
NEEDLE_WORDS = (
    "apple", "anchor", "badger", "balloon", "banjo", "beacon", "bison", "blanket", "bramble", "candle", "canyon",
    "cactus", "cobalt", "comet", "coral", "cricket", "dolphin", "ember", "falcon", "fern", "fiddle", "glacier",
    "granite", "harbor", "hazel", "heron", "iris", "jasmine", "kettle", "lantern", "lemur", "lilac", "maple",
    "meadow", "marble", "nectar", "nutmeg", "orchid", "otter", "pebble", "pepper", "quartz", "raven", "saffron",
    "sparrow", "thistle", "tulip", "velvet", "walnut", "willow", "zephyr",
)

_SLOT = "\uE000"  # a private-use character marking where the haystack goes in the rendered template
_DIGITS = re.compile(r"\d+")
DEFAULT_CHAR_START = 100_000  # where agreement prompts and decode windows start (as `rateq apply --data`)


# -- prompts ---------------------------------------------------------------------------------------------------
def _frame(tokenizer, intro: str, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: the chat template around the user turn (the instruction, the
    haystack, then the question) with the generation prompt and the start of the answer, or, for a tokenizer
    without a template, a BOS and the same parts as plain text."""
    ids = lambda s: tokenize(tokenizer, s).tolist() if s else []  # noqa: E731
    if getattr(tokenizer, "chat_template", None):
        content = f"{intro}{_SLOT}\n\n{question}"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        before, after = rendered.split(_SLOT)
        return ids(before), ids(after + answer)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    return bos + ids(intro), ids(f"\n\nQuestion: {question}\nAnswer: {answer}")


def _haystack(tokenizer, text: str, n_tokens: int, rng: random.Random, name: str) -> list[int]:
    """`n_tokens` tokens of `text` from a seeded random start, beginning on a word."""
    chars = 8 * n_tokens + 2_000  # comfortably more than n_tokens tokens of English prose
    if len(text) < chars:
        raise RateQError(f"text {name!r} is too short for a {n_tokens}-token haystack ({len(text)} characters)")
    start = rng.randrange(0, len(text) - chars + 1)
    start = text.find(" ", start) + 1  # begin on a word
    fill = tokenize(tokenizer, text[start:start + chars]).tolist()[:n_tokens]
    if len(fill) < n_tokens:
        raise RateQError(f"text {name!r} gave {len(fill)} tokens for a {n_tokens}-token haystack")
    return fill


def _text(haystack: str, text: str | None) -> str:
    return load_text(haystack) if text is None else text


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int,
                   haystack: str = DEFAULT_EVAL_TEXT, *, text: str | None = None) -> tuple[torch.Tensor, str]:
    """A passkey prompt of `context_tokens` tokens in all, as `(input_ids (1, T), answer)`.

    The instruction (`PASSKEY_INTRO`), then a haystack of `haystack` text holding `PASSKEY_NEEDLE` with a random
    5-digit key at `depth` (0: first, 1: last), then the question, inside the tokenizer's chat template when it
    has one, the answer started with `PASSKEY_ANSWER`. The prompt is built from token ids, so its length and
    the needle's position are exact; the same seed gives the same key and haystack whatever the depth, so
    depths differ only in where the needle is. `text`: the haystack's text already loaded."""
    if not 0.0 <= depth <= 1.0:
        raise RateQError(f"the needle depth must be between 0 and 1, got {depth}")
    rng = random.Random(int(seed))
    key = str(rng.randint(10_000, 99_999))
    before, after = _frame(tokenizer, PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_ANSWER)
    needle = tokenize(tokenizer, PASSKEY_NEEDLE.format(key=key)).tolist()
    n_fill = int(context_tokens) - len(before) - len(needle) - len(after)
    if n_fill < 0:
        raise RateQError(f"a passkey prompt needs at least {context_tokens - n_fill} tokens (template, needle and "
                         f"question); got context_tokens={context_tokens}")
    fill = _haystack(tokenizer, _text(haystack, text), n_fill, rng, haystack)
    while key in tokenizer.decode(fill):  # the key must be findable only in the needle
        key = str(rng.randint(10_000, 99_999))
        needle = tokenize(tokenizer, PASSKEY_NEEDLE.format(key=key)).tolist()
    at = round(depth * n_fill)
    ids = before + fill[:at] + needle + fill[at:] + after
    return torch.tensor([ids], dtype=torch.long), key


def needle_prompt(tokenizer, context_tokens: int, depth: float, seed: int, haystack: str = DEFAULT_EVAL_TEXT, *,
                  keys: int = 4, text: str | None = None) -> tuple[torch.Tensor, str]:
    """A multi-key retrieval prompt (RULER-style) of `context_tokens` tokens, as `(input_ids (1, T), answer)`.

    `keys` facts `NEEDLE_FACT` ("… magic number for <word> is: <7 digits>."), each with its own word and
    number, sit in a haystack of `haystack` text; the one asked sits at `depth`, the others at depths drawn
    from the seed (the same at every depth of a seed). The question names the asked word and the answer is
    started for the model. Deterministic by seed, like `passkey_prompt`."""
    if not 0.0 <= depth <= 1.0:
        raise RateQError(f"the needle depth must be between 0 and 1, got {depth}")
    if not 1 <= keys <= len(NEEDLE_WORDS):
        raise RateQError(f"the number of keys must be between 1 and {len(NEEDLE_WORDS)}, got {keys}")
    rng = random.Random(int(seed))
    words = rng.sample(NEEDLE_WORDS, keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
    others = [rng.random() for _ in words[1:]]
    asked = words[0]
    before, after = _frame(tokenizer, NEEDLE_INTRO, NEEDLE_QUESTION.format(word=asked),
                           NEEDLE_ANSWER.format(word=asked))
    facts = [tokenize(tokenizer, NEEDLE_FACT.format(word=w, value=v)).tolist() for w, v in zip(words, values)]
    n_fill = int(context_tokens) - len(before) - len(after) - sum(map(len, facts))
    if n_fill < 0:
        raise RateQError(f"a needle prompt with {keys} keys needs at least {context_tokens - n_fill} tokens; got "
                         f"context_tokens={context_tokens}")
    fill = _haystack(tokenizer, _text(haystack, text), n_fill, rng, haystack)
    filled = tokenizer.decode(fill)
    if any(v in filled for v in values):  # a number the haystack holds would be ambiguous: draw others
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
        facts = [tokenize(tokenizer, NEEDLE_FACT.format(word=w, value=v)).tolist() for w, v in zip(words, values)]
    # Insert from the deepest position down, so earlier positions stay valid; at a tie the asked fact goes first.
    places = sorted(((round(d * n_fill), i) for i, d in enumerate([depth, *others])), reverse=True)
    ids = list(fill)
    for at, i in places:
        ids[at:at] = facts[i]
    return torch.tensor([before + ids + after], dtype=torch.long), values[0]


def check_passkey(text: str, answer: str | int) -> bool:
    """Whether the first run of digits in `text` is exactly `answer`: a wrong, partial or longer number fails,
    and so does an answer with no number."""
    found = _DIGITS.search(text)
    return found is not None and found.group() == str(answer)


# -- running through a cache -----------------------------------------------------------------------------------
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


def _rates(prompt: int, prefill_s: float, decoded: int, decode_s: float) -> str:
    pre = f"{prompt / prefill_s:,.0f}" if prefill_s > 0 else "…"
    dec = f"{decoded / decode_s:.1f}" if decode_s > 0 and decoded > 0 else "…"
    return f"{pre} prefill tok/s, {dec} decode tok/s"


def run_retrieval(task: str, model, tokenizer, make_cache: Callable[[], object], contexts: Sequence[int],
                  depths: Sequence[float], *, trials: int = 1, seed: int = 0, max_new_tokens: int = 12,
                  haystack: str = DEFAULT_EVAL_TEXT, keys: int = 4, progress: Progress | None = None) -> list[dict]:
    """Accuracy of `task` (`passkey` or `needle`) per (context, depth) cell, greedy through a new
    `make_cache()` per prompt.

    A cell of context C holds prompts of C − `max_new_tokens` tokens, so that prompt and answer fit in C.
    Trial `t` of every cell uses prompt seed `seed + t`: the same key in every cell, and the same haystack at
    every depth of a context, so a row of cells differs only in where the needle is. Each cell holds
    `context`, `depth`, `accuracy` (share of trials answered exactly), `trials`, `correct` (per trial),
    `answers`, `outputs` (decoded generations), `tokens`, `prompt_tokens`, `new_tokens`, `prefill_s`,
    `decode_s` and `tokens_per_s` (generated tokens per second of decoding). `progress(done, total, message)`
    counts prompt and answer tokens, and reports each prompt with its speed."""
    if task not in ("passkey", "needle"):
        raise RateQError(f"unknown retrieval task {task!r}; use passkey or needle")
    if trials < 1 or max_new_tokens < 1:
        raise RateQError(f"trials and max_new_tokens must be 1 or more, got {trials} and {max_new_tokens}")
    text = load_text(haystack)
    stop = _stop_ids(model, tokenizer)
    cells, done = [], 0
    total = sum(int(c) for c in contexts) * len(depths) * trials
    for context in contexts:
        length = int(context) - max_new_tokens
        for depth in depths:
            row = {"context": int(context), "depth": float(depth), "trials": trials, "answers": [], "outputs": [],
                   "tokens": [], "prompt_tokens": length, "new_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}
            row["correct"] = []
            for t in range(trials):
                if task == "passkey":
                    ids, answer = passkey_prompt(tokenizer, length, depth, seed + t, haystack, text=text)
                else:
                    ids, answer = needle_prompt(tokenizer, length, depth, seed + t, haystack, keys=keys, text=text)
                cache = make_cache()
                start = time.perf_counter()
                first = greedy_tokens(model, ids, cache, 1, stop=stop)
                mid = time.perf_counter()
                rest = greedy_tokens(model, first[None], cache, max_new_tokens - 1, stop=stop) \
                    if max_new_tokens > 1 and int(first[0]) not in stop else first[:0]
                end = time.perf_counter()
                new = torch.cat([first, rest])
                text_out = tokenizer.decode(new, skip_special_tokens=True)
                row["correct"].append(check_passkey(text_out, answer))
                row["answers"].append(answer)
                row["outputs"].append(text_out)
                row["tokens"].append(new.tolist())
                row["new_tokens"] += int(new.numel())
                row["prefill_s"] += mid - start
                row["decode_s"] += end - mid
                done += int(context)
                if progress:
                    progress(done, total, f"{task} {context}, depth {depth:g}: "
                                          f"{_rates(ids.shape[1], mid - start, new.numel() - 1, end - mid)}")
            row["accuracy"] = sum(row["correct"]) / trials
            decoded = row["new_tokens"] - trials
            row["tokens_per_s"] = decoded / row["decode_s"] if row["decode_s"] > 0 else float("nan")
            cells.append(row)
    return cells


def run_passkey(model, tokenizer, make_cache: Callable[[], object], contexts: Sequence[int],
                depths: Sequence[float], **kw) -> list[dict]:
    """Passkey accuracy per (context, depth) cell: `run_retrieval("passkey", …)`."""
    return run_retrieval("passkey", model, tokenizer, make_cache, contexts, depths, **kw)


def run_needle(model, tokenizer, make_cache: Callable[[], object], contexts: Sequence[int],
               depths: Sequence[float], **kw) -> list[dict]:
    """Multi-key retrieval accuracy per (context, depth) cell: `run_retrieval("needle", …)`."""
    return run_retrieval("needle", model, tokenizer, make_cache, contexts, depths, **kw)


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


@torch.no_grad()
def decode_perplexity(model, ids: torch.Tensor, *, plan=None, policy=None, make_cache: Callable[[], object] | None = None,
                      prefill: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of `ids (B, T)` with the first `prefill` tokens (default T // 2) in one forward and the rest
    decoded token by token, every prediction made from what the cache holds.

    With a `plan` this is `rateq.runtime.run.cache_perplexity` (what `rateq apply --data` prints) under
    `policy`; with `make_cache` (a `DynamicCache` for full precision) the same loop runs through that cache.
    Returns `ppl`, `nll`, `predictions`, `prefill`, `seq_len` and `seconds`."""
    from ..runtime import run

    if (plan is None) == (make_cache is None):
        raise RateQError("give decode_perplexity a plan or a make_cache, not both")
    if ids.dim() == 1:
        ids = ids[None]
    if plan is not None:
        out = run.cache_perplexity(model, ids, plan, policy=policy, prefill=prefill, progress=progress)
        return {k: out[k] for k in ("ppl", "nll", "predictions", "prefill", "seq_len", "seconds")}
    out = run.decode_perplexity(model, ids, make_cache(), prefill=prefill, progress=progress)
    return {k: out[k] for k in ("ppl", "nll", "predictions", "prefill", "seq_len", "seconds")}


def prompt_results(cell: dict) -> list[bool]:
    """Whether each prompt (trial) of a retrieval cell was answered exactly; a cell without per-prompt results
    counts as one prompt, answered when its accuracy is 1."""
    if "correct" in cell:
        return [bool(x) for x in cell["correct"]]
    return [float(cell["accuracy"]) == 1.0]


def kept_prompts(cells: Sequence[dict], reference_cells: Sequence[dict]) -> tuple[int, int]:
    """`(kept, solved)`: how many prompts full precision answers exactly (`solved`) and how many of those these
    cells answer exactly too. Prompts are matched by (context, depth, trial); a cell of full precision's that
    these cells lack is an error."""
    key = lambda c: (int(c["context"]), float(c["depth"]))  # noqa: E731
    mine = {key(c): prompt_results(c) for c in cells}
    missing = [key(c) for c in reference_cells if any(prompt_results(c)) and key(c) not in mine]
    if missing:
        raise RateQError(f"cells missing from the run compared with full precision: {missing}")
    kept = solved = 0
    for c in reference_cells:
        for t, right in enumerate(prompt_results(c)):
            if right:
                solved += 1
                ours = mine.get(key(c), [])
                kept += t < len(ours) and ours[t]
    return kept, solved


def summarize(cells: Sequence[dict], reference_cells: Sequence[dict]) -> dict:
    """`accuracy`, the mean over `cells`, and `kept`, the share of the prompts full precision answers exactly
    (`reference_solved`, counted over every trial of every cell in `reference_cells`) that these cells answer
    exactly too (None when full precision answers none). With one trial per cell a prompt is a cell. Prompts
    are matched by (context, depth, trial)."""
    if not cells:
        raise RateQError("no passkey cells to summarize")
    kept, solved = kept_prompts(cells, reference_cells)
    return {"accuracy": sum(float(c["accuracy"]) for c in cells) / len(cells), "cells": len(cells),
            "reference_solved": solved, "kept": kept / solved if solved else None}


# -- every task, every method ----------------------------------------------------------------------------------
@dataclass
class TaskSettings:
    """What `run_tasks` runs. `contexts` and `depths` make the passkey / needle grid (each cell `trials`
    prompts; `keys` facts per needle prompt); `agreement` compares `agree_tokens` greedy tokens after `trials`
    prompts of `agree_context` tokens of `data`; `decode-ppl` decodes the second half of `trials` windows of
    `ppl_context` tokens of `data`. Agreement prompts and decode windows are consecutive, from `char_start`."""

    tasks: tuple[str, ...] = ("passkey",)
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 1
    seed: int = 0
    data: str = DEFAULT_EVAL_TEXT
    max_new_tokens: int = 12
    keys: int = 4
    agree_tokens: int = 128
    agree_context: int = 2048
    ppl_context: int = 4096
    char_start: int = DEFAULT_CHAR_START

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def parse_tasks(items) -> tuple[str, ...]:
    """Task names from a list of names or comma lists (`["passkey,needle", "agreement"]`), in the order of
    `TASKS`, each once; an unknown name raises RateQError naming those that exist."""
    if isinstance(items, str):
        items = [items]
    names = [t.strip().lower() for item in items for t in str(item).split(",") if t.strip()]
    if not names:
        raise RateQError(f"no task given; use one or more of {', '.join(TASKS)}")
    for name in names:
        if name not in TASKS:
            raise RateQError(f"unknown task {name!r}; use {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in names)


def context_limit(config) -> int | None:
    """The longest sequence the model was trained for (`max_position_embeddings`), None when unknown."""
    from ..models import text_config

    limit = getattr(text_config(config), "max_position_embeddings", None)
    return int(limit) if limit else None


def check_settings(settings: TaskSettings, *, limit: int | None = None, tokenizer=None) -> TaskSettings:
    """Refuse settings that cannot run, before any weights load: unknown tasks, depths outside [0, 1],
    sequences past the model's `limit`, counts below 1; with the `tokenizer`, every prompt is built once, so
    contexts too short for the template and texts too short for the haystack fail here too."""
    s = settings
    parse_tasks(list(s.tasks))
    for name, value, least in (("trials", s.trials, 1), ("max_new_tokens", s.max_new_tokens, 1),
                               ("keys", s.keys, 1), ("agree_tokens", s.agree_tokens, 1),
                               ("agree_context", s.agree_context, 1), ("ppl_context", s.ppl_context, 2),
                               ("char_start", s.char_start, 0)):
        if value < least:
            raise RateQError(f"{name.replace('_', '-')} must be at least {least}, got {value}")
    retrieval = [t for t in s.tasks if t in ("passkey", "needle")]
    if retrieval:
        if not s.contexts:
            raise RateQError("no context lengths given")
        if not s.depths:
            raise RateQError("no needle depths given")
        for d in s.depths:
            if not (isinstance(d, (int, float)) and 0.0 <= d <= 1.0):
                raise RateQError(f"a needle depth must be between 0 and 1, got {d}")
        for c in s.contexts:
            if c <= s.max_new_tokens:
                raise RateQError(f"context {c} leaves no room for a prompt before {s.max_new_tokens} answer tokens")
    if s.keys > len(NEEDLE_WORDS):
        raise RateQError(f"keys must be at most {len(NEEDLE_WORDS)}, got {s.keys}")
    if limit is not None:
        longest = []
        if retrieval:
            longest.append((max(s.contexts), f"context {max(s.contexts)}"))
        if "agreement" in s.tasks:
            longest.append((s.agree_context + s.agree_tokens, f"agreement prompts of {s.agree_context} tokens and "
                                                              f"{s.agree_tokens} generated"))
        if "decode-ppl" in s.tasks:
            longest.append((s.ppl_context, f"decode-ppl windows of {s.ppl_context} tokens"))
        for n, what in longest:
            if n > limit:
                raise RateQError(f"{what}: {n} tokens are beyond the model's limit of {limit} "
                                 "(max_position_embeddings)")
    if tokenizer is not None:
        text = load_text(s.data)
        for task in retrieval:
            for c in s.contexts:
                for t in range(s.trials):
                    if task == "passkey":
                        passkey_prompt(tokenizer, c - s.max_new_tokens, s.depths[0], s.seed + t, s.data, text=text)
                    else:
                        needle_prompt(tokenizer, c - s.max_new_tokens, s.depths[0], s.seed + t, s.data,
                                      keys=s.keys, text=text)
        if "agreement" in s.tasks:
            text_windows(tokenizer, s.data, s.trials, s.agree_context, seed=None, char_start=s.char_start)
        if "decode-ppl" in s.tasks:
            text_windows(tokenizer, s.data, s.trials, s.ppl_context, seed=None, char_start=s.char_start)
    return s


class TaskEvaluation(Evaluation):
    """One row per method (full precision first), each with its storage, policy and, per task run, its
    results; plus the settings. Index rows by position or name: `result["kivi@2.5"]["passkey"]["kept"]`."""


PLAN_FAMILIES = ("fp", "split", "profile", "kivi", "splits", "wnorm", "waterfill", "rateq")


def _cache_kinds() -> tuple[str, ...]:
    from ..engines import ENGINES

    return PLAN_FAMILIES + tuple(ENGINES)


def check_cache_name(name: str, budgets=()):
    """`rateq.evaluate.baselines.parse_name`, refusing a baseline that has no plan a `RateQCache` can hold
    (rank reduction, rank + quantization, rotations, the reference table): tasks run through the real cache."""
    from .baselines import parse_name

    parsed = parse_name(name, budgets)
    if parsed.kind not in _cache_kinds():
        raise RateQError(f"baseline {parsed.text!r} transforms keys and values outside any plan, so no RateQCache "
                         f"holds it; tasks run through the cache: use kivi, splits, KxVy, wnorm, waterfill, rateq, "
                         f"an engine's name or a profile")
    return parsed


def _make_cache(method, model, policy):
    from transformers import DynamicCache

    from ..runtime.cache import RateQCache

    if method.is_full_precision:
        return lambda: DynamicCache(config=model.config)
    return lambda: RateQCache(method.plan, model, policy=policy)


@torch.no_grad()
def run_tasks(model, tokenizer, methods, settings: TaskSettings | None = None, *, budgets=None, policy=None,
              calibration=None, curves=None, progress: Progress | None = None, **options) -> TaskEvaluation:
    """Run `settings.tasks` for full precision (a `DynamicCache`, always first) and every method, each through
    a `RateQCache` of its plan under its policy.

    - `methods`: Plans, `Method`s with a plan, baseline names (`kivi`, `kivi@2.5`, `K3V2`, `splits`, `wnorm`,
      `waterfill`, `rateq`, an engine's name) or profile paths, as `rateq.evaluate`; names without `@B` are
      built at every budget of `budgets`. Rows without a plan (rank reduction, rotations) are refused.
    - `settings` (or its fields as keywords: `tasks=("passkey", "agreement")`, `contexts=…`): see
      `TaskSettings`.
    - `policy`: the cache policy of rows without their own (profiles keep theirs); default `CachePolicy()`
      (R = 0, key block 32), each row's key block raised to a multiple of its key groups, as `rateq.evaluate`.

    Each row holds name, label, family, budget, compared_at, nominal and effective bits, the learned parameters'
    bytes and share of the model's fp16 weights (`Method.row`), policy, seconds and,
    per task: `passkey` / `needle` (`accuracy`, `kept`: the share of the prompts full precision answers that
    this row answers too, `reference_solved`, `cells`), `agreement` (mean `agreement`, `first_divergence` per
    prompt, `prompts`), `decode_ppl` (`ppl`, `nll`, `predictions`, …). `progress(done, total, message)` counts tokens
    (prompts, answers and decoded windows) over every row."""
    from ..plan import Plan
    from ..policy import CachePolicy
    from .baselines import BaselineContext, check_budget
    from .core import _resolve, matched_budget
    from .method import Method

    settings = TaskSettings(**{**(settings.__dict__ if settings is not None else {}), **options})
    settings.tasks = parse_tasks(list(settings.tasks))
    settings.contexts = tuple(int(c) for c in settings.contexts)
    settings.depths = tuple(float(d) for d in settings.depths)
    check_settings(settings, limit=context_limit(model.config))
    s = settings
    if isinstance(methods, (str, Plan, Method)):
        methods = [methods]
    budgets = [check_budget(b, "budget") for b in budgets] if budgets is not None else []
    for item in methods:
        if isinstance(item, str):
            check_cache_name(item, budgets)
    context = BaselineContext(model, tokenizer, calibration=calibration, curves=curves)
    resolved = _resolve(model, list(methods), budgets=budgets, context=context, own_policy=True)
    for m in resolved:
        if not m.is_full_precision and m.plan is None:
            raise RateQError(f"method {m.name} has no plan a RateQCache can hold; tasks run through the cache")
    compared = budgets or sorted({m.budget for m in resolved if m.budget is not None and not m.is_full_precision})
    base = CachePolicy() if policy is None else policy
    policies = {m.name: None if m.is_full_precision else m.policy_for(base) for m in resolved}
    if tokenizer is None:
        raise RateQError("tasks need the model's tokenizer")

    agree_ids = (text_windows(tokenizer, s.data, s.trials, s.agree_context, seed=None, char_start=s.char_start)
                 if "agreement" in s.tasks else None)
    ppl_ids = (text_windows(tokenizer, s.data, s.trials, s.ppl_context, seed=None, char_start=s.char_start)
               if "decode-ppl" in s.tasks else None)
    per_method = 0
    grid = sum(s.contexts) * len(s.depths) * s.trials
    per_method += grid * sum(t in s.tasks for t in ("passkey", "needle"))
    per_method += (s.agree_context + s.agree_tokens) * s.trials if agree_ids is not None else 0
    per_method += s.ppl_context * s.trials if ppl_ids is not None else 0
    total = per_method * len(resolved)
    offset = 0

    def report(name: str, base_done: int):
        def inner(done: int, _total: int, message: str) -> None:
            if progress:
                progress(base_done + done, total, f"{name} {message}")
        return inner

    reference: dict = {}
    rows = []
    n_params = count_parameters(model)
    for m in resolved:
        pol = policies[m.name]
        make = _make_cache(m, model, pol)
        row = m.row(n_params)
        row.update(compared_at=None if m.is_full_precision else matched_budget(m.effective_bits, m.budget, compared),
                   policy=None if pol is None else pol.to_dict())
        start = time.perf_counter()
        for task in ("passkey", "needle"):
            if task not in s.tasks:
                continue
            cells = run_retrieval(task, model, tokenizer, make, s.contexts, s.depths, trials=s.trials, seed=s.seed,
                                  max_new_tokens=s.max_new_tokens, haystack=s.data, keys=s.keys,
                                  progress=report(m.name, offset))
            offset += grid
            if m.is_full_precision:
                reference[task] = cells
            row[task] = {**summarize(cells, reference[task]), "cells": cells}
        if agree_ids is not None:
            prompts = []
            for i in range(agree_ids.shape[0]):
                ids = agree_ids[i:i + 1]
                t0 = time.perf_counter()
                if m.is_full_precision:
                    toks = greedy_tokens(model, ids, make(), s.agree_tokens)
                    reference.setdefault("agreement", []).append(toks)
                    got = {"agreement": 1.0, "first_divergence": None, "n_tokens": s.agree_tokens,
                           "tokens": toks.tolist()}
                else:
                    got = agreement(model, ids, make, reference["agreement"][i], s.agree_tokens)
                seconds = time.perf_counter() - t0
                offset += s.agree_context + s.agree_tokens
                if progress:
                    progress(offset, total, f"{m.name} agreement: {s.agree_context + s.agree_tokens} tokens in "
                                            f"{seconds:.1f} s")
                prompts.append({**got, "prompt_tokens": s.agree_context, "seconds": round(seconds, 2)})
            firsts = [p["first_divergence"] for p in prompts]
            row["agreement"] = {"agreement": sum(p["agreement"] for p in prompts) / len(prompts),
                                "first_divergence": firsts,
                                "min_first_divergence": min((f for f in firsts if f is not None), default=None),
                                "n_tokens": s.agree_tokens, "prompts": prompts}
        if ppl_ids is not None:
            nll, count, seconds, half = 0.0, 0, 0.0, s.ppl_context // 2
            for i in range(ppl_ids.shape[0]):
                at = offset
                t0 = time.perf_counter()

                def step(done: int, steps: int, at=at, t0=t0) -> None:
                    if progress and (done % 64 == 0 or done == steps):
                        rate = done / (time.perf_counter() - t0)
                        progress(at + half + done, total, f"{m.name} decode-ppl: {rate:.1f} decode tok/s")

                ids = ppl_ids[i:i + 1]
                out = (decode_perplexity(model, ids, make_cache=make, progress=step) if m.is_full_precision else
                       decode_perplexity(model, ids, plan=m.plan, policy=pol, progress=step))
                nll += out["nll"] * out["predictions"]
                count += out["predictions"]
                seconds += out["seconds"]
                offset += s.ppl_context
                if progress:
                    progress(offset, total, f"{m.name} decode-ppl: {out['seq_len'] - out['prefill']} tokens decoded in "
                                            f"{out['seconds']:.1f} s")
            row["decode_ppl"] = {"ppl": math.exp(nll / count), "nll": nll / count, "predictions": count,
                                 "windows": int(ppl_ids.shape[0]), "seq_len": s.ppl_context, "prefill": half,
                                 "seconds": round(seconds, 2)}
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    out_settings = {"model": getattr(model, "rateq_name", None) or getattr(model.config, "name_or_path", "model"),
                    **s.to_dict(), "budgets": compared, "policy": base.to_dict(),
                    "calibration": context.describe()}
    return TaskEvaluation(rows, out_settings, resolved)


__all__ = ["NEEDLE_WORDS", "PASSKEY_NEEDLE", "TASKS", "TaskEvaluation", "TaskSettings", "agreement", "check_passkey",
           "check_settings", "context_limit", "decode_perplexity", "greedy_tokens", "needle_prompt", "parse_tasks",
           "passkey_prompt", "run_needle", "run_passkey", "run_retrieval", "run_tasks", "summarize"]
