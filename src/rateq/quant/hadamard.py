"""Walsh–Hadamard rotation of each head vector: fast (O(D log D)), orthonormal, optionally with seeded signs.

`rotate(x)` is `H·diag(s)·x` along the last dim, with `H` the Sylvester Hadamard matrix scaled by `1/sqrt(D)`
(so `H·H = I`) and `s` a fixed ±1 vector drawn from `seed` (all ones when `random_signs=False`). The inverse is
`diag(s)·H·y`. The rotation is data independent and costs no stored bits: a quantizer that rotates stores only
what it would store without rotating.

Why rotate: it spreads an outlier channel's energy over all D coordinates, so a uniform grid wastes less
range on one channel; with random signs the rotated coordinates of any fixed vector are close to i.i.d.
N(0, ‖x‖²/D), the distribution the Lloyd–Max codebooks of `lloydmax.py` are designed for.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..errors import RateQError


def check_dim(d: int) -> None:
    if d < 1 or d & (d - 1):
        raise RateQError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}; use rotation='none' for this model")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dim (Sylvester order); D a power of two."""
    d = x.shape[-1]
    check_dim(d)
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < d:
        # Butterfly on pairs (i, i + h) inside each block of 2h: (a, b) → (a + b, a − b).
        y = y.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, d)


@lru_cache(maxsize=256)
def _signs_cpu(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED_0000 + seed)
    return torch.randint(0, 2, (d,), generator=g).to(torch.float32) * 2 - 1


_SIGNS: dict = {}


def signs(d: int, seed: int, device=None) -> torch.Tensor:
    """The fixed ±1 vector `(d,)` of `seed` (same on every device), copied to each device once: a copy from the
    host per call would wait for the device's queued work."""
    key = (d, seed, str(device))
    if key not in _SIGNS:
        _SIGNS[key] = _signs_cpu(d, seed).to(device)
    return _SIGNS[key]


# Up to this head_dim the rotation runs as one dense matmul with the (cached) matrix the butterfly builds: in
# eager PyTorch every butterfly stage is a separate pass over memory, and for 4·1024 tokens × 64 channels the
# matmul measured ~6× faster on CPU (BLAS). Larger heads use the O(D log D) butterfly.
DENSE_MAX_DIM = 256


_MATRICES: dict = {}


def matrix(d: int, device=None) -> torch.Tensor:
    """The normalised Sylvester matrix `H (d, d)` (symmetric, `H·H = I`), built by the butterfly itself so both
    paths are the same transform; one per (d, device)."""
    key = (d, str(device))
    if key not in _MATRICES:
        _MATRICES[key] = (fwht(torch.eye(d)) * (1.0 / math.sqrt(d))).to(device)
    return _MATRICES[key]


def rotate(x: torch.Tensor, *, random_signs: bool = True, seed: int = 0) -> torch.Tensor:
    """`(..., D)` → `(..., D)`: `H·diag(s)·x`, orthonormal, computed in fp32."""
    x = x.to(torch.float32)
    d = x.shape[-1]
    check_dim(d)
    if random_signs:
        x = x * signs(d, seed, x.device)
    if d <= DENSE_MAX_DIM:
        return x @ matrix(d, x.device)
    return fwht(x) * (1.0 / math.sqrt(d))


def unrotate(y: torch.Tensor, *, random_signs: bool = True, seed: int = 0) -> torch.Tensor:
    """Inverse of `rotate`: `diag(s)·H·y` (H is symmetric and, normalised, its own inverse)."""
    y = y.to(torch.float32)
    d = y.shape[-1]
    check_dim(d)
    x = y @ matrix(d, y.device) if d <= DENSE_MAX_DIM else fwht(y) * (1.0 / math.sqrt(d))
    if random_signs:
        x = x * signs(d, seed, x.device)
    return x
