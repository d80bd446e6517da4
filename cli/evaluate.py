"""`rateq eval`: PPL / KL / routing flips of profiles and baselines at matched effective bits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (DataOpt, DeviceOpt, DtypeOpt, EvalBudgetsOpt, JsonOpt, ModelOpt, Output, RowsBlockOpt,
                      RowsResidualOpt, RowsSinksOpt, curves_path)
from .main import app

BASELINE_HELP = (
    "Baseline to compare with (repeatable). Built at every compared budget: kivi, splits, wnorm, waterfill, "
    "rateq, rank, hybrid, rotations, rot-hadamard (rot-identity, rot-random, rot-pca), and the best plan an "
    "engine runs from the same curves: modelopt, vllm, sglang, trtllm, llamacpp; NAME@BITS builds one at "
    "BITS. Fixed storage: KxVy[:SPEC] (e.g. K3V2, K3V2:minmax-g64-fp16), rankR, reference, a profile path; "
    "those not at a compared budget are listed apart as not matched. Default: kivi, splits, wnorm, rank, "
    "hybrid. The full-precision row (fp) is always evaluated, first.")


def _check_report_dir(report: Path) -> None:
    from rateq.errors import RateQError

    if report.exists() and not report.is_dir():
        raise RateQError(f"--report {report} is a file; give a folder for report.md, results.json and the plots")
    for parent in [report, *report.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RateQError(f"--report {report}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RateQError(f"--report {report}: {parent} is not writable")
            return


def _kept_curves(paths: list[Path]):
    """The curves kept with the first profile that has them: stored inside it, or P.curves.safetensors."""
    import rateq
    from rateq.profile import load_profile_curves

    for path in paths:
        inside = load_profile_curves(path)
        if inside is not None:
            return inside, f"{path} (stored inside)"
        beside = curves_path(path)
        if beside.is_file():
            return rateq.Curves.load(beside), str(beside)
    return None, None


@app.command("eval")
def eval_command(
    model: ModelOpt = "smollm2-135m",
    data: DataOpt = "austen-pp",
    profile: Annotated[Optional[list[Path]], typer.Option(
        "--profile", "-p", help="A profile to evaluate, under its own cache policy (repeatable).")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option("--baseline", help=BASELINE_HELP)] = None,
    budget: EvalBudgetsOpt = None,
    residual: RowsResidualOpt = None,
    block: RowsBlockOpt = None,
    sinks: RowsSinksOpt = None,
    n_windows: Annotated[int, typer.Option("--n-windows", "-n", help="Evaluation windows.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 1024,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Draw windows at random with this seed (default: consecutive).")] = None,
    char_start: Annotated[int, typer.Option("--char-start", help="Skip this many characters of the text first (as `rateq apply` does).")] = 100_000,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text for PCA bases (rank, hybrid, rot-pca) and for curves when none are at hand.")] = "austen-emma",
    curves: Annotated[Optional[Path], typer.Option("--curves", help="Curves for waterfill / rateq rows (default: those kept with the first profile, P.curves.safetensors; else calibrated on --calib).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward.")] = 1,
    no_flips: Annotated[bool, typer.Option("--no-flips", help="Skip routing flips (saves one score product per layer).")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write report.md, results.json and PNG plots into this folder.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Perplexity, KL to full precision and attention-routing flips of profiles and baselines at matched
    effective bits: full precision first, then the rows at each compared budget (--budget, default the
    profiles'), then any row at other storage under "not matched". Nominal and effective bits and the cache
    policy of every row are printed; "KIVI excess removed" is 1 − (PPL − fp) / (PPL_KIVI − fp) at the same
    budget. Everything is checked before the model's weights load."""
    import rateq
    from rateq.errors import RateQError
    from rateq.evaluate import DEFAULT_BASELINES, to_markdown, write_report
    from rateq.evaluate import baselines as bl
    from rateq.evaluate.report import describe_settings
    from rateq.policy import CachePolicy
    from rateq.profile import check_model, load_profile
    from rateq.models import check_device, load_config, load_tokenizer
    from rateq.text import load_text

    # -- everything that needs no model ------------------------------------------------------------------
    for name, value, least in (("--n-windows", n_windows, 1), ("--seq-len", seq_len, 2),
                               ("--batch-size", batch_size, 1), ("--char-start", char_start, 0)):
        if value < least:
            raise RateQError(f"{name} must be at least {least}, got {value}")
    budgets = [bl.check_budget(b, "--budget") for b in budget or []]
    overrides = {k: v for k, v in (("residual", residual), ("block", block), ("sinks", sinks)) if v is not None}
    base_policy = CachePolicy(**{"residual": 0, "block": 32, "sinks": 0, **overrides})

    names = [n for n in (baseline or [])]
    profiles = [Path(p) for p in (profile or [])] + [Path(n.strip()) for n in names if bl.is_profile_name(n)]
    names = [n for n in names if not bl.is_profile_name(n)]
    plans = [(path, load_profile(path)) for path in profiles]
    if not budgets:
        budgets = sorted({round(p.budget_bits if p.budget_bits is not None else p.effective_bits, 6)
                          for _, p in plans})
    if baseline is None:
        names = [n for n in DEFAULT_BASELINES if n != "fp"] if budgets else ["kivi@3"]
    names = [n for n in names if n.strip().lower() != "fp"]  # full precision is always evaluated, once, first
    parsed = [bl.parse_name(n, budgets) for n in names]

    text = load_text(data)
    if char_start >= len(text):
        raise RateQError(f"--char-start {char_start} is past the end of {data} ({len(text)} characters); pass a "
                         "smaller --char-start (0 reads from the start)")
    del text
    cv, cv_source = None, None
    if curves is not None:
        cv, cv_source = rateq.Curves.load(curves), str(curves)
    elif any(p.needs_curves for p in parsed):
        cv, cv_source = _kept_curves(profiles)
    if any(p.needs_calibration and not (p.needs_curves and cv is not None) for p in parsed):
        load_text(calib)  # PCA bases, or curves to calibrate: the text must exist
    if report is not None:
        _check_report_dir(report)

    check_device(device)
    config = load_config(model)
    shape = rateq.fingerprint(config, name=model)
    for path, plan in plans:
        check_model(plan, shape, source=f"profile {path}")
    if cv is not None and cv.model.mismatches(shape):
        raise RateQError(f"curves {cv_source} are for {cv.model.name} and do not fit {model}: "
                         f"{'; '.join(cv.model.mismatches(shape))} (curves vs model)")
    for name in names:
        bl.check_name(name, budgets, config=config, curves=cv)
    # enough text for the windows: tokenized with the model's tokenizer, which loads without the weights
    rateq.text_windows(load_tokenizer(model), data, n_windows, seq_len, seed=seed, char_start=char_start)

    # -- the model, then a last check of everything against it --------------------------------------------
    with Output(json_out) as sink:
        with sink.spinner(f"loading {model}"):
            lm, tok = rateq.load_model(model, dtype=dtype, device=device)
        methods: list = [bl.profile(str(path), lm, overrides=overrides) for path in profiles]
        if cv is not None and cv.model.mismatches(rateq.fingerprint(lm)):
            raise RateQError(f"curves {cv_source} are for {cv.model.name} and do not fit {model}: "
                             f"{'; '.join(cv.model.mismatches(rateq.fingerprint(lm)))} (curves vs model)")
        methods += names
        if tok is None:
            raise RateQError(f"model {model} has no tokenizer; evaluating text needs one")
        ids = rateq.text_windows(tok, data, n_windows, seq_len, seed=seed, char_start=char_start)  # enough text?

        with sink.bar("evaluating") as bar:
            task = bar.task_ids[0]

            def step(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, rate=what)

            result = rateq.evaluate(lm, ids, methods, tokenizer=tok, policy=base_policy, budgets=budgets or None,
                                    seed=seed, char_start=char_start, batch_size=batch_size, flips=not no_flips,
                                    calibration=calib, curves=cv, progress=step)
        result.settings["data"] = data
        if cv_source is not None:
            result.settings["curves"] = cv_source
        paths = write_report(result, report, curves=cv, title=f"rateq eval: {model} on {data}") if report else {}
        sink.add(result.to_dict(), report={k: str(v) for k, v in paths.items()})
        sink.line(describe_settings(result.settings, result.rows))
        sink.line("")
        sink.line(to_markdown(result))
        if paths:
            sink.line(f"report written to {report}/ ({', '.join(p.name for p in paths.values())})")
