"""What every command shares: the output sink (human or --json), option aliases, and progress bars."""

from __future__ import annotations

import json
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


def emit_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr (so --json stdout stays clean); disabled when not wanted."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not enabled, transient=False,
    )
