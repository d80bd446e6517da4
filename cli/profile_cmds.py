"""`rateq export` (a profile's plan as JSON) and `rateq show` (summary and a layer × head bit map)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import JsonOpt, OutOpt, Output, check_out
from ._views import bit_map, print_summary
from .main import app


@app.command("show")
def show_command(
    profile: Annotated[Path, typer.Argument(help="Profile (.safetensors).")],
    png: Annotated[Optional[Path], typer.Option("--png", help="Also save the bit map as a heatmap image here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Summary of a profile (budget, effective and nominal bits, K vs V mean bits, per-layer means) and its
    layer × head bit map."""
    from rateq.plots import plot_plan
    from rateq.profile import load_profile, plan_summary

    check_out(png, "--png")
    with Output(json_out) as sink:
        plan = load_profile(profile)
        written = plot_plan(plan, png) if png is not None else None
        sink.add(plan_summary(plan), profile=str(profile))
        if written:
            sink.add(png=str(written))
        print_summary(sink, plan, title=f"profile {profile}")
        sink.table(bit_map(plan))
        if written:
            sink.line(f"heatmap written to {written}")


@app.command("export")
def export_command(
    profile: Annotated[Path, typer.Argument(help="Profile (.safetensors).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="Output format: json (the plan JSON: per layer, each KV head's bits and quantizer).")] = "json",
    out: OutOpt = None,
) -> None:
    """Write a profile's plan as JSON: per layer, each KV head's K and V bits and quantizer, the quantizer specs,
    budget and bits, calibration facts. To stdout unless --out is given."""
    from rateq.errors import RateQError
    from rateq.profile import load_profile, plan_to_json, write_plan_json

    if fmt != "json":
        raise RateQError(f"unknown export format {fmt!r}; use json")
    check_out(out)
    with Output(json_mode=out is None) as sink:  # to stdout, the plan JSON is the output itself
        plan = load_profile(profile)
        if out is None:
            sink.add(plan_to_json(plan))
        else:
            write_plan_json(plan, out)
            sink.line(f"plan of {profile} written to {out}")
