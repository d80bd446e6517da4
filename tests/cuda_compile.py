"""Compile rateq's Triton kernels for CUDA GPUs on a machine without one.

The host code runs on CPU tensors with the kernel swapped for a `Recorder`, which keeps each launch's arguments
instead of launching; `compile_launch` hands one to Triton's compiler for a CUDA target (`sm_80`, `sm_90`, …, with
the ptxas Triton ships) and returns the compiled kernel, whose metadata gives its shared memory. What a GPU would
reject at launch (a construct that does not lower, shared memory beyond the block limit) shows here. Use it in a
process where `TRITON_INTERPRET` is not set: under the interpreter `triton.jit` gives no compilable function."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

# Shared memory a block may opt into, bytes (CUDA programming guide, "Technical Specifications per Compute
# Capability"): 163 KB on sm_80, 99 KB on sm_86/sm_89, 227 KB on sm_90.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_POINTER = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
            torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class Recorder:
    """Stands in for a jitted kernel: `rec[grid](*args, **kwargs)` keeps (grid, args, kwargs)."""

    def __init__(self, fn):
        self.fn = fn
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, dict(kwargs)))


def _type(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + _POINTER[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(x).__name__}")


def compile_launch(fn, args, kwargs, cc: int):
    """One recorded launch of the jitted `fn`, compiled for compute capability `cc` (e.g. 90)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constants = {}, {}
    for i, param in enumerate(fn.params):
        x = args[i] if i < len(args) else kwargs[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[param.name] = x
        else:
            signature[param.name] = _type(x)
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)


def available() -> bool:
    """Whether Triton's CUDA backend (its compiler and ptxas) is installed."""
    return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None


def run_script(code: str) -> None:
    """Runs `code` in a fresh Python process without `TRITON_INTERPRET` (or `RATEQ_KERNELS`), this folder on its
    path as `sys.argv[1]`; asserts it exits 0 having printed "ok" last."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RATEQ_KERNELS")}
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ok"), run.stdout + run.stderr
