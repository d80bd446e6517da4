"""Every command's --help renders (help texts are rich markup: a stray bracket breaks them), documents every
argument and option the command defines, and states the defaults the code really uses."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

import rateq
from cli.main import app
from rateq.calibrate import DEFAULT_BITS, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from rateq.evaluate import DEFAULT_BASELINES
from rateq.evaluate.core import DEFAULT_CHAR_START
from rateq.models import resolve_dtype
from rateq.policy import CachePolicy

COMMANDS = ["calibrate", "solve", "show", "export", "apply", "eval", "version"]
GROUP = typer.main.get_command(app)


def help_text(*args: str) -> str:
    """The help of `rateq ARGS --help` as one line of words: box drawing removed, wrapped lines joined."""
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split())


def rows(text: str, params) -> dict[str, str]:
    """Each parameter's row of the help, from its names to the next parameter's row: {name: row text}."""
    starts = {}
    for p in params:
        if p.param_type_name == "argument":
            pattern = rf"\* {re.escape(p.name)} <"
        else:
            opts = list(p.opts) + list(getattr(p, "secondary_opts", []))  # a --flag/--no-flag pair: one row
            longs = [o for o in opts if o.startswith("--")]
            shorts = [o for o in opts if not o.startswith("--")]
            pattern = r"(?:\* )?" + " ".join(map(re.escape, longs + shorts)) + " <"
        found = [m.start() for m in re.finditer(pattern, text)]
        assert len(found) == 1, f"{p.name}: the help has {len(found)} rows for it ({pattern!r})"
        starts[p.name] = found[0]
    order = sorted(starts.values()) + [len(text)]
    return {name: text[at: order[order.index(at) + 1]] for name, at in starts.items()}


def command_rows(command: str) -> dict[str, str]:
    cmd = GROUP.commands[command]
    return rows(help_text(command), cmd.params)


def option_row(command: str, option: str) -> str:
    cmd = GROUP.commands[command]
    name = next(p.name for p in cmd.params if option in p.opts)
    return command_rows(command)[name]


def test_the_top_level_help_lists_every_command_and_the_global_option():
    text = help_text()
    assert set(GROUP.commands) == set(COMMANDS)
    for c in COMMANDS:
        first = inspect.getdoc(GROUP.commands[c].callback).split(".")[0].split("\n")[0]
        assert f" {c} " in text and " ".join(first.split()) in text, c
    row = rows(text, GROUP.params)["threads"]
    assert "CPU threads for torch (env RATEQ_THREADS" in row


@pytest.mark.parametrize("command", COMMANDS)
def test_the_help_documents_every_parameter_and_shown_default(command):
    cmd = GROUP.commands[command]
    found = command_rows(command)
    for p in cmd.params:
        row = found[p.name]
        if p.name == "help":
            continue
        assert len(row.split()) > 3, f"{command} {p.name}: no help text ({row!r})"
        if getattr(p, "is_flag", False) or p.default is None or p.required:
            continue
        assert f"[default: {p.default}]" in row, f"{command} {p.name}: default {p.default!r} not shown in {row!r}"


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


# (command, option, what its help must say, computed from the library's own defaults)
DOCUMENTED = [
    ("calibrate", "--model", f"[default: {rateq.DEFAULT_MODEL}]"),
    ("calibrate", "--data", f"[default: {rateq.DEFAULT_CALIBRATION_TEXT}]"),
    ("calibrate", "--bits", f"[default: {','.join(map(str, DEFAULT_BITS))}]"),
    ("calibrate", "--n-samples", f"(default {DEFAULT_SAMPLES})"),
    ("calibrate", "--seq-len", f"(default {DEFAULT_SEQ_LEN})"),
    ("calibrate", "--method", f"[default: {_default(rateq.solve, 'method')}]"),
    ("calibrate", "--seed", f"[default: {_default(rateq.calibrate, 'seed')}]"),
    ("calibrate", "--batch-size", f"[default: {_default(rateq.calibrate, 'batch_size')}]"),
    ("calibrate", "--residual", f"[default: {CachePolicy().residual}]"),
    ("calibrate", "--sinks", f"[default: {CachePolicy().sinks}]"),
    ("calibrate", "--block", f"the least multiple of {CachePolicy.for_quantizers([]).block} holding whole key groups"),
    ("solve", "--method", f"{_default(rateq.solve, 'method')} (optimal; the default for --budget)"),
    ("solve", "--method", f"{_default(rateq.frontier, 'method')} (convex hull, fastest; the default for --sweep)"),
    ("eval", "--model", f"[default: {rateq.DEFAULT_MODEL}]"),
    ("eval", "--data", f"[default: {rateq.DEFAULT_EVAL_TEXT}]"),
    ("eval", "--calib", f"[default: {rateq.DEFAULT_CALIBRATION_TEXT}]"),
    ("eval", "--n-windows", f"[default: {_default(rateq.evaluate, 'n_windows')}]"),
    ("eval", "--seq-len", f"[default: {_default(rateq.evaluate, 'seq_len')}]"),
    ("eval", "--char-start", f"[default: {_default(rateq.evaluate, 'char_start')}]"),
    ("eval", "--batch-size", f"[default: {_default(rateq.evaluate, 'batch_size')}]"),
    ("eval", "--baseline", f"Default: {', '.join(n for n in DEFAULT_BASELINES if n != 'fp')}."),
    ("apply", "--char-start", f"[default: {DEFAULT_CHAR_START}]"),
]


@pytest.mark.parametrize("command, option, says", DOCUMENTED, ids=lambda x: str(x)[:40])
def test_documented_defaults_are_the_codes_defaults(command, option, says):
    assert says in option_row(command, option)


def test_the_engine_options_name_every_engine():
    from rateq.engines import ENGINES, EXPORT_FORMATS

    engine, fmt = option_row("solve", "--engine"), option_row("export", "--format")
    for name in ENGINES:
        assert name in engine, name
    for name in EXPORT_FORMATS:
        assert f"{name} (" in fmt or f"{name} or " in fmt, name
    assert "[default: json]" in fmt and "model: one for every layer's K" in option_row("solve", "--tie")


def test_the_dtype_help_says_what_auto_resolves_to():
    for command in ("calibrate", "apply", "eval"):
        assert "auto (fp32 on CPU, bf16 on CUDA)" in option_row(command, "--dtype")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:0") == torch.bfloat16


def test_errors_quoting_brackets_print_as_one_line(monkeypatch, capsys):
    # A text spec error quotes `hf:NAME[/CONFIG]`: printed as plain text, exit code 2, no traceback.
    import sys

    from cli.main import main

    monkeypatch.setattr(sys, "argv", ["rateq", "eval", "--data", "nosuchtext"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "Traceback" not in err and "hf:NAME[/CONFIG]" in err
