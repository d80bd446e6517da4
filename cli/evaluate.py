"""`rateq eval`: PPL / KL / routing flips of profiles and baselines at matched effective bits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DataOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, progress
from .main import app


@app.command("eval")
def eval_command(
    model: ModelOpt = "smollm2-135m",
    data: DataOpt = "austen-pp",
    profile: Annotated[Optional[list[Path]], typer.Option("--profile", "-p", help="A profile to evaluate (repeatable).")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(
        "--baseline", "-b",
        help="Baseline name (repeatable): fp, kivi, splits, wnorm, waterfill, rateq, rank, hybrid, rotations, "
             "rot-hadamard, KxVy[:SPEC], rankR, reference; NAME@BITS fixes its budget.")] = None,
    budget: Annotated[Optional[list[float]], typer.Option(
        "--budget", help="Effective bits per element for baselines given without @BITS (repeatable); "
                         "default: the profiles' budgets.")] = None,
    residual: Annotated[int, typer.Option("--residual", "-r", help="Full-precision residual window R (0: the papers' protocol).")] = 0,
    block: Annotated[int, typer.Option("--block", help="Key block (tokens quantized together per channel).")] = 32,
    sinks: Annotated[int, typer.Option("--sinks", help="Leading tokens kept full precision.")] = 0,
    n_windows: Annotated[int, typer.Option("--n-windows", "-n", help="Evaluation windows.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 1024,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Draw windows at random with this seed (default: consecutive).")] = None,
    char_start: Annotated[int, typer.Option("--char-start", help="Skip this many characters of the text first.")] = 0,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text for PCA bases and curves.")] = "austen-emma",
    curves: Annotated[Optional[Path], typer.Option("--curves", help="Curves file for waterfill / rateq rows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward.")] = 1,
    no_flips: Annotated[bool, typer.Option("--no-flips", help="Skip routing flips (saves one score product per layer).")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write report.md, results.json and PNG plots here.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Perplexity, KL to full precision and attention-routing flips of profiles and baselines, at matched
    effective bits (nominal and effective bits printed for every row)."""
    import rateq
    from rateq.evaluate import DEFAULT_BASELINES, to_markdown, write_report
    from rateq.profile import load_profile

    methods: list = [str(p) for p in (profile or [])]
    budgets = list(budget or [])
    if not budgets and profile:
        budgets = sorted({round(load_profile(p).effective_bits, 4) for p in profile})
    names = list(baseline or [])
    if not names:
        names = ["fp"] + ([n for n in DEFAULT_BASELINES if n != "fp"] if budgets else ["kivi@3"])
    methods = names[:1] + methods + names[1:] if names and names[0] == "fp" else methods + names
    lm, tok = rateq.load_model(model, dtype=dtype, device=device)
    policy = rateq.CachePolicy(residual=residual, block=block, sinks=sinks)
    with progress(not json_out) as bar:
        task = bar.add_task("evaluating", total=None, rate="")

        def step(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, rate=what)

        result = rateq.evaluate(lm, data, methods, tokenizer=tok, policy=policy, budgets=budgets,
                                n_windows=n_windows, seq_len=seq_len, seed=seed, char_start=char_start,
                                batch_size=batch_size, flips=not no_flips, calibration=calib,
                                curves=str(curves) if curves else None, progress=step)
    paths = write_report(result, report, title=f"rateq eval: {model} on {data}") if report else {}
    if json_out:
        emit_json({**result.to_dict(), "report": {k: str(v) for k, v in paths.items()}})
        return
    console.print(to_markdown(result), markup=False, soft_wrap=True)
    if paths:
        console.print(f"report written to {report}/ ({', '.join(p.name for p in paths.values())})")
