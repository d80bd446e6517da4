"""Running a model through `RateQCache`: generation, and perplexity measured through the real cache.

These are what `rateq apply` prints; they live here so that a Python user gets the same numbers with the same
calls. Perplexity through the cache is teacher-forced like the one-pass evaluation, but token by token:
prefill the first `prefill` tokens in one forward, then feed the rest one at a time, so every prediction is
made from what the cache really holds (packed codes, dequantized).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..errors import RateQError
from ..models import count_parameters
from ..plan import Plan, learned_facts
from ..policy import CachePolicy
from .cache import RateQCache


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def memory_summary(cache: RateQCache, dtype: torch.dtype | None = None, num_parameters: int | None = None) -> dict:
    """Bytes held by kind, against what a `DynamicCache` would hold for the same tokens — in `dtype`, the dtype
    the model runs in and so the one a DynamicCache would store (fp32 on CPU), and in fp16 — and how many
    tokens are stored quantized: keys only once a whole key block has left the residual window, so a short
    sequence holds more than a DynamicCache. Beside them, not in `nbytes`: the learned parameters' bytes and
    share of the model's fp16 weights (`rateq.plan.learned_facts`; `num_parameters` defaults to the plan's
    fingerprint's)."""
    kinds = cache.nbytes_by_kind()
    held = sum(kinds.values())
    fp16 = cache.dense_nbytes(torch.float16)
    dtype = torch.float16 if dtype is None else dtype
    dense = cache.dense_nbytes(dtype)
    positions = cache.held_positions()
    quantized = {role: max((p[role]["quantized"] for p in positions), default=0) for role in ("k", "v")}
    return {"tokens": cache.get_seq_length(), "packed": cache.packed, "nbytes": held, **{f"nbytes_{k}": v for k, v in kinds.items()},
            "fp16_dynamic_nbytes": fp16, "ratio_to_fp16": held / fp16 if fp16 else float("nan"),
            "dtype": str(dtype).replace("torch.", ""), "dynamic_nbytes": dense,
            "ratio_to_dynamic": held / dense if dense else float("nan"),
            "quantized_key_tokens": quantized["k"], "quantized_value_tokens": quantized["v"],
            **learned_facts(cache.learned_nbytes(), num_parameters or cache.plan.model.num_parameters)}


@torch.no_grad()
def generate(model, tokenizer, plan: Plan, prompt: str, *, max_new_tokens: int = 64,
             policy: CachePolicy | None = None, do_sample: bool = False, packed: bool | None = None) -> dict:
    """Generate from `prompt` with a `RateQCache` (`packed=False`: the dense decode path); return the
    text, token counts, seconds and memory held."""
    if tokenizer is None:
        raise RateQError("generating from a prompt needs a tokenizer; this model was loaded without one")
    device = _model_device(model)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    cache = RateQCache(plan, model, policy=policy, packed=packed)
    start = time.perf_counter()
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": int(new.numel()),
            "seconds": seconds, "policy": cache.policy.to_dict(),
            **memory_summary(cache, _model_dtype(model), count_parameters(model))}


@torch.no_grad()
def cache_perplexity(model, ids: torch.Tensor, plan: Plan, *, policy: CachePolicy | None = None,
                     prefill: int | None = None, progress: Callable[[int, int], None] | None = None,
                     packed: bool | None = None) -> dict:
    """Perplexity of `ids (B, T)` predicted through a `RateQCache`: one forward over the first `prefill`
    tokens (default T // 2), then one token at a time. Every one of the T - 1 next-token predictions counts.

    With the same plan, policy and prefill, `rateq.simulate_plan` computes the same numbers in one pass.
    """
    cache = RateQCache(plan, model, policy=policy, packed=packed)
    out = decode_perplexity(model, ids, cache, prefill=prefill, progress=progress)
    return {**out, "policy": cache.policy.to_dict(),
            **memory_summary(cache, _model_dtype(model), count_parameters(model))}


@torch.no_grad()
def decode_perplexity(model, ids: torch.Tensor, cache, *, prefill: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of `ids (B, T)` predicted through `cache` (any transformers cache, empty): one forward over the
    first `prefill` tokens (default T // 2), then one token at a time; `ppl`, `nll`, `predictions`, `prefill`,
    `seq_len`, `sequences`, `seconds`."""
    if ids.dim() == 1:
        ids = ids[None]
    B, T = ids.shape
    prefill = T // 2 if prefill is None else int(prefill)
    if not 1 <= prefill <= T:
        raise RateQError(f"prefill must be between 1 and the sequence length {T}, got {prefill}")
    ids = ids.to(_model_device(model))
    nll = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()

    def add(logits: torch.Tensor, targets: torch.Tensor) -> None:
        nonlocal nll
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = nll + (-logp.gather(-1, targets[..., None])).sum().double().cpu()

    out = model(ids[:, :prefill], past_key_values=cache, use_cache=True)
    if prefill > 1:
        add(out.logits[:, :-1], ids[:, 1:prefill])
    last = out.logits[:, -1]
    for t in range(prefill, T):
        add(last, ids[:, t])
        if t == T - 1:
            break
        last = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        if progress is not None:
            progress(t + 1 - prefill, T - 1 - prefill)
    seconds = time.perf_counter() - start
    count = B * (T - 1)
    mean = float(nll) / count
    return {"ppl": math.exp(mean), "nll": mean, "predictions": count, "prefill": prefill, "seq_len": T,
            "sequences": B, "seconds": seconds}


def peak_allocated(fn) -> int:
    """Peak bytes allocated on the CPU while `fn()` runs, beyond what was held before (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak
