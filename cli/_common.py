"""What every command shares: the output sink (human or --json), option aliases, progress bars, the checks
every command runs on its output paths, and the number of CPU threads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

# Shared options, so that every command spells them the same way.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model alias (smollm2-135m, qwen3-8b, …), hub id or local folder.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="Text: austen-emma, austen-pp, jargon, a .txt/.jsonl file, wikitext2, or hf:NAME\\[/CONFIG]:SPLIT\\[:FIELD].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the result.")]
THREADS_HELP = ("CPU threads for torch (env RATEQ_THREADS; default and maximum: the cores this process may use). "
                "Two rateq processes on the same cores slow each other down far more than twofold: give each its "
                "share, e.g. --threads 1 each on two cores.")
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", envvar="RATEQ_THREADS", show_envvar=False,
                                                   help=THREADS_HELP)]


def allowed_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which taskset and cgroups narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks on this platform
        return max(1, os.cpu_count() or 1)


def use_threads(n: Optional[int] = None) -> int:
    """Run torch with `n` threads (default: torch's own count), never more than `allowed_cores()`; returns the
    count in use. Inter-op threads follow where torch still allows it (before its first parallel work)."""
    import torch
    from rateq.errors import RateQError

    if n is not None and n < 1:
        raise RateQError(f"--threads must be at least 1, got {n}")
    want = min(torch.get_num_threads() if n is None else n, allowed_cores())
    torch.set_num_threads(want)
    if torch.get_num_interop_threads() > want:
        try:
            torch.set_num_interop_threads(want)
        except RuntimeError:  # torch fixes them at its first inter-op parallel work: then they stay
            pass
    return want


def check_policy_options(residual: Optional[int], block: Optional[int], sinks: Optional[int]) -> None:
    """The runtime policy's options, named as the user typed them."""
    from rateq.errors import RateQError

    for name, v, least in (("--residual", residual, 0), ("--sinks", sinks, 0), ("--block", block, 1)):
        if v is not None and v < least:
            raise RateQError(f"{name} must be at least {least}, got {v}")


def parse_specs(ids) -> list:
    """Quantizer ids → QuantSpecs, each error naming the id it is about."""
    from rateq.errors import RateQError
    from rateq.quant.spec import parse_spec

    specs = []
    for q in ids:
        try:
            specs.append(parse_spec(q))
        except RateQError as exc:
            raise RateQError(f"--quantizers {q}: {exc}") from None
        except ValueError:  # a JSON spec that does not parse
            raise RateQError(f"--quantizers {q}: not a quantizer id or JSON spec") from None
    return specs


def check_out(out: Optional[Path], what: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written (see `rateq.io.check_writable`)."""
    from rateq.io import check_writable

    if out is not None:
        check_writable(out, what)


def emit_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr (so --json stdout stays clean); disabled when not wanted."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not enabled, transient=False,
    )
