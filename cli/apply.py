"""`rateq apply`: run a profile's model through `RateQCache` — generate from a prompt, or measure perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DeviceOpt, DtypeOpt, JsonOpt, console, emit_json, progress
from .main import app


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


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
    residual: Annotated[Optional[int], typer.Option("--residual", "-r", help="Full-precision residual window (default: the profile's policy).")] = None,
    block: Annotated[Optional[int], typer.Option("--block", help="Key block size (default: the profile's policy).")] = None,
    sinks: Annotated[Optional[int], typer.Option("--sinks", help="Leading tokens kept in full precision (default: the profile's policy).")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Run the model through a cache that holds each KV head packed at its planned bits: generate from
    --prompt, or measure perplexity on --data (prefill, then token by token). Prints bytes held against an
    fp16 DynamicCache holding the same tokens."""
    import dataclasses

    import rateq
    from rateq.errors import RateQError
    from rateq.profile import load_profile
    from rateq.runtime.run import cache_perplexity, generate

    if (prompt is None) == (data is None):
        raise RateQError("give exactly one of --prompt (generate) or --data (perplexity through the cache)")
    plan = load_profile(profile)
    name = model or plan.model.name
    lm, tok = rateq.load_model(name, dtype=dtype, device=device)
    plan = load_profile(profile, model=lm)  # refuses a model of another shape, naming each difference
    changes = {k: v for k, v in (("residual", residual), ("block", block), ("sinks", sinks)) if v is not None}
    policy = dataclasses.replace(plan.policy, **changes)
    head = {"profile": str(profile), "model": name, "effective_bits": plan.effective_bits,
            "nominal_bits": plan.nominal_bits}

    if prompt is not None:
        with progress(not json_out) as bar:
            bar.add_task("generating", total=None, rate="")
            result = generate(lm, tok, plan, prompt, max_new_tokens=max_new_tokens, policy=policy)
    else:
        if tok is None:
            raise RateQError(f"model {name} has no tokenizer; --data needs one")
        ids = rateq.text_windows(tok, data, n_windows, seq_len, seed=None, char_start=char_start)
        with progress(not json_out) as bar:
            task = bar.add_task("decoding", total=None, rate="")

            def step(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, rate="")

            result = cache_perplexity(lm, ids, plan, policy=policy, prefill=prefill, progress=step)
        result["data"] = data
    result = {**head, **result}
    if json_out:
        emit_json(result)
        return
    console.print(f"{name}: {plan.effective_bits:.3f} effective bits ({plan.nominal_bits:.3f} nominal), "
                  f"policy {policy.to_dict()}", markup=False)
    if prompt is not None:
        console.print(f"{prompt}{result['text']}", markup=False, soft_wrap=True)
        console.print(f"{result['new_tokens']} new tokens in {result['seconds']:.1f} s", markup=False)
    else:
        console.print(f"perplexity through RateQCache: {result['ppl']:.3f} on {result['predictions']} predictions "
                      f"({result['sequences']} × {result['seq_len']} tokens of {data}, prefill {result['prefill']}, "
                      f"{result['seconds']:.1f} s)", markup=False)
    console.print(
        f"cache holds {_mib(result['nbytes'])} for {result['tokens']} tokens "
        f"(codes {_mib(result['nbytes_codes'])}, metadata {_mib(result['nbytes_metadata'])}, "
        f"full precision {_mib(result['nbytes_full_precision'])}); an fp16 DynamicCache would hold "
        f"{_mib(result['fp16_dynamic_nbytes'])}: {result['ratio_to_fp16']:.3f}×", markup=False)
