"""`rateq export` (a profile's plan as JSON) and `rateq show` (summary and a layer × head bit map)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import JsonOpt, OutOpt, check_out, console, emit_json
from .main import app

# Cell colours by code bits: the fewer bits, the hotter.
_BIT_STYLE = {1: "bold red", 2: "red", 3: "yellow", 4: "green", 5: "cyan", 6: "blue", 7: "blue", 8: "magenta",
              16: "white"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def print_summary(plan, *, title: str | None = None) -> None:
    """The short summary every command that makes or reads a plan prints."""
    from rateq.profile import plan_summary

    s = plan_summary(plan)
    budget = "none (hand-made)" if s["budget_bits"] is None else f"{s['budget_bits']:g}"
    if title:
        console.print(title, markup=False, soft_wrap=True)
    console.print(f"model {plan.model.name} ({plan.model.architecture}, {plan.num_layers} layers × "
                  f"{plan.num_kv_heads} KV heads, head_dim {plan.model.head_dim})", markup=False, soft_wrap=True)
    console.print(f"budget {budget} effective bits per element → plan {s['effective_bits']:.4f} effective, "
                  f"{s['nominal_bits']:.4f} nominal; K {s['k_bits']:.2f} / V {s['v_bits']:.2f} mean code bits",
                  markup=False, soft_wrap=True)
    solver = s["solver"]
    if solver:
        facts = [f"method {solver.get('method')}"]
        if "predicted_distortion" in solver:
            facts.append(f"predicted {solver.get('metric', 'distortion')} {solver['predicted_distortion']:.6g}")
        if solver.get("gap") is not None:
            facts.append(f"gap {solver['gap']:.3g}")
        if "seconds" in solver:
            facts.append(f"{solver['seconds'] * 1e3:.1f} ms")
        console.print("solver: " + ", ".join(facts), markup=False, soft_wrap=True)
    if len(s["quantizers"]) > 1 or plan.quantizers[0].id != "minmax-g32-fp16":
        console.print("quantizers: " + "; ".join(f"{q} (K {n['k']}, V {n['v']} heads)"
                                                 for q, n in s["quantizers"].items()), markup=False, soft_wrap=True)


def bit_map(plan) -> Table:
    """Layer × head table of `K/V` code bits, with per-layer means; letters mark quantizers when several."""
    many = len(plan.quantizers) > 1
    table = Table(title="code bits per KV head (K/V)", show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("K mean", justify="right")
    table.add_column("V mean", justify="right")
    for h in range(plan.num_kv_heads):
        table.add_column(f"h{h}", justify="center")

    def cell(role, l, h):
        b = int(plan.bits(role)[l, h])
        tag = _LETTERS[int(plan.quantizer_ids(role)[l, h]) % 26] if many else ""
        return f"[{_BIT_STYLE.get(b, 'white')}]{b}{tag}[/]"

    for l in range(plan.num_layers):
        table.add_row(str(l), f"{plan.k_bits[l].double().mean():.2f}", f"{plan.v_bits[l].double().mean():.2f}",
                      *[f"{cell('k', l, h)}/{cell('v', l, h)}" for h in range(plan.num_kv_heads)])
    if many:
        table.caption = "  ".join(f"{_LETTERS[i % 26]} = {q.id}" for i, q in enumerate(plan.quantizers))
    return table


@app.command("show")
def show_command(
    profile: Annotated[Path, typer.Argument(help="Profile (.safetensors).")],
    png: Annotated[Optional[Path], typer.Option("--png", help="Also save the bit map as a heatmap image here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Summary of a profile (budget, effective and nominal bits, K vs V mean bits, per-layer means) and its
    layer × head bit map."""
    from rateq.profile import load_profile, plan_summary, plot_plan

    check_out(png, "--png")
    plan = load_profile(profile)
    written = plot_plan(plan, png) if png is not None else None
    if json_out:
        emit_json({**plan_summary(plan), "profile": str(profile), **({"png": str(written)} if written else {})})
        return
    print_summary(plan, title=f"profile {profile}")
    console.print(bit_map(plan))
    if written:
        console.print(f"heatmap written to {written}", markup=False, soft_wrap=True)


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
    plan = load_profile(profile)
    if out is None:
        emit_json(plan_to_json(plan))
        return
    write_plan_json(plan, out)
    console.print(f"plan of {profile} written to {out}", markup=False, soft_wrap=True)

