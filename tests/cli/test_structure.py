"""How the command line and the library are put together, read from the source with `ast`: command modules
share code only through the shared modules, the library draws no terminal output of its own (no rich), and
commands write their output through the one sink."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "cli"
SRC = ROOT / "src" / "rateq"
# The modules every command may import: the shared ones (a leading underscore) and the app.
SHARED = {p.stem for p in CLI.glob("_*.py") if p.stem != "__init__"}
COMMANDS = sorted(p.stem for p in CLI.glob("*.py") if not p.stem.startswith("_") and p.stem != "main")


def cli_imports(path: Path) -> set[str]:
    """The cli modules `path` imports, relatively (`from .x import …`, `from . import x`) or as `cli.x`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "cli":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cli."))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            # main registers the commands by name: importlib.import_module(f"cli.{name}")
            found.add("<dynamic>")
    return found


def test_there_are_command_modules():
    assert {"calibrate", "solve", "apply", "evaluate"} <= set(COMMANDS) and "_common" in SHARED


@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_module_imports_no_other_command_module(name):
    imported = cli_imports(CLI / f"{name}.py")
    assert imported <= SHARED | {"main"}, f"cli/{name}.py imports {sorted(imported - SHARED - {'main'})}"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_shared_module_imports_no_command_and_not_the_app(name):
    imported = cli_imports(CLI / f"{name}.py")
    assert imported <= SHARED, f"cli/{name}.py imports {sorted(imported - SHARED)}"


def test_the_app_imports_commands_only_to_register_them():
    assert cli_imports(CLI / "main.py") <= SHARED | {"<dynamic>"}


def test_the_detector_sees_each_import_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .solve import x\nfrom . import apply\nfrom cli.evaluate import y\nimport cli.calibrate\n"
                     "from ._common import z\n")
    assert cli_imports(probe) == {"solve", "apply", "evaluate", "calibrate", "_common"}


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_the_library_never_imports_rich(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        assert not any(n == "rich" or n.startswith("rich.") for n in names), \
            f"{path.relative_to(ROOT)}:{node.lineno} imports rich; the library reports progress through callbacks"


@pytest.mark.parametrize("name", COMMANDS)
def test_commands_print_only_through_the_sink(name):
    # No command prints by itself: human lines, tables and JSON all go through cli._common.Output.
    tree = ast.parse((CLI / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            assert called not in ("emit_json", "print", "echo") or owner not in ("", "console", "err_console", "typer"), \
                f"cli/{name}.py:{node.lineno} prints directly"
        if isinstance(node, ast.Name):
            assert node.id not in ("console", "err_console"), f"cli/{name}.py:{node.lineno} uses {node.id}"


@pytest.mark.parametrize("path", sorted([*SRC.rglob("*.py"), *CLI.glob("*.py")]), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_pyplot_or_switches_matplotlibs_backend(path):
    # Plots are drawn by rateq.plots on a figure's own canvas: pyplot's global figures and backend stay untouched.
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                 else [])
        assert not any(n == "matplotlib.pyplot" or n.startswith("matplotlib.pyplot.") or n == "pylab" for n in names), \
            f"{path.relative_to(ROOT)}:{node.lineno} imports pyplot"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use":
            assert getattr(node.func.value, "id", "") != "matplotlib", \
                f"{path.relative_to(ROOT)}:{node.lineno} switches matplotlib's backend"
