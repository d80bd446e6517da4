"""KV transforms the baselines need beyond a plan: per-head bases from calibration text, rank reduction, and
quantization in a rotated basis.

Every transform has the `KVTransform` signature of `rateq.simulate`: `(layer, role, x (B, Hkv, T, D)) → stored
form of x`, so it runs through the same one-pass evaluation (and the same `CachePolicy` masks) as a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RateQError
from ..hooks import attention_hook, plain_attention
from ..models import fingerprint
from ..simulate import KVTransform

ROLES = ("k", "v")


@dataclass
class KVBases:
    """Per-unit PCA of cached K and V: `vectors[l, r]` is `(H, D, D)` with eigenvectors as columns, sorted by
    decreasing variance; `mean[l, r]` is `(H, D)`; `variance[l, r]` `(H, D)` the eigenvalues (centred)."""

    vectors: torch.Tensor  # (L, 2, H, D, D)
    mean: torch.Tensor  # (L, 2, H, D)
    variance: torch.Tensor  # (L, 2, H, D)
    tokens: int

    @property
    def head_dim(self) -> int:
        return self.vectors.shape[-1]


@torch.no_grad()
def kv_bases(model, windows: torch.Tensor, *, batch_size: int = 1, centered: bool = True) -> KVBases:
    """Run `windows (N, T)` through `model` and return the per-head PCA of post-RoPE keys and of values.

    The Gram matrices are accumulated in float64 per (layer, role), so memory is `L·2·H·D²` whatever the text
    length. `centered=False` gives the eigenvectors of the raw second moment E[x xᵀ] (no mean removed).
    """
    fp = fingerprint(model)
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    gram = torch.zeros(L, 2, H, D, D, dtype=torch.float64)
    total = torch.zeros(L, 2, H, D, dtype=torch.float64)
    count = torch.zeros(L, dtype=torch.float64)

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        for r, x in enumerate((key, value)):
            x64 = x.detach().to(torch.float64)  # (B, H, T, D)
            gram[layer, r] += torch.einsum("bhti,bhtj->hij", x64, x64).cpu()
            total[layer, r] += x64.sum(dim=(0, 2)).cpu()
        count[layer] += key.shape[0] * key.shape[2]
        return plain_attention(module, query, key, value, attention_mask, **kwargs)

    with attention_hook(model, capture):
        for i in range(0, windows.shape[0], batch_size):
            model(windows[i:i + batch_size].to(model.device), use_cache=False)
    if (count == 0).any():
        raise RateQError("some layers never ran attention during PCA calibration; is this a decoder-only model?")
    n = count.view(L, 1, 1, 1)
    mean = total / n  # (L, 2, H, D)
    second = gram / n[..., None]  # (L, 2, H, D, D)
    cov = second - mean[..., :, None] * mean[..., None, :]
    evals, evecs = torch.linalg.eigh(cov if centered else second)  # ascending
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    if not centered:
        mean = torch.zeros_like(mean)
    return KVBases(evecs.to(torch.float32), mean.to(torch.float32), evals.clamp_min(0).to(torch.float32),
                   int(count[0]))


def rank_transform(bases: KVBases, rank: int | tuple[int, int]) -> KVTransform:
    """Keep `rank` of `D` principal directions of every head (keys and values; a pair gives K and V ranks):
    `x̂ = μ + (x − μ) U_r U_rᵀ`. Stored as `r` fp16 coefficients per token, the basis once per model."""
    D = bases.head_dim
    ranks = (rank, rank) if isinstance(rank, int) else tuple(rank)
    if not all(0 <= r <= D for r in ranks):
        raise RateQError(f"rank must be in 0..{D} (head_dim), got {rank}")

    def transform(layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        r = ranks[ROLES.index(role)]
        u = bases.vectors[layer, ROLES.index(role), :, :, :r].to(x)  # (H, D, r)
        mu = bases.mean[layer, ROLES.index(role)].to(x)[None, :, None, :]  # (1, H, 1, D)
        coeff = ((x - mu) @ u[None]).to(torch.float16).to(x.dtype)  # (B, H, T, r): stored in fp16
        return mu + coeff @ u[None].transpose(-1, -2)

    return transform


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard matrix of size `n` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise RateQError(f"a Hadamard rotation needs head_dim to be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def rotations(kind: str, L: int, H: int, D: int, *, bases: KVBases | None = None, seed: int = 0) -> torch.Tensor:
    """`(L, 2, H, D, D)` orthogonal matrices, one per unit: `identity`, `hadamard`, `random` (one draw per unit)
    or `pca` (the unit's principal axes from `bases`)."""
    if kind == "identity":
        return torch.eye(D).expand(L, 2, H, D, D).clone()
    if kind == "hadamard":
        return hadamard(D).expand(L, 2, H, D, D).clone()
    if kind == "random":
        mats = [random_orthogonal(D, seed * 1_000_003 + i) for i in range(L * 2 * H)]
        return torch.stack(mats).view(L, 2, H, D, D)
    if kind == "pca":
        if bases is None:
            raise RateQError("a PCA rotation needs bases calibrated on text (kv_bases)")
        return bases.vectors.clone()
    raise RateQError(f"unknown rotation {kind!r}; use identity, hadamard, random or pca")


def rotated_transform(inner: KVTransform, rot: torch.Tensor) -> KVTransform:
    """Quantize in a rotated basis: `x̂ = inner(x R) Rᵀ` per head, `rot (L, 2, H, D, D)` orthogonal.

    The rotation is applied before the quantizer groups channels or tokens, so per-channel key scales are
    per *rotated* channel. Storage is the inner quantizer's; the rotation is a per-model constant (or, for
    Hadamard, no storage at all).
    """

    def transform(layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        r = rot[layer, ROLES.index(role)].to(x)[None]  # (1, H, D, D)
        return inner(layer, role, x @ r) @ r.transpose(-1, -2)

    return transform


def projected_transform(inner: KVTransform, bases: KVBases, rank: int) -> KVTransform:
    """Rank reduction then quantization: coefficients `c = (x − μ) U_r` `(B, H, T, r)` go through `inner` (a
    quantizer laid out for head_dim `r`), `x̂ = μ + ĉ U_rᵀ`."""

    def transform(layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        u = bases.vectors[layer, ROLES.index(role), :, :, :rank].to(x)[None]  # (1, H, D, r)
        mu = bases.mean[layer, ROLES.index(role)].to(x)[None, :, None, :]
        coeff = (x - mu) @ u
        return mu + inner(layer, role, coeff) @ u.transpose(-1, -2)

    return transform
