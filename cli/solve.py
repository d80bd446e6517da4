"""`rateq solve`: re-solve stored curves at another budget, for a serving engine, or sweep the rate-distortion
frontier. No model needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (JsonOpt, KeysOpt, MaxBitsOpt, MinBitsOpt, OutOpt, Output, QuantizersOpt, SolveBudgetOpt,
                      SolveMethodOpt, check_out, parse_list, parse_sweep)
from ._views import frontier_table, print_summary
from .main import app


def parse_devices(text: str) -> list[tuple[int, int, float]]:
    """`FIRST-LAST:BITS,…` → `[(first, last, bits), …]`, or a one-line error."""
    from rateq.errors import RateQError

    out = []
    for item in text.split(","):
        try:
            layers, cap = item.split(":")
            first, last = layers.split("-")
            out.append((int(first), int(last), float(cap)))
        except ValueError:
            raise RateQError(f"--devices takes FIRST-LAST:BITS items separated by commas (e.g. 0-14:3,15-29:2.5), "
                             f"got {item!r}") from None
    return out


@app.command("solve")
def solve_command(
    curves: Annotated[Path, typer.Argument(help="Curves file (.curves.safetensors) written by `rateq calibrate`.")],
    budget: SolveBudgetOpt = None,
    out: OutOpt = None,
    method: SolveMethodOpt = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Print the frontier over budgets START:STOP:STEP (e.g. 1.5:8:0.25).")] = None,
    min_bits: MinBitsOpt = None,
    max_bits: MaxBitsOpt = None,
    keys_at_least_values: KeysOpt = False,
    quantizers: QuantizersOpt = None,
    tie: Annotated[Optional[str], typer.Option("--tie", help="layer: every KV head of a layer takes one (quantizer, bits) for K and one for V (per-layer engines); layer-kv: K and V too; model: one for every layer's K and one for every layer's V (llama.cpp).")] = None,
    devices: Annotated[Optional[str], typer.Option("--devices", help="Per-device caps for a model split across GPUs, FIRST-LAST:BITS,… (layers inclusive, effective bits per element of those layers), e.g. 0-14:3,15-29:2.5.")] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="Solve for a serving engine: modelopt, vllm, sglang, trtllm or llamacpp. Only its formats in the curves, its ties and K/V rules, so that rateq export P --format ENGINE writes the plan; --tie and --devices only where the engine keeps to them.")] = None,
    learned_tokens: Annotated[Optional[int], typer.Option("--learned-tokens", help="Charge learned parameters (codebooks, static scales) against the budget as if spread over this many cached tokens per sequence (a 2-bit codebook of 2 channels adds 256/T bits per element). Default: not charged; the plan reports their bytes beside the budget.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Solve stored curves at --budget into a profile (--out), and/or print the frontier over --sweep budgets;
    --engine keeps a serving engine's rules. Without a model: re-solving takes milliseconds to a second."""
    import rateq
    from rateq.errors import RateQError
    from rateq.plan import check_budget
    from rateq.profile import plan_summary, save_profile
    from rateq.solve import METHODS, frontier
    from rateq.solve.problem import TIES, calibration_policy

    # Everything that can be checked without the curves is checked first.
    if budget is None and sweep is None:
        raise RateQError("give --budget B (with --out P) to write a profile, or --sweep START:STOP:STEP for the frontier")
    if budget is not None and out is None:
        raise RateQError("--budget needs --out: where to write the profile (e.g. --out plan.safetensors)")
    if method is not None and method not in METHODS:
        raise RateQError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if budget is not None:
        check_budget(budget, "--budget")
    for name, v in (("--min-bits", min_bits), ("--max-bits", max_bits)):
        if v is not None and not 1 <= v <= 16:
            raise RateQError(f"{name} must be a code bit width between 1 and 16, got {v}")
    if tie is not None and tie not in TIES:
        raise RateQError(f"unknown --tie {tie!r}; use one of {', '.join(TIES)}")
    if learned_tokens is not None and learned_tokens < 1:
        raise RateQError(f"--learned-tokens must be a positive number of cached tokens, got {learned_tokens}")
    device_caps = parse_devices(devices) if devices is not None else None
    budgets = parse_sweep(sweep) if sweep is not None else None
    target = None
    if engine is not None:
        from rateq.engines import ENGINES

        if engine not in ENGINES:
            raise RateQError(f"unknown --engine {engine!r}; use one of {', '.join(ENGINES)}")
        if sweep is not None:
            raise RateQError("--engine solves at one --budget; sweep the frontier without --engine")
        target = ENGINES[engine]
        target.options(tie=tie, devices=device_caps, quantizers=parse_list(quantizers))  # agree, before any work
    check_out(out)
    if out is not None and out.resolve() == curves.resolve():
        raise RateQError("--out would overwrite the curves file; choose another name")

    with Output(json_out) as sink:
        cv = rateq.Curves.load(curves)
        policy = calibration_policy(cv)
        constraints = dict(min_bits=min_bits, max_bits=max_bits, keys_at_least_values=keys_at_least_values,
                           quantizers=parse_list(quantizers), tie=tie, devices=device_caps,
                           learned_tokens=learned_tokens)
        sink.add(curves=str(curves))
        plan = None
        if target is not None:
            from rateq.engines import solve_for

            plan = solve_for(cv, budget, target, method=method or "exact", policy=policy, **constraints)
        elif budget is not None:
            plan = rateq.solve(cv, budget, method=method or "exact", policy=policy, **constraints)
        rows = frontier(cv, budgets, method=method or "greedy", **constraints) if budgets else None
        if plan is not None:
            save_profile(plan, out)
            sink.add({"profile": str(out)}, plan_summary(plan))
        if rows is not None:
            sink.add(frontier=rows)
            sink.table(frontier_table(rows, cv.metric))
        if plan is not None:
            print_summary(sink, plan, title=f"profile written to {out}")
            if target is not None:
                sink.add(engine=target.name)
                scales = " --scales kv_scales.safetensors" if plan.params else ""  # static scales go to the checkpoint
                sink.line(f"for {target.name}: rateq export {out} --format {target.name}{scales}")
