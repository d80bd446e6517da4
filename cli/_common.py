"""What every command shares: the output sink (human text or --json), the option aliases, progress bars, the
checks every command runs on its options and output paths, the parsing of list options, where files go by
default, and the number of CPU threads. Command modules import from here (and `cli._views`), never from
each other."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


# -- options: every command spells them the same way -----------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model alias (smollm2-135m, qwen3-8b, …), hub id or local folder.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="Text: austen-emma, austen-pp, jargon, kjv, python-docs, python-code, mix (the first and the last three, windows from each in turn), a .txt/.jsonl file, wikitext2, or hf:NAME\\[/CONFIG]:SPLIT\\[:FIELD].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the result.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option("--device-map", help=(
    "Spread a model too large for one device over several, through accelerate, instead of --device: auto (the "
    "GPUs, then the CPU, then disk), balanced, balanced_low_0, sequential, or a JSON file mapping module names "
    "to devices (0, cuda:1, cpu, disk)."))]
MaxMemoryOpt = Annotated[Optional[str], typer.Option("--max-memory", help=(
    "With --device-map: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB (B, KB, MB, GB, KiB, "
    "MiB, GiB)."))]
OffloadFolderOpt = Annotated[Optional[Path], typer.Option("--offload-folder", help=(
    "With --device-map: where weights offloaded to disk go (default: a temporary folder under the rateq "
    "cache, removed afterwards)."))]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help=(
    "Branch, tag or commit of a hub model (default: its main branch). Gated models read HF_TOKEN or the "
    "huggingface-cli login."))]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help=(
    "Run Python code from the model's hub repository (architectures transformers does not ship); off unless "
    "given."))]
THREADS_HELP = ("CPU threads for torch (env RATEQ_THREADS; default and maximum: the cores this process may use). "
                "Two rateq processes on the same cores slow each other down far more than twofold: give each its "
                "share, e.g. --threads 1 each on two cores.")
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", envvar="RATEQ_THREADS", show_envvar=False,
                                                   help=THREADS_HELP)]

# The solver's options: `calibrate` solves once with them, `solve` re-solves kept curves.
_BUDGET = ("--budget", "-b")
BudgetOpt = Annotated[float, typer.Option(*_BUDGET, help="Effective bits per cached element (metadata included) to solve for.")]
SolveBudgetOpt = Annotated[Optional[float], typer.Option(*_BUDGET, help="Effective bits per cached element (metadata included).")]
EVAL_BUDGET_HELP = (
    "Compared budget in effective bits per element, metadata included (repeatable): baselines without @BITS "
    "are built at each, and rows at another storage are reported apart as not matched. "
    "Default: the profiles' budgets.")
EvalBudgetsOpt = Annotated[Optional[list[float]], typer.Option(*_BUDGET, help=EVAL_BUDGET_HELP)]
MethodOpt = Annotated[str, typer.Option("--method", help="exact (optimal), greedy (convex-hull, fastest), waterfill (RateQuant's fitted-curve allocation) or convex (cvxpy: LP bound, then an integer solve).")]
SolveMethodOpt = Annotated[Optional[str], typer.Option("--method", help="exact (optimal; the default for --budget), greedy (convex hull, fastest; the default for --sweep), waterfill (RateQuant's fitted-curve allocation) or convex (cvxpy: the LP relaxation's certified bound, then an integer solve on HiGHS).")]
MinBitsOpt = Annotated[Optional[int], typer.Option("--min-bits", help="No unit below this many code bits.")]
MaxBitsOpt = Annotated[Optional[int], typer.Option("--max-bits", help="No unit above this many code bits.")]
KeysOpt = Annotated[bool, typer.Option("--keys-at-least-values", help="Every KV head's keys get at least its values' bits.")]
_QUANTIZERS = ("--quantizers", "-q")
CandidatesOpt = Annotated[str, typer.Option(*_QUANTIZERS, help="Candidate quantizer ids, comma-separated (e.g. minmax-g32-fp16,lloydmax-g64-rhadamard-fp16); 'default' is rateq's measured set (see README), alone or with others. Below 2.5 bits 'default' adds learned codebooks (codebook-g2/g4/g8-prerope: far better there, about 4x the calibration time on a CPU); name the ids to choose otherwise.")]
QuantizersOpt = Annotated[Optional[str], typer.Option(*_QUANTIZERS, help="Comma-separated quantizer ids to choose from (default: all in the curves).")]

# The runtime policy: `calibrate` sets a new one; `apply` overrides a profile's, `eval` every row's.
_RESIDUAL, _BLOCK, _SINKS = ("--residual", "-r"), ("--block",), ("--sinks",)
ResidualOpt = Annotated[int, typer.Option(*_RESIDUAL, help="Full-precision residual window of the runtime policy.")]
BlockOpt = Annotated[Optional[int], typer.Option(*_BLOCK, help="Key block size of the runtime policy (default: the least multiple of 32 holding whole key groups of every quantizer).")]
SinksOpt = Annotated[int, typer.Option(*_SINKS, help="Leading tokens kept in full precision.")]
ProfileResidualOpt = Annotated[Optional[int], typer.Option(*_RESIDUAL, help="Full-precision residual window (default: the profile's policy).")]
ProfileBlockOpt = Annotated[Optional[int], typer.Option(*_BLOCK, help="Key block size (default: the profile's policy).")]
ProfileSinksOpt = Annotated[Optional[int], typer.Option(*_SINKS, help="Leading tokens kept in full precision (default: the profile's policy).")]
RowsResidualOpt = Annotated[Optional[int], typer.Option(*_RESIDUAL, help=(
    "Full-precision residual window R, for every row (default: each profile's own policy; baselines 0, the "
    "papers' protocol)."))]
RowsBlockOpt = Annotated[Optional[int], typer.Option(*_BLOCK, help=(
    "Key block (tokens whose keys are quantized together), for every row (default: each profile's own policy; "
    "baselines 32, raised to a multiple of their key groups)."))]
RowsSinksOpt = Annotated[Optional[int], typer.Option(*_SINKS, help=(
    "Leading tokens kept in full precision, for every row (default: each profile's own policy; baselines 0)."))]


# -- the output sink -------------------------------------------------------------------------------------------
def emit_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}", markup=False),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not enabled, transient=False,
    )


class Output:
    """Where one command's results go, made from its --json flag.

    Human mode: `line` prints plain text on stdout (never parsed as markup, soft-wrapped), `table` renders a
    rich renderable. JSON mode: those print nothing, and `add` collects the document that is written as one
    JSON object on stdout when the command ends without an error (`with Output(json_out) as sink: …`). `write`
    puts text that is the output itself (a file's content) on stdout unchanged, in both modes.
    Progress (`bar`, `spinner`, `calibration`) goes to stderr in human mode only; `warning` goes to stderr in
    both modes."""

    def __init__(self, json_mode: bool = False):
        self.json = json_mode
        self.doc: dict = {}

    def __enter__(self) -> Output:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.json:
            emit_json(self.doc)

    def add(self, *parts: Mapping[str, Any], **fields: Any) -> None:
        """Put entries into the JSON document, in order (a later entry replaces an earlier one of that key)."""
        for part in (*parts, fields):
            self.doc.update(part)

    def line(self, text: str = "") -> None:
        if not self.json:
            console.print(Text(text), soft_wrap=True)

    def write(self, text: str) -> None:
        """Text that is itself the command's output (a file's content, launch flags), on stdout as it is, in both
        modes."""
        sys.stdout.write(text)

    def table(self, renderable) -> None:
        if not self.json:
            console.print(renderable)

    def warning(self, message: str) -> None:
        err_console.print(Text.assemble(("warning:", "yellow"), f" {message}"), soft_wrap=True)

    def bar(self, description: str) -> Progress:
        """A progress bar on stderr (stdout stays clean for --json), shown in human mode only; use as a context
        manager, with one task per step."""
        bar = _bar(not self.json)
        bar.add_task(description, total=None, rate="")
        return bar

    def spinner(self, text: str):
        """A spinner on stderr while something without steps runs (human mode only)."""
        return contextlib.nullcontext() if self.json else err_console.status(Text(text), spinner="dots")

    @contextlib.contextmanager
    def calibration(self) -> Iterator[Callable[[dict], None]]:
        """Yields the callback `rateq.calibrate(progress=…)` reports to: a bar of tokens with tokens/s (first the
        held-out tokens and the fitting of learned quantizers, when there are any), and its warnings, each shown
        once (above the bar)."""
        with _bar(not self.json) as bar:
            task = bar.add_task("calibrating tokens", total=None, rate="")

            def report(event: dict) -> None:
                kind = event.get("event")
                if kind in ("start", "batch"):
                    seconds = event.get("seconds") or 0.0
                    rate = f"{event['tokens'] / seconds:,.0f} tok/s" if seconds > 0 and event["tokens"] else "… tok/s"
                    bar.update(task, description="calibrating tokens", completed=event["tokens"],
                               total=event["total"], rate=rate)
                elif kind == "learn":  # codebooks and static scales, fitted before the priced pass
                    tokens = event["stage"] == "tokens"
                    seconds = event.get("seconds") or 0.0
                    rate = f"{event['done'] / seconds:,.0f} tok/s" if tokens and seconds > 0 and event["done"] else ""
                    bar.update(task, description="learning: held-out tokens" if tokens else "learning: fitting",
                               completed=event["done"], total=event["total"], rate=rate)
                elif kind == "warning":
                    self.warning(event["message"])

            yield report


# -- checks of options and output paths ------------------------------------------------------------------------
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


def check_placement_options(device: str, device_map: Optional[str], max_memory: Optional[str],
                            offload_folder: Optional[Path]) -> dict:
    """`--device`, `--device-map`, `--max-memory` and `--offload-folder` checked before any weights load → the
    keyword arguments `rateq.load_model` takes for the placement (none for a plain --device), each error naming
    the option."""
    from rateq.errors import RateQError
    from rateq.models import check_device, check_placement

    check_device(device)
    if offload_folder is not None:
        if device_map is None:
            raise RateQError("--offload-folder is where --device-map offloads weights to disk; give --device-map too")
        if offload_folder.exists() and not offload_folder.is_dir():
            raise RateQError(f"--offload-folder {offload_folder} is a file; give a folder")
    if device_map is None and max_memory is None:
        return {}
    if device_map is None:
        raise RateQError("--max-memory bounds what --device-map puts on each device; give --device-map too (e.g. auto)")
    if device != "cpu":
        raise RateQError(f"give --device {device} or --device-map {device_map}, not both: a device map places every "
                         "layer itself")
    try:
        device_map, max_memory = check_placement("cpu", device_map, max_memory)
    except RateQError as exc:
        raise RateQError(f"--device-map/--max-memory: {exc}") from None
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}


def hub_options(revision: Optional[str], trust_remote_code: bool) -> dict:
    """`--revision` and `--trust-remote-code` as keyword arguments of `load_config`, `load_tokenizer` and
    `load_model`: only those the user gave."""
    from rateq.errors import RateQError

    kw = {}
    if revision is not None:
        if not revision.strip():
            raise RateQError("--revision is empty; give a branch, tag or commit")
        kw["revision"] = revision.strip()
    if trust_remote_code:
        kw["trust_remote_code"] = True
    return kw


def check_out(out: Optional[Path], what: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written (see `rateq.io.check_writable`)."""
    from rateq.io import check_writable

    if out is not None:
        check_writable(out, what)


# -- parsing list options --------------------------------------------------------------------------------------
def parse_list(text: Optional[str]) -> Optional[list[str]]:
    """`a,b, c` → `["a", "b", "c"]` (empty items dropped); None stays None."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


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


# -- where files go --------------------------------------------------------------------------------------------
def default_out(model: str, budget: float) -> Path:
    """`./<model>-b<budget>.safetensors`: the model's alias (or last path part of a hub id / folder)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip("-") or "model"
    return Path(f"{slug}-b{budget:g}.safetensors")


def curves_path(profile: Path) -> Path:
    """Where the curves behind a profile are kept: `P.safetensors` → `P.curves.safetensors`."""
    name = profile.name[: -len(".safetensors")] if profile.name.endswith(".safetensors") else profile.name
    return profile.with_name(f"{name}.curves.safetensors")
