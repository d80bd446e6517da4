"""`rateq calibrate`: measure a model's distortion curves, keep them, solve at a budget, write the profile."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._common import (BlockOpt, BudgetOpt, CandidatesOpt, DataOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, KeysOpt,
                      MaxBitsOpt, MaxMemoryOpt, MethodOpt, MinBitsOpt, ModelOpt, OffloadFolderOpt, OutOpt, Output,
                      ResidualOpt, RevisionOpt, SinksOpt, ThreadsOpt, TrustRemoteCodeOpt, check_out,
                      check_placement_options, check_policy_options, curves_path, default_out, hub_options, parse_list,
                      parse_specs, use_threads)
from ._views import print_summary
from .main import app


def _parse_bits(text: str) -> tuple[int, ...]:
    from rateq.calibrate import check_bits
    from rateq.errors import RateQError

    try:
        widths = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise RateQError(f"--bits wants comma-separated integers such as 1,2,3,4,5,6,8; got {text!r}") from None
    if not widths:
        raise RateQError("--bits is empty; give code bit widths such as 1,2,3,4,5,6,8")
    try:
        return check_bits(widths)
    except RateQError as exc:
        raise RateQError(f"--bits {text}: {exc}") from None


def check_quantizers_fit(specs, config, policy, model: str) -> None:
    """Refuse quantizers that can never run on this model, from its config, before any weight loads."""
    from rateq.calibrate import check_quantizers
    from rateq.models import head_dim_of

    check_quantizers(specs, policy, head_dim_of(config), model=model)


@app.command("calibrate")
def calibrate_command(
    budget: BudgetOpt,
    model: ModelOpt = "smollm2-135m",
    data: DataOpt = "mix",
    out: OutOpt = None,
    method: MethodOpt = "exact",
    metric: Annotated[Optional[str], typer.Option("--metric", help="mse, score, output or fisher (default: the library's, chosen by measured rank correlation with ΔNLL).")] = None,
    n_samples: Annotated[Optional[int], typer.Option("--n-samples", "-n", help="Calibration sequences (default 4) on the CPU; 16 on a GPU.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence (default 1024) on the CPU; 2048 on a GPU.")] = None,
    bits: Annotated[str, typer.Option("--bits", help="Candidate code bit widths, comma-separated.")] = "1,2,3,4,5,6,8",
    quantizers: CandidatesOpt = "default",
    min_bits: MinBitsOpt = None,
    max_bits: MaxBitsOpt = None,
    keys_at_least_values: KeysOpt = False,
    engine: Annotated[Optional[str], typer.Option("--engine", help="modelopt, vllm, sglang, trtllm or llamacpp: add that engine's KV formats (and their widths) to the candidates and solve the profile under its rules, ready for `rateq export --format ENGINE`; the kept curves re-solve freely.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward. One 2048-token sequence already fills a GPU's matrix units on a 7B+ model, and the fisher backward keeps every layer's activations of the batch: raise it for small models on large GPUs.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration windows.")] = 0,
    query_stride: Annotated[Optional[int], typer.Option("--query-stride", help="Score candidates on every N-th query row (sums scaled by N: an unbiased estimate at 1/N of the scoring cost; default 4). 1 scores every row.")] = None,
    residual: ResidualOpt = 0,
    block: BlockOpt = None,
    sinks: SinksOpt = 0,
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Calibrate MODEL on DATA (defaults: the bundled smollm2-135m and `mix`: a novel, scripture, technical prose and
    code), keep the curves beside the profile
    (P.curves.safetensors), solve at --budget, write the profile (default ./<model>-b<budget>.safetensors) and
    print its summary. Re-solve the kept curves at other budgets with `rateq solve`. Below 2.5 bits the default
    candidates include learned codebooks (no per-token metadata: what keeps 2 bits usable), fitted first on as many
    held-out windows; that takes about 4x as long on a CPU."""
    import rateq
    from rateq.calibrate import METRICS, calibration_ids, default_quantizers, default_windows
    from rateq.errors import RateQError
    from rateq.memory import format_bytes
    from rateq.models import compute_device, load_config, load_tokenizer, resolve_dtype
    from rateq.policy import CachePolicy
    from rateq.profile import plan_summary, save_profile
    from rateq.solve import METHODS
    from rateq.solve.problem import check_feasible_budget

    # Everything that can be checked from the arguments, the files and the model's config is checked before
    # the weights load: first what needs no model at all.
    if method not in METHODS:
        raise RateQError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if metric is not None and metric not in METRICS:
        raise RateQError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    for name, v in (("--n-samples", n_samples), ("--seq-len", seq_len), ("--batch-size", batch_size),
                    ("--query-stride", query_stride)):
        if v is not None and v < 1:
            raise RateQError(f"{name} must be at least 1, got {v}")
    widths = _parse_bits(bits)
    names = parse_list(quantizers) or []
    # 'default' follows the budget: learned codebooks join below 2.5 bits (not for an engine, which cannot run them)
    default = default_quantizers(None if engine is not None else budget)
    specs = parse_specs(list(dict.fromkeys(x for q in names for x in (default if q == "default" else [q]))))
    if not specs:
        raise RateQError("--quantizers is empty; give at least one id such as minmax-g32-fp16")
    check_policy_options(residual, block, sinks)
    eng = None
    if engine is not None:
        from rateq.engines import get_engine

        eng = get_engine(engine)
        if residual or sinks:
            raise RateQError(f"{eng.name} quantizes every cached token: calibrate for it with --residual 0 and "
                             "--sinks 0 (the defaults)")
        engine_specs = parse_specs(list(eng.formats))
        specs += [q for q in engine_specs if q not in specs]
        widths = tuple(sorted(set(widths) | {q.fixed_bits for q in engine_specs}))
        check_feasible_budget(budget, engine_specs, widths, allow_fp16=eng.allow_fp16, what="--budget")
    policy = CachePolicy.for_quantizers(specs, residual=residual, block=block, sinks=sinks)
    check_feasible_budget(budget, specs, widths, min_bits=min_bits, max_bits=max_bits, what="--budget")
    out = out if out is not None else default_out(model, budget)
    cpath = curves_path(out)
    check_out(out)
    check_out(cpath, "the curves file")
    placement = check_placement_options(device, device_map, max_memory, offload_folder)
    computes_on = compute_device(device, placement.get("device_map"))
    resolve_dtype(dtype, computes_on)
    hub = hub_options(revision, trust_remote_code)
    use_threads(threads)
    # Then what needs the model's config and tokenizer (fast; no weights).
    config = load_config(model, **hub)
    check_quantizers_fit(specs, config, policy, model)
    tok = load_tokenizer(model, **hub)
    n_default, t_default = default_windows(computes_on)  # 16 × 2048 on a GPU, 4 × 1024 on the CPU
    n_samples, seq_len = n_samples or n_default, seq_len or t_default
    calibration_ids(tok, data, n_samples, seq_len, seed)  # the windows calibration will cut: enough text?

    with Output(json_out) as sink:
        with sink.bar(f"loading {model}"):
            lm, tok = rateq.load_model(model, dtype=dtype, device=device, tokenizer=tok, **placement, **hub)
        kw = {} if metric is None else {"metric": metric}
        with sink.calibration() as report:
            # The text itself, not its windows: learned candidates are fitted on windows held out from those
            curves = rateq.calibrate(lm, tok, data, n_samples=n_samples, seq_len=seq_len, bits=widths,
                                     quantizers=specs, batch_size=batch_size, seed=seed, policy=policy,
                                     progress=report, query_stride=query_stride, **kw)
        curves.save(cpath)  # first: the expensive part is kept even if solving is interrupted
        if eng is None:
            plan = rateq.solve(curves, budget, method=method, min_bits=min_bits, max_bits=max_bits,
                               keys_at_least_values=keys_at_least_values, policy=policy)
        else:
            from rateq.engines import solve_for

            plan = solve_for(curves, budget, eng, method=method, min_bits=min_bits, max_bits=max_bits,
                             keys_at_least_values=keys_at_least_values or None, policy=policy)
        save_profile(plan, out)

        cal = curves.calibration
        peak = cal.get("peak_bytes") or {}
        learned = cal.get("learned") or {}
        seconds = cal.get("seconds", float("nan")) + learned.get("seconds", 0.0)  # learning included
        sink.add({"profile": str(out), "curves": str(cpath)}, plan_summary(plan),
                 {"seconds": round(seconds, 3), "peak_bytes": peak})
        memory = ", ".join(f"{d} {format_bytes(b)}" for d, b in peak.items())
        fitted = (f" (of which {learned['seconds']:.1f} s learning {', '.join(learned['quantizers'])} on "
                  f"{learned['tokens']} tokens, {learned['windows']})" if "seconds" in learned else "")
        sink.line(f"calibrated {cal.get('tokens')} tokens of {cal.get('data')} ({curves.metric}) in {seconds:.1f} s"
                  + fitted + (f", peak memory {memory}" if memory else "") + f"; curves kept in {cpath}")
        print_summary(sink, plan, title=f"profile written to {out}")
