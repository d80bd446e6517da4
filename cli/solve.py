"""`rateq solve`: re-solve stored curves at another budget, or sweep the rate-distortion frontier. No model needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import JsonOpt, OutOpt, check_out, console, emit_json
from .main import app

MethodOpt = Annotated[str, typer.Option("--method", help="exact (optimal), greedy (convex-hull, fastest) or waterfill (RateQuant's fitted-curve allocation).")]
MinBitsOpt = Annotated[Optional[int], typer.Option("--min-bits", help="No unit below this many code bits.")]
MaxBitsOpt = Annotated[Optional[int], typer.Option("--max-bits", help="No unit above this many code bits.")]
KeysOpt = Annotated[bool, typer.Option("--keys-at-least-values", help="Every KV head's keys get at least its values' bits.")]
QuantizersOpt = Annotated[Optional[str], typer.Option("--quantizers", "-q", help="Comma-separated quantizer ids to choose from (default: all in the curves).")]


def parse_sweep(text: str) -> list[float]:
    """`a:b:step` → budgets a, a+step, …, up to b inclusive."""
    from rateq.errors import RateQError

    try:
        a, b, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise RateQError(f"--sweep wants START:STOP:STEP in effective bits, e.g. 1.5:8:0.25; got {text!r}") from None
    if not all(math.isfinite(x) for x in (a, b, step)) or step <= 0 or b < a:
        raise RateQError(f"--sweep {text}: need START ≤ STOP and STEP > 0")
    n = int(math.floor((b - a) / step + 1e-9)) + 1
    if n > 10_000:
        raise RateQError(f"--sweep {text} asks for {n} budgets; use a larger step (at most 10000 budgets)")
    return [round(a + i * step, 12) for i in range(n)]


def parse_list(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def frontier_table(rows: list[dict], metric: str) -> Table:
    table = Table(title=f"rate-distortion frontier (predicted {metric})", show_edge=False)
    for name in ("budget", "predicted", "effective", "nominal", "K bits", "V bits"):
        table.add_column(name, justify="right")
    for r in rows:
        if not r["feasible"]:
            lo, hi = r["range"]
            table.add_row(f"{r['budget']:g}", f"[dim]outside {lo:.3f}..{hi:.3f}[/]", "", "", "", "")
            continue
        table.add_row(f"{r['budget']:g}", f"{r['distortion']:.6g}", f"{r['effective_bits']:.3f}",
                      f"{r['nominal_bits']:.3f}", f"{r['k_bits']:.2f}", f"{r['v_bits']:.2f}")
    return table


@app.command("solve")
def solve_command(
    curves: Annotated[Path, typer.Argument(help="Curves file (.curves.safetensors) written by `rateq calibrate`.")],
    budget: Annotated[Optional[float], typer.Option("--budget", "-b", help="Effective bits per cached element (metadata included).")] = None,
    out: OutOpt = None,
    method: Annotated[Optional[str], typer.Option("--method", help="exact (optimal; the default for --budget), greedy (convex hull, fastest; the default for --sweep) or waterfill (RateQuant's fitted-curve allocation).")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Print the frontier over budgets START:STOP:STEP (e.g. 1.5:8:0.25).")] = None,
    min_bits: MinBitsOpt = None,
    max_bits: MaxBitsOpt = None,
    keys_at_least_values: KeysOpt = False,
    quantizers: QuantizersOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Solve stored curves at --budget into a profile (--out), and/or print the frontier over --sweep budgets.
    Without a model: re-solving takes milliseconds to a second."""
    import rateq
    from rateq.errors import RateQError
    from rateq.plan import policy_from_dict
    from rateq.profile import plan_summary, save_profile
    from rateq.solve import METHODS, frontier

    from .profile_cmds import print_summary

    # Everything that can be checked without the curves is checked first.
    if budget is None and sweep is None:
        raise RateQError("give --budget B (with --out P) to write a profile, or --sweep START:STOP:STEP for the frontier")
    if budget is not None and out is None:
        raise RateQError("--budget needs --out: where to write the profile (e.g. --out plan.safetensors)")
    if method is not None and method not in METHODS:
        raise RateQError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise RateQError(f"--budget must be a positive number of effective bits per element, got {budget:g}")
    for name, v in (("--min-bits", min_bits), ("--max-bits", max_bits)):
        if v is not None and not 1 <= v <= 16:
            raise RateQError(f"{name} must be a code bit width between 1 and 16, got {v}")
    budgets = parse_sweep(sweep) if sweep is not None else None
    check_out(out)
    if out is not None and out.resolve() == curves.resolve():
        raise RateQError("--out would overwrite the curves file; choose another name")

    cv = rateq.Curves.load(curves)
    policy = policy_from_dict(cv.calibration.get("policy", {}), f"{curves}'s calibration policy")
    constraints = dict(min_bits=min_bits, max_bits=max_bits, keys_at_least_values=keys_at_least_values,
                       quantizers=parse_list(quantizers))
    result: dict = {"curves": str(curves)}
    plan = None
    if budget is not None:
        plan = rateq.solve(cv, budget, method=method or "exact", policy=policy, **constraints)
    rows = frontier(cv, budgets, method=method or "greedy", **constraints) if budgets else None
    if plan is not None:
        save_profile(plan, out)
        result.update(profile=str(out), **plan_summary(plan))
    if rows is not None:
        result["frontier"] = rows
    if json_out:
        emit_json(result)
        return
    if rows is not None:
        console.print(frontier_table(rows, cv.metric))
    if plan is not None:
        print_summary(plan, title=f"profile written to {out}")
