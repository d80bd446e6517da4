"""Native C kernels: a C source next to its Python user, compiled on first use and loaded with `ctypes`.

`build(source, flags, state)` compiles one source with the system's C compiler (`$CC`, else `cc` or `gcc`) into
rateq's cache folder (`rateq.paths.cache_dir()/kernels`), as `<stem>-<digest>.so`, the digest keyed by the
source, the machine (architecture, CPU model and flags), the compiler and the flags, so later processes load the
built library and a changed source or machine builds anew. `load(state, build, declare)` loads it once per
process and declares its functions' signatures. Where no compiler is found, the build fails or the library does
not load, `load` gives None and the caller uses its torch path; `build_error(state)` says why (the compiler's
last line). `RATEQ_KERNELS=torch` turns every native kernel off (`disabled()`).

Each user keeps its own `state` dict (the loaded library, the last error), so tests can reset one kernel alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .paths import cache_dir


def disabled() -> bool:
    """Whether `RATEQ_KERNELS=torch` asks for the torch paths everywhere."""
    return os.environ.get("RATEQ_KERNELS", "").lower() == "torch"


def compiler() -> str | None:
    """The C compiler: `$CC`, else `cc` or `gcc` on the PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def machine_key(flags: Sequence[str], cc: str | None) -> str:
    """What a built library depends on besides its source: architecture, CPU model and flags, compiler, flags."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return f"{platform.machine()}|{cpu}|{cc}|{' '.join(flags)}"


def build(source: Path, flags: Sequence[str], state: dict, cc: str | None = None, key: str | None = None,
          libs: Sequence[str] = ("-lm",)) -> Path | None:
    """The shared library built from `source` with `flags` (built now unless the cache holds it), or None: no
    compiler, or a failed build (its last line then in `state["error"]`). `cc` defaults to `compiler()`, `key` to
    `machine_key(flags, cc)`."""
    cc = compiler() if cc is None else cc
    if cc is None:
        return None
    key = machine_key(flags, cc) if key is None else key
    text = Path(source).read_bytes()
    digest = hashlib.sha256(text + key.encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    target = folder / f"{Path(source).stem}-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / target.name
        try:
            done = subprocess.run([cc, *flags, str(source), "-o", str(out), *libs], capture_output=True, text=True)
        except OSError as exc:  # a compiler that does not run
            state["error"] = [str(exc)]
            return None
        if done.returncode != 0 or not out.exists():
            state["error"] = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
            return None
        os.replace(out, target)  # atomic: a concurrent build leaves one complete file
    return target


def load(state: dict, build_fn: Callable[[], Path | None],
         declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The library `build_fn()` gives, loaded once per `state` and passed to `declare` (which sets its functions'
    argtypes and restype); None when `disabled()`, when `build_fn` gives None, or when the library does not load
    or lacks a declared function (the reason then in `state["error"]`)."""
    if disabled():
        return None
    if "lib" not in state:
        lib = None
        try:
            path = build_fn()
            if path is not None:
                lib = ctypes.CDLL(str(path))
                declare(lib)
        except (OSError, AttributeError) as exc:  # a library that does not load, or lacks a symbol: use torch
            state["error"] = [str(exc)]
            lib = None
        state["lib"] = lib
    return state["lib"]


def build_error(state: dict) -> str | None:
    """Why a library is None after a failed build or load (the compiler's last line), if it failed."""
    err = state.get("error")
    return err[0] if err else None
