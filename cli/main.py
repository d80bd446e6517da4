"""Entry point: the typer app, its commands, and one-line errors with exit code 2.

Every problem a user can fix — a usage error (missing or unknown option, a value of the wrong type) or a
`RateQError` (bad input, missing file, mismatched model) — prints one line `error: …` on stderr and exits
with code 2, with no traceback unless RATEQ_DEBUG=1.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.text import Text
from typer._click import exceptions as click_exceptions

import rateq
from rateq.errors import RateQError

from ._common import ThreadsOpt, err_console, use_threads

app = typer.Typer(
    name="rateq",
    help=(
        "Per-head bit allocation for the KV cache. calibrate measures how much each (layer, KV head, K/V) "
        "suffers at every bit width, solve turns those curves and a budget (effective bits per element, "
        "metadata included) into a plan, apply runs a model with a cache that stores exactly that plan, "
        "and eval compares plans with baselines at matched storage."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(threads: ThreadsOpt = None) -> None:
    """rateq: per-head K/V bit plans for the KV cache."""
    use_threads(threads)


@app.command()
def version() -> None:
    """Print the rateq version and the versions it runs with."""
    import torch
    import transformers

    typer.echo(f"rateq {rateq.__version__} (torch {torch.__version__}, transformers {transformers.__version__})")


def _register_commands() -> None:
    # Each command group lives in its own module; importing one adds its commands to `app`.
    import importlib

    for name in ("calibrate", "solve", "profile_cmds", "apply", "evaluate"):
        try:
            importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cli.{name}":
                raise


_register_commands()


def _fail(message: str, code: int = 2) -> None:
    # The message is plain text (it may quote brackets, e.g. hf:NAME[/CONFIG]): never parsed as markup; one line.
    line = " ".join(str(message).split())
    err_console.print(Text.assemble(("error:", "red"), f" {line}"), soft_wrap=True)
    sys.exit(code)


def _usage_message(exc: click_exceptions.ClickException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_exceptions.UsageError) and ctx is not None:
        message = f"{message.rstrip('.')}; see '{ctx.command_path} --help'"
    return message


def main() -> None:
    """Run the app; usage errors and RateQErrors become one line on stderr and exit code 2 (RATEQ_DEBUG=1 keeps
    the traceback of a RateQError)."""
    # Commands show the warnings rateq reports to their progress callbacks themselves (calibration's above its
    # bar); without a handler Python's last-resort one would print a logged one a second time.
    log = logging.getLogger("rateq")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    try:
        code = app(prog_name="rateq", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError:
        sys.exit(2)  # the help has been printed
    except click_exceptions.ClickException as exc:
        _fail(_usage_message(exc), exc.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except RateQError as exc:
        if os.environ.get("RATEQ_DEBUG") == "1":
            raise
        _fail(str(exc))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
