"""Codebook learning speed: Lloyd's k-means (`rateq.quant.kmeans.learn_unit_codebooks`) with the native
nearest-centroid kernel (`rateq.quant.nearest`) against the torch path (`RATEQ_KERNELS=torch`: one matmul per chunk
of problems, then argmin), in one process, on the calibration's call shape: 3 KV heads × 64 channels
(smollm2-135m), `--tokens` points per unit (the calibration keeps 2048), per-element Fisher weights, the
calibration's 15 Lloyd steps at most, every width calibration learns for `codebook-g2`, `-g4` and `-g8` (b bits per
channel, b·c ≤ 8: 4 to 256 centroids).

The points are synthetic (no model needed): heavy-tailed (Student-t, 3 degrees of freedom), channels of unequal
spread with neighbouring channels correlated, weights squared Gaussians. Each row gives the median seconds of
`--repeats` runs of each path, their ratio, whether both learned the same codebooks, and (when not) the weighted
error of the torch path's codebooks relative to the native ones' (above 1: the native ones fit better). The torch
path takes near-ties by the matmul's rounding, the kernel by the exact distances, so the two may part at a
near-tie and end in different, equally good, local optima.

    python bench/kmeans_speed.py
    python bench/kmeans_speed.py --tokens 4096 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rateq.calibrate.learn import CODEBOOK_ITERS
from rateq.quant import kmeans, nearest

WIDTHS = ((2, 1), (2, 2), (2, 3), (2, 4), (4, 1), (4, 2), (8, 1))  # (channels per code, bits per channel)


def data(heads: int, tokens: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(heads, tokens, dim, generator=g)
    chi2 = torch.randn(heads, tokens, dim, 3, generator=g).square().sum(-1)
    t = z / (chi2 / 3).sqrt()
    x = (t + 0.6 * t.roll(1, -1)) * torch.linspace(0.2, 3.0, dim)  # neighbouring channels correlated
    w = torch.randn(heads, tokens, dim, generator=g).square() + 1e-4
    return x, w


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def error(x: torch.Tensor, w: torch.Tensor, books: torch.Tensor, c: int) -> float:
    """Σ w (x − μ)² of every unit's points at their nearest centroids (exact distances)."""
    P, n, D = x.shape
    G = D // c
    xb = x.reshape(P, n, G, c).permute(0, 2, 1, 3).reshape(P * G, n, c).contiguous()
    wb = w.reshape(P, n, G, c).permute(0, 2, 1, 3).reshape(P * G, n, c).contiguous()
    return float(kmeans._nearest(xb, books.reshape(P * G, -1, c), wb)[1].double().sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=CODEBOOK_ITERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("RATEQ_KERNELS", None)
    if nearest.library() is None:
        raise SystemExit(f"no native kernel here ({nearest.build_error() or 'no C compiler'})")
    x, w = data(args.heads, args.tokens, args.head_dim)
    print(f"{args.heads} heads x {args.tokens} tokens x {args.head_dim} channels, per-element weights, "
          f"{args.iters} Lloyd steps at most, {args.threads} threads; median of {args.repeats}")
    print(f"{'channels/code':>13} {'bits/ch':>7} {'centroids':>9} {'native s':>9} {'torch s':>8} {'speed-up':>9}"
          f"  same codebooks  torch/native error")
    total = [0.0, 0.0]
    for c, bits in WIDTHS:
        def learn():
            return kmeans.learn_unit_codebooks(x, bits, c, w, seed=0, iters=args.iters)

        fast, a = timed(learn, args.repeats)
        os.environ["RATEQ_KERNELS"] = "torch"
        try:
            slow, b = timed(learn, args.repeats)
        finally:
            del os.environ["RATEQ_KERNELS"]
        total[0] += fast
        total[1] += slow
        same = torch.equal(a, b)
        ratio = "" if same else f"{error(x, w, b, c) / error(x, w, a, c):.6f}"
        print(f"{c:>13} {bits:>7} {1 << (bits * c):>9} {fast:>9.2f} {slow:>8.2f} {slow / fast:>8.1f}x"
              f"  {str(same):>14}  {ratio:>18}")
    print(f"{'all':>13} {'':>7} {'':>9} {total[0]:>9.2f} {total[1]:>8.2f} {total[1] / total[0]:>8.1f}x")


if __name__ == "__main__":
    main()
