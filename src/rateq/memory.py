"""Peak memory of a piece of work, per device: what calibration reports in its summary (`peak_bytes`).

    peak = PeakMemory(["cuda:0", "cuda:1"])   # the CPU is always measured
    ...                                      # the work
    peak.read()  # {"cpu": 1234567890, "cuda:0": …, "cuda:1": …}

- `cpu`: the high-water mark of the process's resident memory (VmHWM) since the start, on Linux, where it can
  be reset (`/proc/self/clear_refs`); elsewhere the process's peak since it started (`getrusage`), the
  figure then includes whatever ran before. Model weights held on the CPU count in it.
- `cuda:N`: the most bytes torch's allocator held for tensors on that GPU since the start
  (`torch.cuda.max_memory_allocated`, whose peak is reset when the measurement starts).
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["PeakMemory", "resident_peak"]

_STATUS = "/proc/self/status"
_CLEAR = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_resident_peak() -> bool:
    """Reset the process's resident high-water mark to its current resident size (Linux ≥ 4.0)."""
    if not os.path.exists(_CLEAR):
        return False
    try:
        with open(_CLEAR, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def resident_peak() -> int:
    """The process's resident-memory high-water mark in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS counts bytes, Linux KiB


def _cuda_devices(devices) -> list[torch.device]:
    out = []
    for d in devices:
        name = f"cuda:{d}" if isinstance(d, int) else str(d)
        if not name.startswith("cuda"):
            continue
        dev = torch.device(name)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev not in out:
            out.append(dev)
    return out


class PeakMemory:
    """Starts measuring when made; `read()` gives `{"cpu": bytes, "cuda:N": bytes, …}` peaks since then."""

    def __init__(self, devices=()):
        self.cuda = _cuda_devices(devices) if torch.cuda.is_available() else []
        for dev in self.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        self.since_start = _reset_resident_peak()

    def read(self) -> dict[str, int]:
        out = {"cpu": resident_peak()}
        for dev in self.cuda:
            out[str(dev)] = int(torch.cuda.max_memory_allocated(dev))
        return out


def format_bytes(n: int) -> str:
    """`1536` → `1.5 KiB`: a size for people."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
