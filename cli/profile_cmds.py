"""`rateq export` (a profile's plan as JSON, or as a serving engine's own file or flags) and `rateq show`
(summary and a layer × head bit map)."""

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
    fmt: Annotated[str, typer.Option("--format", "-f", help="Output format: json (the plan JSON: per layer, each KV head's bits and quantizer); modelopt (ModelOpt's hf_quant_config.json with per-layer KV formats); vllm or sglang (launch flags); trtllm (extra_llm_api_options YAML with kv_cache_config.dtype); llamacpp (--cache-type-k / --cache-type-v flags). A plan the engine cannot run is refused, naming the layer and the rule.")] = "json",
    out: OutOpt = None,
    scales: Annotated[Optional[Path], typer.Option("--scales", help="With an engine --format: also write the plan's calibrated static scales (fp8_tensor, fp8_head) as checkpoint tensors (safetensors: model.layers.<i>.self_attn.k_proj.k_scale / v_proj.v_scale, or self_attn.k_scale / v_scale for vllm) to add to the model's checkpoint. Required when the plan has such scales.")] = None,
) -> None:
    """Write a profile's plan as JSON (per layer, each KV head's K and V bits and quantizer, the quantizer specs,
    budget and bits, calibration facts), or as a serving engine's own file or flags. To stdout unless --out is
    given."""
    from rateq.engines import ENGINES, EXPORT_FORMATS, scale_tensors, write_engine_file, write_scales
    from rateq.errors import RateQError
    from rateq.profile import load_profile, plan_to_json, write_plan_json

    if fmt not in EXPORT_FORMATS:
        raise RateQError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    check_out(out)
    if scales is not None:
        if fmt == "json":
            raise RateQError("--scales goes with an engine --format (the plan JSON holds the scales itself)")
        check_out(scales, "--scales")
    if fmt != "json":
        with Output() as sink:
            plan = load_profile(profile)
            if scale_tensors(plan, fmt) and scales is None:  # checked before anything is written
                raise RateQError(f"the plan's {', '.join(q.id for q in plan.quantizers if q.static_scale)} scales "
                                 f"must go into the checkpoint for {fmt}: add --scales PATH")
            if scales is not None:
                write_scales(plan, fmt, scales)
            if out is None:
                sink.write(ENGINES[fmt].write(plan))  # the engine's text is the output itself
            else:
                write_engine_file(plan, fmt, out)
                sink.line(f"plan of {profile} written to {out} for {fmt}")
        return
    with Output(json_mode=out is None) as sink:  # to stdout, the plan JSON is the output itself
        plan = load_profile(profile)
        if out is None:
            sink.add(plan_to_json(plan))
        else:
            write_plan_json(plan, out)
            sink.line(f"plan of {profile} written to {out}")
