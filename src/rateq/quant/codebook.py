"""Codebook quantizers: groups of c channels stored as the index of their nearest learned centroid.

`encode(g, C)` codes groups `g (B, h, T, G, c)` against one codebook per head and group, `C (h, G, K, c)`, by the
exact squared distance (formed element by element and summed over the c coordinates, the same for one token or
a thousand: the cache's codes equal the one-pass evaluation's), the lowest index on ties; `decode` looks the
centroids up. Codebooks are learned in calibration (`rateq.quant.kmeans`, `rateq.calibrate.learn`).
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 22  # distance elements formed at once


def encode(g: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Groups `(B, h, T, G, c)` fp32 → codes `(B, h, T, G)` int64 of the nearest centroids of `C (h, G, K, c)`."""
    B, h, T, G, c = g.shape
    K = C.shape[2]
    cb = C.to(g.device, torch.float32).view(1, h, 1, G, K, c)
    step = max(1, _CHUNK // max(1, B * h * G * K * c))
    out = torch.empty(B, h, T, G, dtype=torch.int64, device=g.device)
    for t in range(0, T, step):
        d = (g[:, :, t:t + step].unsqueeze(-2) - cb).square_().sum(-1)  # (B, h, t, G, K)
        out[:, :, t:t + step] = d.argmin(-1)
    return out


def decode(codes: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Codes `(B, h, T, G)` → centroids `(B, h, T, G, c)` fp32 from `C (h, G, K, c)`."""
    B, h, T, G = codes.shape
    K, c = C.shape[2], C.shape[3]
    flat = C.to(codes.device, torch.float32).reshape(h * G * K, c)
    base = (torch.arange(h, device=codes.device).view(1, h, 1, 1) * G
            + torch.arange(G, device=codes.device).view(1, 1, 1, G)) * K
    return flat[(codes.to(torch.int64) + base).reshape(-1)].view(B, h, T, G, c)
