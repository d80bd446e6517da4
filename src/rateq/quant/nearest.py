"""Native nearest-centroid search on the CPU: `nearest.c`, for k-means (`rateq.quant.kmeans`) and codebook
encoding (`rateq.quant.codebook`).

`nearest(x, C, w)` gives, for G problems of points `x (G, n, c)` and centroids `C (G, k, c)`, each point's nearest
centroid and its weighted squared error — bit for bit what `kmeans._nearest_torch` computes (Σ_j w_j (x_j − μ_j)²
summed coordinate by coordinate in order with separately rounded operations, the first of equal minima), without
forming the (n, k) distances, over the threads torch uses. The source is compiled on first use for this CPU
(`rateq.native`: cached, keyed by source and machine) without contraction into fused multiply-adds, which is what
makes its sums those of the elementwise definition. It gives None — the caller's torch path then serves — off the
CPU, for other dtypes, more than `MAX_C` coordinates, values it does not take (not finite, |x| or |μ| ≥ 2^62,
negative weights), where no compiler is found or the build fails, and under `RATEQ_KERNELS=torch`.

`seeding(x, w)` gives the step of k-means++ seeding for those points (or None likewise): lower each point's
distance to the nearest centroid so far with the centroid just placed, and draw the next one ∝ that distance —
bit for bit `kmeans._distance`, `torch.minimum` and `kmeans._draw` with the same uniforms, in one pass.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("nearest.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
MAX_C = 16  # coordinates per point the kernel takes (its MAX_C)
MAX_K = (1 << 31) - 2  # centroids per problem (int32 indices inside)
_BOUND = 2.0 ** 62  # |x|, |μ| below this: no difference squares to +inf, so no distance is NaN (0 · inf)
_WEIGHTS = {None: 0, "point": 1, "coord": 2}

_state: dict = {}


def _build() -> Path | None:
    return native.build(SOURCE, FLAGS, _state)


def _declare(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.rq_nearest.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int32, ptr, ptr, ctypes.c_int32]
    lib.rq_nearest.restype = ctypes.c_int
    lib.rq_seed_step.argtypes = [i64, i64, i64, ptr, ptr, ctypes.c_int32, ptr, i64, ptr, ptr, ptr, ctypes.c_int32]
    lib.rq_seed_step.restype = ctypes.c_int


def library():
    """The loaded kernel (`ctypes.CDLL`), or None: no compiler, a failed build, or `RATEQ_KERNELS=torch`."""
    return native.load(_state, _build, _declare)


def build_error() -> str | None:
    """Why `library()` is None after a failed build (the compiler's last line), if it failed."""
    return native.build_error(_state)


def _bounded(t: torch.Tensor) -> bool:
    """Every |value| below `_BOUND`: one pass, no copy (NaN compares false)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return float(lo) > -_BOUND and float(hi) < _BOUND


def _weights(w: torch.Tensor) -> bool:
    """Every weight in [0, inf) (NaN compares false)."""
    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w)
    return float(lo) >= 0 and float(hi) < float("inf")


def _runs(x: torch.Tensor, w: torch.Tensor | None, C: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes points `x (G, n, c)`, weights `w` and centroids `C` (see the module's docstring)."""
    tensors = [t for t in (x, C, w) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if x.dim() != 3 or not 1 <= x.shape[2] <= MAX_C:
        return False
    if w is not None and (w.dim() != 3 or w.shape[:2] != x.shape[:2] or w.shape[-1] not in (1, x.shape[2])):
        return False
    if library() is None or not all(_bounded(t) for t in (x, C) if t is not None):
        return False
    return w is None or _weights(w)


def nearest(x: torch.Tensor, C: torch.Tensor,
            w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes `(G, n)` int64 of the nearest centroids `C (G, k, c)` of points `x (G, n, c)` and each point's error
    `(G, n)` fp32, as `kmeans._nearest_torch` gives them; weights `w` None, `(G, n, 1)` per point (not used for
    the choice; the error is scaled by it) or `(G, n, c)` per coordinate (c > 1). None where the kernel does not
    run (see the module's docstring); inputs need not be contiguous."""
    if x.dim() != 3 or C.dim() != 3 or C.shape[0] != x.shape[0] or C.shape[2] != x.shape[2]:
        return None
    G, n, c = x.shape
    k = C.shape[1]
    if not 1 <= k <= MAX_K or not _runs(x, w, C):
        return None
    mode = None if w is None else "coord" if w.shape[-1] > 1 else "point"
    x, C = x.contiguous(), C.contiguous()
    w = None if w is None else w.contiguous()
    codes = torch.empty(G, n, dtype=torch.int64)
    err = torch.empty(G, n, dtype=torch.float32)
    rc = library().rq_nearest(G, n, c, k, x.data_ptr(), C.data_ptr(), None if w is None else w.data_ptr(),
                              _WEIGHTS[mode], codes.data_ptr(), err.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"internal: rq_nearest refused G={G} n={n} c={c} k={k}")
    return codes, err


def seeding(x: torch.Tensor, w: torch.Tensor | None):
    """The k-means++ step for points `x (G, n, c)` and weights `w` (None, per point or per coordinate), or None
    where the kernel does not run: `step(mu, d, u)` lowers `d (G, n)` fp32 (contiguous, updated in place) to each
    point's distance to `mu (G, c)`, one of the points per problem (so within the kernel's range), where smaller, and returns the points drawn `(G,)` int64 ∝ the new
    `d` with the uniforms `u (G, 1)` float64 — what `kmeans._draw(torch.minimum(d, kmeans._distance(x, mu, w)))`
    gives with those uniforms."""
    if x.numel() == 0 or not _runs(x, w):
        return None
    G, n, c = x.shape
    x = x.contiguous()
    w = None if w is None else w.contiguous()
    mode = _WEIGHTS[None if w is None else "coord" if w.shape[-1] > 1 else "point"]
    lib = library()

    def step(mu: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if (mu.shape != (G, c) or mu.stride(1) != 1 or mu.dtype != torch.float32 or d.shape != (G, n)
                or not d.is_contiguous() or u.dtype != torch.float64):
            raise ValueError("internal: a k-means++ step out of shape")
        u = u.contiguous()
        drawn = torch.empty(G, dtype=torch.int64)
        rc = lib.rq_seed_step(G, n, c, x.data_ptr(), None if w is None else w.data_ptr(), mode, mu.data_ptr(),
                              mu.stride(0), d.data_ptr(), u.data_ptr(), drawn.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"internal: rq_seed_step refused G={G} n={n} c={c}")
        return drawn

    return step
