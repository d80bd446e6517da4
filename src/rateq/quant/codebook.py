"""Codebook quantizers: groups of c channels stored as the index of their nearest learned centroid.

`encode(g, C)` codes groups `g (B, h, T, G, c)` against one codebook per head and group, `C (h, G, K, c)`: the
centroid at the smallest squared distance Σ_j (x_j − μ_j)², summed coordinate by coordinate in order with
correctly rounded elementwise operations only — the same bits for one token or a thousand, so the cache's codes
equal the one-pass evaluation's — the lowest index on ties; `decode` looks the centroids up. Codebooks are learned
in calibration (`rateq.quant.kmeans`, `rateq.calibrate.learn`).

On the CPU `encode` takes the codes from the native nearest-centroid kernel (`rateq.quant.nearest`), which forms
exactly these distances — coordinate by coordinate in order, separately rounded operations, the lowest index on
ties — for every centroid of a point in registers, storing none of them. Elsewhere, or where it does not run (no C
compiler, `RATEQ_KERNELS=torch`), the torch path below gives the same codes.

Forming every distance element by element in torch costs c passes over (tokens × K × c) values. The torch path
first scores all centroids with one batched matmul, ‖μ‖² − 2 x·μ (the distance less ‖x‖², which no centroid
changes), and keeps its argmin wherever no other centroid scores within the matmul's worst-case rounding error of
it; only the points where one does (near-ties, a small share) get the element-by-element distances. Both the
matmul's error (any summation order, FMA or not: (c + 1)·u·(Σ|terms|) at most, u the unit roundoff — TF32's or
bf16's where torch's matmul precision setting lets it use them) and the exact form's (c squares summed in order)
are bounded by a multiple of u·(‖x‖² + 2 max‖μ‖²), so a centroid outside that margin can never be the exact form's
argmin: the codes are the exact ones, only faster.
"""

from __future__ import annotations

import torch

from . import nearest

_CHUNK = 1 << 22  # distance elements formed at once


def _distances(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Points `(m, c)` and each one's centroids `(m, K, c)` → squared distances `(m, K)`, summed coordinate by
    coordinate in order (separate subtract, square and add: no fused or reordered arithmetic, whatever the shape)."""
    d = (x[:, None, 0] - C[..., 0]).square_()
    for j in range(1, x.shape[-1]):
        d.add_((x[:, None, j] - C[..., j]).square_())
    return d


def _matmul_roundoff(device: torch.device) -> float:
    """Unit roundoff of an fp32 matmul here: 2^-24, unless torch may compute it in TF32 (2^-11) or bf16 (2^-8)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0 ** -8
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return 2.0 ** -11
    return 2.0 ** -24


def encode(g: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Groups `(B, h, T, G, c)` fp32 → codes `(B, h, T, G)` int64 of the nearest centroids of `C (h, G, K, c)`."""
    B, h, T, G, c = g.shape
    K, P, n = C.shape[2], h * G, B * T
    cb = C.to(g.device, torch.float32).reshape(P, K, c)
    x = g.to(torch.float32).permute(1, 3, 0, 2, 4).reshape(P, n, c)
    found = nearest.nearest(x, cb, None)  # the native kernel: the exact codes
    if found is not None:
        return found[0].view(h, G, B, T).permute(2, 0, 3, 1)
    norms = cb.square().sum(-1)  # (P, K)
    # [x, 1] · [−2μ, ‖μ‖²]: one batched matmul per chunk of tokens scores every centroid of every (head, group)
    weight = torch.cat([-2 * cb, norms.unsqueeze(-1)], -1).transpose(1, 2)  # (P, c + 1, K)
    # Worst-case rounding of both forms, with room to spare: 8 (c + 4) u (‖x‖² + 2 max‖μ‖²).
    margin = 8 * (c + 4) * _matmul_roundoff(g.device)
    largest = 2 * norms.max(-1, keepdim=True).values  # (P, 1)
    xa = torch.cat([x, torch.ones(P, n, 1, device=g.device)], -1)  # [x, 1], formed once
    out = torch.empty(P, n, dtype=torch.int64, device=g.device)
    step = max(1, _CHUNK // max(1, P * K))
    for s in range(0, n, step):
        xs = x[:, s:s + step]
        score = torch.bmm(xa[:, s:s + step], weight)  # (P, t, K)
        best, idx = score.min(-1)
        out[:, s:s + step] = idx
        if K == 1:
            continue
        runner_up = score.scatter_(-1, idx.unsqueeze(-1), float("inf")).amin(-1)
        near = (runner_up - best <= margin * (xs.square().sum(-1) + largest) + 1e-30).nonzero()
        if near.numel():  # near-ties: the exact distances decide
            p, r = near.unbind(1)
            out[p, s + r] = _distances(xs[p, r], cb[p]).argmin(-1)
    return out.view(h, G, B, T).permute(2, 0, 3, 1)


def decode(codes: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Codes `(B, h, T, G)` → centroids `(B, h, T, G, c)` fp32 from `C (h, G, K, c)`."""
    B, h, T, G = codes.shape
    K, c = C.shape[2], C.shape[3]
    flat = C.to(codes.device, torch.float32).reshape(h * G * K, c)
    base = (torch.arange(h, device=codes.device).view(1, h, 1, 1) * G
            + torch.arange(G, device=codes.device).view(1, 1, 1, G)) * K
    return flat[(codes.to(torch.int64) + base).reshape(-1)].view(B, h, T, G, c)
