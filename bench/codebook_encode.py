"""Codebook encoding speed: `rateq.quant.codebook.encode` (on the CPU the native nearest-centroid kernel; with
`RATEQ_KERNELS=torch` its torch path, one batched matmul and exact distances at near-ties only) against forming
every distance element by element (the definition both reproduce), in one process, on the shapes calibration and
the cache code: 3 KV heads × 64 channels (smollm2-135m), every coupled width up to 256 centroids. Each row checks
that both give the same codes.

    python bench/codebook_encode.py
    RATEQ_KERNELS=torch python bench/codebook_encode.py                     # the torch path
    python bench/codebook_encode.py --tokens 4096 --heads 8 --head-dim 128   # a Qwen3-8B layer
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rateq.quant import codebook


def by_definition(g: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Every (point, centroid) distance summed coordinate by coordinate, the first of equal minima."""
    B, h, T, G, c = g.shape
    K = C.shape[2]
    x = g.permute(1, 3, 0, 2, 4).reshape(h * G, B * T, c)
    cb = C.reshape(h * G, K, c)
    out = torch.empty(h * G, B * T, dtype=torch.int64)
    for p in range(h * G):
        for s in range(0, B * T, 256):
            xs = x[p, s:s + 256]
            out[p, s:s + 256] = codebook._distances(xs, cb[p].expand(xs.shape[0], K, c)).argmin(-1)
    return out.view(h, G, B, T).permute(2, 0, 3, 1)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{args.tokens} tokens x {args.heads} heads x {args.head_dim} channels, {args.threads} threads; "
          "median of", args.repeats)
    print(f"{'channels/code':>13} {'centroids':>9} {'encode ms':>10} {'definition ms':>14} {'speed-up':>9}  same codes")
    for c, bits in ((1, 4), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)):
        G, K = args.head_dim // c, 1 << (bits * c)
        x = torch.randn(1, args.heads, args.tokens, G, c, generator=g) * torch.linspace(0.3, 3, c)
        C = torch.randn(args.heads, G, K, c, generator=g) * torch.linspace(0.3, 3, c)
        fast, a = timed(lambda: codebook.encode(x, C), args.repeats)
        slow, b = timed(lambda: by_definition(x, C), args.repeats)
        print(f"{c:>13} {K:>9} {1e3 * fast:>10.2f} {1e3 * slow:>14.2f} {slow / fast:>8.1f}x  {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
