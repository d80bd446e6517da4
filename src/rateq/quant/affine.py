"""Uniform group quantization: pure functions, no state (the codec, `rateq.quant.codec`, builds on them).

Tensors here are K or V of one layer laid out `(B, H, T, D)` (batch, KV heads, tokens, head_dim).
`to_groups` views them as `(..., n_groups, G)` with the group as the last dim, whichever direction the
groups run in, so `quantize_groups` / `dequantize_groups` only ever reduce over the last dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec

_STORE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def storage_dtype(name: str) -> torch.dtype:
    return _STORE_DTYPE[name]


# Relative spacing of each storage format (2**-mantissa_bits), used to round scales up, never down.
_EPS = {"fp32": 0.0, "fp16": 2.0**-10, "bf16": 2.0**-7, "fp8": 2.0**-3}


def _round_to(x: torch.Tensor, name: str) -> torch.Tensor:
    """Round fp32 `x` to the storage format `name` and back (what the stored metadata really holds)."""
    return x.to(_STORE_DTYPE[name]).to(torch.float32)


def _round_scale(x: torch.Tensor, name: str) -> torch.Tensor:
    """Store a scale rounded *up*: a scale rounded down would shrink the grid below the group's range and clip
    its extremes by up to `levels` ulps — worse than half a step at 8 bits."""
    return _round_to(x * (1 + _EPS[name]), name)


@dataclass
class QuantizedGroups:
    """Codes `(..., n_groups, G)` uint8 plus per-group metadata `(..., n_groups, 1)` in fp32 (already rounded
    to the storage format). `zero` is the group minimum (float zero), the integer zero-point (code zero), or
    None (symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _clip(t: torch.Tensor, levels) -> torch.Tensor:
    """`t` clamped to the codes `[0, levels]` (`levels` a number, or a tensor of one per width)."""
    return torch.clamp(t, 0, levels) if isinstance(levels, int) else torch.clamp(t, levels.new_zeros(()), levels)


def _grid(x: torch.Tensor, levels, spec: QuantSpec):
    """fp32 groups `(..., G)` → `(codes as floats, scale, zero or None)` on the grid of `levels + 1` levels; a tensor
    `levels` of shape `(W, 1, …, 1)` gives every width at once, the group statistics taken once."""
    if spec.kind == "symmetric":
        # Mid-rise: 2**bits levels at ±(i + 1/2)·s, no zero level, so even 1 bit is a usable sign code.
        amax = x.abs().amax(-1, keepdim=True)
        scale = _round_scale(amax / (levels / 2.0), spec.scale_dtype).clamp_min(1e-12)
        return _clip(torch.floor(x / scale + (levels + 1) / 2.0), levels), scale, None
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    if spec.zero == "code":
        # An integer zero-point must itself be on the grid, so the range always includes 0.
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = _round_scale((hi - lo) / levels, spec.scale_dtype).clamp_min(1e-12)
    if spec.zero == "code":
        zero = _clip(torch.round(-lo / scale), levels)
        return _clip(torch.round(x / scale) + zero, levels), scale, zero
    zero = _round_to(lo, spec.scale_dtype)
    return _clip(torch.round((x - zero) / scale), levels), scale, zero


def _restore_(x: torch.Tensor, levels, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes (as fp32 `x`, overwritten) → values."""
    if spec.kind == "symmetric":
        return x.sub_(levels / 2.0).mul_(scale)
    if spec.zero == "code":
        return x.sub_(zero).mul_(scale)
    return x.mul_(scale).add_(zero)


def quantize_groups(x: torch.Tensor, bits: int, spec: QuantSpec) -> QuantizedGroups:
    """Quantize `(..., G)` groups along the last dim at `bits` in 1..8."""
    if spec.kind not in ("minmax", "symmetric"):
        raise ValueError(f"quantize_groups handles uniform grids; {spec.id} goes through rateq.quant.codec_for(spec)")
    codes, scale, zero = _grid(x.to(torch.float32), (1 << bits) - 1, spec)
    return QuantizedGroups(codes.to(torch.uint8), scale, zero)


def dequantize_groups(q: QuantizedGroups, bits: int, spec: QuantSpec, dtype=torch.float32, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes and metadata → values, in fp32 (then `dtype`). Elementwise, so metadata may be any view that
    broadcasts over the codes' groups; with `out` (fp32, the codes' shape) the values are written there, in place."""
    x = q.codes.to(torch.float32, copy=True) if out is None else out.copy_(q.codes)
    _restore_(x, (1 << bits) - 1, q.scale, q.zero, spec)
    return x if out is not None else x.to(dtype)


_LEVELS: dict = {}


def _levels(bits: tuple[int, ...], device) -> torch.Tensor:
    """`2**b − 1` of each width as fp32 on `device`, made once: a copy from the host per call would wait for the
    device's queued work."""
    key = (bits, str(device))
    if key not in _LEVELS:
        _LEVELS[key] = torch.tensor([float((1 << b) - 1) for b in bits], device=device)
    return _LEVELS[key]


def requantize_groups(x: torch.Tensor, bits, spec: QuantSpec) -> torch.Tensor:
    """Groups `(..., G)` quantized and dequantized at each width of `bits` → `(len(bits), ..., G)` fp32: for each
    width exactly `dequantize_groups(quantize_groups(x, b, spec), b, spec)`, with the group statistics taken once
    and every width in the same few tensor ops (calibration prices all widths of a quantizer together)."""
    if spec.kind not in ("minmax", "symmetric"):
        raise ValueError(f"requantize_groups handles uniform grids, not {spec.id}")
    x = x.to(torch.float32)
    levels = _levels(tuple(bits), x.device).view(-1, *[1] * x.dim())
    codes, scale, zero = _grid(x, levels, spec)
    return _restore_(codes, levels, scale, zero, spec)


def to_groups(x: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """`(B, H, T, D)` → `(B, H, n, G)`-shaped groups. `tokens`: T must be a multiple of G; `channels`: D must."""
    B, H, T, D = x.shape
    if axis == "tokens":
        if T % group_size:
            raise ValueError(f"{T} tokens do not split into groups of {group_size}")
        # (B, H, T/G, G, D) → (B, H, T/G, D, G): one group per (block, channel)
        return x.reshape(B, H, T // group_size, group_size, D).transpose(-1, -2).reshape(B, H, -1, group_size)
    if D % group_size:
        raise ValueError(f"head_dim {D} does not split into groups of {group_size}")
    return x.reshape(B, H, T * (D // group_size), group_size)


def from_groups(g: torch.Tensor, axis: str, group_size: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_groups`."""
    B, H, T, D = shape
    if axis == "tokens":
        return g.reshape(B, H, T // group_size, D, group_size).transpose(-1, -2).reshape(B, H, T, D)
    return g.reshape(B, H, T, D)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's `compute_error`)."""
    x = x.to(torch.float64)
    err = (x - x_hat.to(torch.float64)).pow(2).sum()
    return float(10 * torch.log10(x.pow(2).sum() / err.clamp_min(1e-300)))
