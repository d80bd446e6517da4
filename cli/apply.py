"""`rateq apply`: run a profile's model through `RateQCache` — generate from a prompt, or measure perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (DeviceOpt, DtypeOpt, JsonOpt, Output, ProfileBlockOpt, ProfileResidualOpt, ProfileSinksOpt,
                      ThreadsOpt, check_policy_options, use_threads)
from .main import app


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _check_fits_runtime(plan, config, policy) -> None:
    """What RateQCache refuses (quantizers it cannot hold, a key block that does not fit a key quantizer's
    group: `CachePolicy.check_key_group`), checked from the config before the weights load."""
    from rateq.models import head_dim_of
    from rateq.runtime.store import check_plan

    check_plan(plan, head_dim_of(config), policy)


def unquantized_note(result: dict) -> str | None:
    """Why a short run holds more than a DynamicCache: keys are quantized a whole key block at a time."""
    policy = result["policy"]
    if result["quantized_key_tokens"]:
        return None
    window = f" beyond the {policy['residual']}-token residual window" if policy["residual"] else ""
    sinks = f" (after {policy['sinks']} sink tokens)" if policy["sinks"] else ""
    what = "nothing quantized yet" if not result["quantized_value_tokens"] else "no key quantized yet"
    dense, fp16 = result["ratio_to_dynamic"], result["ratio_to_fp16"]
    more = ""
    if dense > 1 + 1e-9:
        more = f", which is why the cache holds more than a {result['dtype']} DynamicCache"
    elif dense >= 1 - 1e-9:
        more = f", which is why the cache holds as much as a {result['dtype']} DynamicCache"
    elif fp16 > 1:
        more = ", which is why the cache holds more than an fp16 DynamicCache"
    return (f"{what}: keys stay full precision ({result['dtype']}) until a whole key block of {policy['block']} "
            f"tokens{sinks} has filled{window}, and only {result['tokens']} tokens are cached{more}")


@app.command("apply")
def apply_command(
    profile: Annotated[Path, typer.Argument(help="Profile (.safetensors) written by `rateq calibrate` or `rateq solve`.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to run instead of the one the profile names (a local copy, say); it must have the profile's shape.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Generate a continuation of this text.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Measure perplexity on this text through the real cache (austen-pp, a .txt/.jsonl file, …).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate with --prompt.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence with --data.")] = 512,
    n_windows: Annotated[int, typer.Option("--n-windows", "-n", help="Sequences with --data (decoded as one batch).")] = 1,
    prefill: Annotated[Optional[int], typer.Option("--prefill", help="With --data: tokens written in one forward before decoding the rest one by one (default: half).")] = None,
    char_start: Annotated[int, typer.Option("--char-start", help="With --data: skip this many characters first.")] = 100_000,
    packed: Annotated[bool, typer.Option("--packed/--dense", help="--packed (default): decode steps attend straight from the packed codes (native kernels on CPU), allocating a few percent of a layer's history; --dense hands the dequantized history to the model's own attention.")] = True,
    residual: ProfileResidualOpt = None,
    block: ProfileBlockOpt = None,
    sinks: ProfileSinksOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the model through a cache that holds each KV head packed at its planned bits: generate from
    --prompt, or measure perplexity on --data (prefill, then token by token). Prints bytes held against a
    DynamicCache holding the same tokens in the model's dtype (fp32 on CPU) and in fp16, and beside them the
    learned parameters (codebooks, static scales) with their share of the model's fp16 weights. Keys are
    quantized a whole key block at a time: until the first block fills (a short prompt), nothing of them is."""
    import dataclasses

    import rateq
    from rateq.errors import RateQError
    from rateq.models import check_device, fingerprint, load_config, load_tokenizer, resolve_dtype
    from rateq.plan import learned_text
    from rateq.profile import load_profile
    from rateq.runtime.run import cache_perplexity, generate

    # Everything that can be checked from the arguments, the profile and the model's config is checked before
    # the weights load.
    if (prompt is None) == (data is None):
        raise RateQError("give exactly one of --prompt (generate) or --data (perplexity through the cache)")
    if prompt is not None and not prompt.strip():
        raise RateQError("--prompt is empty; give some text to continue")
    for opt, v, least in (("--max-new-tokens", max_new_tokens, 1), ("--seq-len", seq_len, 2),
                          ("--n-windows", n_windows, 1), ("--char-start", char_start, 0)):
        if v < least:
            raise RateQError(f"{opt} must be at least {least}, got {v}")
    if prefill is not None and not 1 <= prefill <= seq_len:
        raise RateQError(f"--prefill must be between 1 and --seq-len {seq_len}, got {prefill}")
    check_policy_options(residual, block, sinks)
    check_device(device)
    resolve_dtype(dtype, device)
    use_threads(threads)
    plan = load_profile(profile)
    name = model or plan.model.name
    changes = {k: v for k, v in (("residual", residual), ("block", block), ("sinks", sinks)) if v is not None}
    policy = dataclasses.replace(plan.policy, **changes)
    try:
        config = load_config(name)  # fast: an unknown or unreachable model fails here
    except RateQError as exc:
        if model is not None:
            raise
        raise RateQError(f"{exc}. The profile names this model: give --model to run a local copy of it") from None
    plan = load_profile(profile, model=fingerprint(config, name=name))  # names each difference of shape
    _check_fits_runtime(plan, config, policy)
    tok = load_tokenizer(name)
    ids = None
    if data is not None:
        ids = rateq.text_windows(tok, data, n_windows, seq_len, seed=None, char_start=char_start)

    with Output(json_out) as sink:
        with sink.bar(f"loading {name}"):
            lm, tok = rateq.load_model(name, dtype=dtype, device=device, tokenizer=tok)
        plan = load_profile(profile, model=lm)  # refuses a model of another shape, naming each difference
        head = {"profile": str(profile), "model": name, "effective_bits": plan.effective_bits,
                "nominal_bits": plan.nominal_bits}

        if prompt is not None:
            with sink.bar("generating"):
                result = generate(lm, tok, plan, prompt, max_new_tokens=max_new_tokens, policy=policy, packed=packed)
        else:
            with sink.bar("decoding") as bar:
                task = bar.task_ids[0]

                def step(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                result = cache_perplexity(lm, ids, plan, policy=policy, prefill=prefill, progress=step, packed=packed)
            result["data"] = data
        result = {**head, **result}
        note = unquantized_note(result)
        sink.add(result)
        if note:
            sink.add(note=note)
        sink.line(f"{name}: {plan.effective_bits:.3f} effective bits ({plan.nominal_bits:.3f} nominal), "
                  f"policy {policy.to_dict()}")
        if prompt is not None:
            sink.line(f"{prompt}{result['text']}")
            sink.line(f"{result['new_tokens']} new tokens in {result['seconds']:.1f} s")
        else:
            sink.line(f"perplexity through RateQCache: {result['ppl']:.3f} on {result['predictions']} predictions "
                      f"({result['sequences']} × {result['seq_len']} tokens of {data}, prefill {result['prefill']}, "
                      f"{result['seconds']:.1f} s)")
        dense = (f"a {result['dtype']} DynamicCache (the model's dtype) would hold {_mib(result['dynamic_nbytes'])}: "
                 f"{result['ratio_to_dynamic']:.3f}×; " if result["dtype"] != "float16" else "")
        sink.line(f"cache holds {_mib(result['nbytes'])} for {result['tokens']} tokens "
                  f"(codes {_mib(result['nbytes_codes'])}, metadata {_mib(result['nbytes_metadata'])}, "
                  f"full precision {_mib(result['nbytes_full_precision'])}); {dense}an fp16 DynamicCache would hold "
                  f"{_mib(result['fp16_dynamic_nbytes'])}: {result['ratio_to_fp16']:.3f}×")
        if result["learned_bytes"]:
            sink.line(f"learned parameters (codebooks, static scales): "
                      f"{learned_text(result['learned_bytes'], result['learned_share'])}; held once per model, "
                      "beside the cache's bytes above")
        if note:
            sink.line(f"note: {note}")
