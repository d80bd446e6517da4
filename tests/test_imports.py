"""Every module of the library imports on its own: no import cycle hides behind the order in which
`rateq/__init__.py` happens to import them."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rateq

# In a fresh interpreter (torch and transformers stay loaded between modules), each module is imported with no
# rateq module imported yet.
SCRIPT = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "rateq" or m.startswith("rateq.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    names = sorted(m.name for m in pkgutil.walk_packages(rateq.__path__, prefix="rateq."))
    assert len(names) > 20 and "rateq.runtime.store" in names
    run = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
