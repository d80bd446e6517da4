"""Entry point: the typer app, its commands, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import sys

import typer
from rich.text import Text

import rateq
from rateq.errors import RateQError

from ._common import err_console

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
def _root() -> None:
    """rateq: per-head K/V bit plans for the KV cache."""


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


def main() -> None:
    """Run the app; a RateQError becomes one line on stderr and exit code 2 (RATEQ_DEBUG=1 keeps tracebacks)."""
    try:
        app()  # standalone: usage errors already print one message and exit 2
    except RateQError as exc:
        if os.environ.get("RATEQ_DEBUG") == "1":
            raise
        # The message is plain text (it may quote brackets, e.g. hf:NAME[/CONFIG]): never parsed as markup.
        err_console.print(Text.assemble(("error:", "red"), f" {exc}"), soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
