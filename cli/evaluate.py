"""`rateq eval`: PPL / KL / routing flips of profiles and baselines at matched effective bits; with --task,
retrieval, agreement and decode-mode perplexity through the real cache."""

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
    "hybrid. With --task: kivi. The full-precision row (fp) is always evaluated, first.")
TASK_HELP = (
    "Run tasks through the real cache instead of one-pass perplexity (repeatable or comma list): passkey (a "
    "number hidden at each depth of each context), needle (several key-value facts, one asked), agreement "
    "(greedy tokens identical to full precision's, first divergence), decode-ppl (the second half of a window "
    "decoded token by token). Rows: full precision (DynamicCache), then every profile and baseline through a "
    "RateQCache; baselines must have a plan (kivi, splits, KxVy, wnorm, waterfill, rateq, an engine).")


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


def _rows_asked(baseline, profile, budget, residual, block, sinks, default_names):
    """What the options ask for: `(budgets, policy overrides, base policy, baseline names, profile paths,
    [(path, plan)])`. Budgets default to the profiles' own; baselines to `default_names` (KIVI at 3 bits
    without a budget); full precision is always evaluated, once, first, so it is never a baseline here."""
    from rateq.evaluate import baselines as bl
    from rateq.policy import CachePolicy
    from rateq.profile import load_profile

    budgets = [bl.check_budget(b, "--budget") for b in budget or []]
    overrides = {k: v for k, v in (("residual", residual), ("block", block), ("sinks", sinks)) if v is not None}
    base_policy = CachePolicy(**{"residual": 0, "block": 32, "sinks": 0, **overrides})
    names = list(baseline or [])
    profiles = [Path(p) for p in (profile or [])] + [Path(n.strip()) for n in names if bl.is_profile_name(n)]
    names = [n for n in names if not bl.is_profile_name(n)]
    plans = [(path, load_profile(path)) for path in profiles]
    if not budgets:
        budgets = sorted({round(p.budget_bits if p.budget_bits is not None else p.effective_bits, 6)
                          for _, p in plans})
    if baseline is None:
        names = list(default_names) if budgets else ["kivi@3"]
    names = [n for n in names if n.strip().lower() != "fp"]
    return budgets, overrides, base_policy, names, profiles, plans


def _curves_for(curves, parsed, profiles):
    """`(curves, where from)`: the --curves file, else those kept with the profiles when a row needs curves."""
    import rateq

    if curves is not None:
        return rateq.Curves.load(curves), str(curves)
    if any(p.needs_curves for p in parsed):
        return _kept_curves(profiles)
    return None, None


def _check_fit(model: str, device, plans, cv, cv_source):
    """`(config, fingerprint)` of `model`, after checking the device and that every profile and the curves fit it
    (before any weights load)."""
    import rateq
    from rateq.errors import RateQError
    from rateq.models import check_device, load_config
    from rateq.profile import check_model

    check_device(device)
    config = load_config(model)
    shape = rateq.fingerprint(config, name=model)
    for path, plan in plans:
        check_model(plan, shape, source=f"profile {path}")
    if cv is not None and cv.model.mismatches(shape):
        raise RateQError(f"curves {cv_source} are for {cv.model.name} and do not fit {model}: "
                         f"{'; '.join(cv.model.mismatches(shape))} (curves vs model)")
    return config, shape


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
    seed: Annotated[Optional[int], typer.Option("--seed", help="Draw windows at random with this seed (default: consecutive); with --task, the seed of the first prompt of each cell (default 0).")] = None,
    char_start: Annotated[int, typer.Option("--char-start", help="Skip this many characters of the text first (as `rateq apply` does); with --task, where agreement prompts and decode-ppl windows start.")] = 100_000,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text for PCA bases (rank, hybrid, rot-pca) and for curves when none are at hand.")] = "mix",
    curves: Annotated[Optional[Path], typer.Option("--curves", help="Curves for waterfill / rateq rows (default: those kept with the first profile, P.curves.safetensors; else calibrated on --calib).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward.")] = 1,
    no_flips: Annotated[bool, typer.Option("--no-flips", help="Skip routing flips (saves one score product per layer).")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write report.md, results.json and PNG plots into this folder.")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help=TASK_HELP)] = None,
    contexts: Annotated[str, typer.Option("--contexts", help="With --task passkey/needle: context lengths in tokens, comma-separated (prompt and answer fit in each; at most the model's limit).")] = "1024,2048,4096,8192",
    depths: Annotated[str, typer.Option("--depths", help="With --task passkey/needle: needle depths between 0 (first) and 1 (last), comma-separated.")] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option("--trials", help="With --task: prompts per passkey/needle cell (seeds --seed, --seed + 1, …), agreement prompts and decode-ppl windows.")] = 1,
    keys: Annotated[int, typer.Option("--keys", help="With --task needle: facts hidden per prompt (one asked).")] = 4,
    agree_tokens: Annotated[int, typer.Option("--agree-tokens", help="With --task agreement: greedy tokens compared with full precision's.")] = 128,
    agree_context: Annotated[int, typer.Option("--agree-context", help="With --task agreement: tokens of text per prompt.")] = 2048,
    ppl_context: Annotated[int, typer.Option("--ppl-context", help="With --task decode-ppl: tokens per window (the second half decoded token by token).")] = 4096,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Perplexity, KL to full precision and attention-routing flips of profiles and baselines at matched
    effective bits: full precision first, then the rows at each compared budget (--budget, default the
    profiles'), then any row at other storage under "not matched". Nominal and effective bits and the cache
    policy of every row are printed; "KIVI excess removed" is 1 − (PPL − fp) / (PPL_KIVI − fp) at the same
    budget. With --task, every row runs the tasks through its real cache instead (see --task). Everything is
    checked before the model's weights load."""
    import rateq
    from rateq.errors import RateQError
    from rateq.evaluate import DEFAULT_BASELINES, to_markdown, write_report
    from rateq.evaluate import baselines as bl
    from rateq.evaluate.report import describe_settings
    from rateq.models import load_tokenizer
    from rateq.text import load_text

    if task:
        return _eval_tasks(model=model, data=data, profile=profile, baseline=baseline, budget=budget,
                           residual=residual, block=block, sinks=sinks, seed=seed, char_start=char_start, calib=calib,
                           curves=curves, report=report, device=device, dtype=dtype, json_out=json_out, task=task,
                           contexts=contexts, depths=depths, trials=trials, keys=keys, agree_tokens=agree_tokens,
                           agree_context=agree_context, ppl_context=ppl_context)

    # -- everything that needs no model ------------------------------------------------------------------
    for name, value, least in (("--n-windows", n_windows, 1), ("--seq-len", seq_len, 2),
                               ("--batch-size", batch_size, 1), ("--char-start", char_start, 0)):
        if value < least:
            raise RateQError(f"{name} must be at least {least}, got {value}")
    budgets, overrides, base_policy, names, profiles, plans = _rows_asked(
        baseline, profile, budget, residual, block, sinks, [n for n in DEFAULT_BASELINES if n != "fp"])
    parsed = [bl.parse_name(n, budgets) for n in names]

    text = load_text(data)
    if char_start >= len(text):
        raise RateQError(f"--char-start {char_start} is past the end of {data} ({len(text)} characters); pass a "
                         "smaller --char-start (0 reads from the start)")
    del text
    cv, cv_source = _curves_for(curves, parsed, profiles)
    if any(p.needs_calibration and not (p.needs_curves and cv is not None) for p in parsed):
        load_text(calib)  # PCA bases, or curves to calibrate: the text must exist
    if report is not None:
        _check_report_dir(report)
    config, shape = _check_fit(model, device, plans, cv, cv_source)
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


def _numbers(text: str, option: str, kind):
    from rateq.errors import RateQError

    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise RateQError(f"{option} is empty; give comma-separated values")
    try:
        return [kind(t) for t in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise RateQError(f"{option} wants comma-separated {what}, got {text!r}") from None


def _eval_tasks(*, model, data, profile, baseline, budget, residual, block, sinks, seed, char_start, calib, curves,
                report, device, dtype, json_out, task, contexts, depths, trials, keys, agree_tokens, agree_context,
                ppl_context) -> None:
    """`rateq eval --task …`: every check first (tasks, grid, lengths against the model's limit, every prompt
    built with the tokenizer, profiles, baselines with a plan), then the model, then the tasks."""
    import math

    import rateq
    from rateq.errors import RateQError
    from rateq.evaluate import baselines as bl
    from rateq.evaluate.task_report import describe, to_markdown, write_report
    from rateq.evaluate.tasks import TaskSettings, check_cache_name, check_settings, context_limit, parse_tasks, run_tasks
    from rateq.models import head_dim_of, load_tokenizer
    from rateq.runtime.store import check_plan
    from rateq.text import load_text

    tasks = parse_tasks(task)
    grid = [], []
    if any(t in tasks for t in ("passkey", "needle")):
        grid = _numbers(contexts, "--contexts", int), _numbers(depths, "--depths", float)
        for d in grid[1]:
            if not (math.isfinite(d) and 0.0 <= d <= 1.0):
                raise RateQError(f"--depths: a depth must be between 0 and 1, got {d:g}")
        for c in grid[0]:
            if c < 1:
                raise RateQError(f"--contexts: a context must be a positive number of tokens, got {c}")
    for name, value, least in (("--trials", trials, 1), ("--keys", keys, 1), ("--agree-tokens", agree_tokens, 1),
                               ("--agree-context", agree_context, 1), ("--ppl-context", ppl_context, 2),
                               ("--char-start", char_start, 0)):
        if value < least:
            raise RateQError(f"{name} must be at least {least}, got {value}")
    budgets, overrides, base_policy, names, profiles, plans = _rows_asked(
        baseline, profile, budget, residual, block, sinks, ["kivi"])
    parsed = [check_cache_name(n, budgets) for n in names]
    cv, cv_source = _curves_for(curves, parsed, profiles)
    if any(p.needs_curves for p in parsed) and cv is None:
        load_text(calib)
    if report is not None:
        _check_report_dir(report)
    config, shape = _check_fit(model, device, plans, cv, cv_source)
    for path, plan in plans:
        check_plan(plan, head_dim_of(config), _with_policy(plan.policy, overrides))
    for name in names:
        bl.check_name(name, budgets, config=config, curves=cv)
    settings = TaskSettings(tasks=tasks, contexts=tuple(grid[0]), depths=tuple(grid[1]), trials=trials,
                            seed=0 if seed is None else seed, data=data, keys=keys, agree_tokens=agree_tokens,
                            agree_context=agree_context, ppl_context=ppl_context, char_start=char_start)
    check_settings(settings, limit=context_limit(config), tokenizer=load_tokenizer(model))

    with Output(json_out) as sink:
        with sink.spinner(f"loading {model}"):
            lm, tok = rateq.load_model(model, dtype=dtype, device=device)
        if tok is None:
            raise RateQError(f"model {model} has no tokenizer; the tasks need one")
        methods: list = [bl.profile(str(path), lm, overrides=overrides) for path in profiles] + names
        with sink.bar("tasks (tokens)") as bar:
            bar_task = bar.task_ids[0]

            def step(done: int, total: int, what: str) -> None:
                bar.update(bar_task, completed=done, total=total, rate=what)

            result = run_tasks(lm, tok, methods, settings, budgets=budgets or None, policy=base_policy,
                               calibration=calib, curves=cv, progress=step)
        if cv_source is not None:
            result.settings["curves"] = cv_source
        paths = write_report(result, report, title=f"rateq eval --task: {model} on {data}") if report else {}
        sink.add(result.to_dict(), report={k: str(v) for k, v in paths.items()})
        sink.line(describe(result.settings))
        sink.line("")
        sink.line(to_markdown(result))
        if paths:
            sink.line(f"report written to {report}/ ({len(paths)} files: report.md, results.json, "
                      f"{len(paths) - 2} heatmaps)")


def _with_policy(policy, changes: dict):
    import dataclasses

    return dataclasses.replace(policy, **changes)
