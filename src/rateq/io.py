"""Atomic file writing and checked safetensors reading, shared by curves, profiles, plan JSON and images.

Every writer goes through `atomic_write`: a temporary file in the target folder, renamed over the target once
complete, with the mode a plain `open()` would give (0666 & ~umask). A failed write leaves nothing behind (no
temporary file, no folder it created) and becomes one `RateQError`. `check_writable` refuses an output path
up front, before any work, for the same reasons the write would fail. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import RateQError

# Accepted by safetensors but never written by rateq: anything else in a header is refused before torch sees it.
_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100_000_000  # bytes; safetensors' own limit


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, outermost first."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing[::-1]


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder, a parent that is a file, or a
    folder where no file can be created (read-only, no permission, /proc). A missing parent folder is fine: the
    writer creates it. Nothing is left behind by the check."""
    path = Path(path)
    if path.is_dir():
        raise RateQError(f"{what} {path} is a folder; give a file name such as {path / 'plan.safetensors'}")
    if not path.name or path.name in (".", ".."):
        raise RateQError(f"{what} {path} names no file; give a file name such as plan.safetensors")
    folder = path.parent
    missing = _missing_folders(folder)
    existing = missing[0].parent if missing else folder
    if not existing.is_dir():
        raise RateQError(f"{what} {path}: {existing} is a file, not a folder; choose another path")
    try:  # the only reliable test (access() says yes to root on /proc, and no to nothing on a read-only mount)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RateQError(f"{what} {path} cannot be written: cannot create files in {existing} ({_reason(exc)}); "
                         "choose a folder you can write to") from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends, give it the usual file mode and rename it to
    `path`. On any failure nothing is left: the temporary file and the folders created for it are removed, and
    an OSError becomes a RateQError naming the path."""
    path = Path(path)
    created = _missing_folders(path.parent)
    tmp: str | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it (mkstemp makes it private)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            if exc.errno == errno.EISDIR or path.is_dir():
                raise RateQError(f"cannot write {what} {path}: it is a folder") from None
            raise RateQError(f"cannot write {what} {path}: {_reason(exc)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically (see `atomic_write`): never a half file at `path`, nothing left after a failure."""
    path = Path(path)
    with atomic_write(path, "safetensors file") as tmp:
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            raise OSError(errno.EIO, str(exc)) from None
    return path


def _check_header(path: Path, what: str) -> None:
    """Check the JSON header's framing (size, offsets, dtypes, shapes) so that only well-formed files reach the
    loader: safetensors reports some malformed headers with exceptions that name nothing useful."""
    def bad(reason: str) -> RateQError:
        return RateQError(f"{path} is not a readable {what} (truncated or not safetensors: {reason})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {n} does not fit a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("metadata must map names to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {name!r} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise bad(f"tensor {name!r} lies outside the file")
        spans.append((offsets[0], offsets[1], name, dtype, shape))
    for begin, end, name, dtype, shape in spans:
        numel = 1
        for d in shape:
            numel *= d
        item = 1 if dtype in ("BOOL", "U8", "I8") else 2 if dtype in ("U16", "I16", "F16", "BF16") else \
            4 if dtype in ("U32", "I32", "F32") else 8
        if end - begin != numel * item:
            raise bad(f"tensor {name!r} holds {end - begin} bytes, its shape {shape} needs {numel * item}")


def meta_json(meta: dict, key: str, kind: type | None = None, default: str | None = None):
    """The JSON value stored under metadata `key` (of type `kind` when given). Raises KeyError when it is
    missing (and has no `default`), ValueError when it is not JSON or not of that type."""
    text = meta[key] if default is None else meta.get(key, default)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"metadata {key!r} is not valid JSON") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"metadata {key!r} holds {type(value).__name__}, not {kind.__name__}")
    return value


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; unreadable, truncated or malformed files give one RateQError."""
    path = Path(path)
    if path.is_dir():
        raise RateQError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise RateQError(f"{what} {path} does not exist")
    try:
        _check_header(path, what)
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except RateQError:
        raise
    except OSError as exc:
        raise RateQError(f"cannot read {what} {path}: {_reason(exc)}") from None
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise RateQError(f"{path} is not a readable {what} (truncated or not safetensors: {exc})") from None
    return tensors, metadata
