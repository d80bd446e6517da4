"""1-bit quantized Johnson–Lindenstrauss sketch (QJL): unbiased inner products with a residual `r`.

Stored per vector: `sign(S·r)` (m bits) and `‖r‖` (one number), with `S (m, d)` a fixed Gaussian matrix drawn
from a seed. For a Gaussian row `s`, `E[⟨s, q⟩·sign(⟨s, r⟩)] = sqrt(2/π)·⟨q, r⟩/‖r‖`, so

    est(q) = ‖r‖ · sqrt(π/2) / m · ⟨S·q, sign(S·r)⟩

is unbiased for `⟨q, r⟩` over the draw of S, with variance at most `π/(2m)·‖q‖²‖r‖²`. The estimator is
linear in `q`, so it is exactly the inner product of `q` with the reconstruction

    r̂ = ‖r‖ · sqrt(π/2) / m · Sᵀ·sign(S·r),

which is what `decode` returns: attention computing `q·k̂` on the reconstruction applies the estimator, and
`Σ p_j v̂_j` is unbiased for the attention output given the weights. r̂ is *not* a good reconstruction of r in
the MSE sense (E‖r̂ − r‖² ≈ (π/2 − 1 + d/m·π/2)‖r‖²): QJL buys unbiasedness with variance.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SCALE = math.sqrt(math.pi / 2)


@lru_cache(maxsize=64)
def _matrix_cpu(m: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x0A71_0000 + seed)
    return torch.randn(m, d, generator=g, dtype=torch.float32)


_ON_DEVICE: dict = {}


def matrix(m: int, d: int, seed: int, device=None) -> torch.Tensor:
    """The fixed Gaussian sketch `S (m, d)` of `seed`, entries N(0, 1) (drawn on the CPU: the same on every device)."""
    if device is None or torch.device(device).type == "cpu":
        return _matrix_cpu(m, d, seed)
    key = (m, d, seed, str(device))
    if key not in _ON_DEVICE:
        if len(_ON_DEVICE) >= 64:
            _ON_DEVICE.clear()
        _ON_DEVICE[key] = _matrix_cpu(m, d, seed).to(device)
    return _ON_DEVICE[key]


def encode(r: torch.Tensor, seed: int, m: int | None = None) -> torch.Tensor:
    """Sign bits (uint8 0/1) `(..., m)` of `S·r` for residuals `r (..., d)`; `m` defaults to d."""
    d = r.shape[-1]
    S = matrix(m or d, d, seed, r.device)
    return (r.to(torch.float32) @ S.T >= 0).to(torch.uint8)


def decode(bits: torch.Tensor, norm: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """The reconstruction `r̂ (..., d)` from sign bits `(..., m)` and `‖r‖ (..., 1)`."""
    m = bits.shape[-1]
    S = matrix(m, d, seed, bits.device)
    signs = bits.to(torch.float32) * 2 - 1
    return (signs @ S) * (norm.to(torch.float32) * (SCALE / m))


def estimate(q: torch.Tensor, bits: torch.Tensor, norm: torch.Tensor, seed: int) -> torch.Tensor:
    """The inner-product estimator `est(q) (...,)` of `⟨q, r⟩`, computed from the sketch of `q` (as a QJL
    attention kernel would); equal to `⟨q, decode(bits, norm)⟩` up to rounding."""
    m, d = bits.shape[-1], q.shape[-1]
    S = matrix(m, d, seed, q.device)
    signs = bits.to(torch.float32) * 2 - 1
    return (q.to(torch.float32) @ S.T * signs).sum(-1) * norm.to(torch.float32).squeeze(-1) * (SCALE / m)
