"""Codebooks learned in calibration by Fisher-weighted k-means: scalar levels and coupled channels.

A codebook learned once and stored in the profile quantizes a unit's K or V with no per-token metadata: 2^b levels
for single values (one codebook per unit, or per channel), or 2^(b·c) centroids for c channels coded jointly, one
codebook per group of c channels (Coupled Quantization, Zhang et al., NeurIPS 2024: channels are interdependent,
so coding them jointly costs fewer bits than coding each alone). Both minimize the weighted squared error

    Σ_i Σ_j w_ij (x_ij − μ_j)²,

w_ij the Fisher information of element (i, j) — the squared gradient of the loss with respect to it, summed over
calibration — i.e. the diagonal Fisher approximation of the loss increase, which KVQuant (Hooper et al., NeurIPS
2024) minimizes by weighted k-means to learn its non-uniform datatypes. A weight per point, `(n,)`, scales all of
its coordinates alike.

Lloyd's iteration on that objective: each point goes to the centroid at the smallest weighted distance, each
centroid moves to the weighted mean of its points coordinate by coordinate (the exact minimizer for a fixed
assignment), so the error never increases; a step that would raise it through rounding is not taken. Centroids
left with no weight are re-seeded one at a time, each at the point of largest weighted error under the centroids
placed so far. Iteration stops when the error improves by less than `tol` of itself.

Deterministic: the only randomness (the subset of calibration points, k-means++ seeding) comes from a
`torch.Generator` seeded with `seed`, and the update's sums are accumulated in float64 in point order, so a seed
gives bit-identical codebooks on one machine (on CUDA under `torch.use_deterministic_algorithms(True)`, whose
scatter-add keeps that order). Codebooks come back sorted: scalar levels ascending, vectors lexicographically.

Nearest centroids, while learning and in `assign`, come on the CPU from a native kernel (`rateq.quant.nearest`,
`nearest.c` compiled on first use): each point's distances to every centroid summed coordinate by coordinate in
order with separately rounded operations, the first of equal minima, none of the (n, k) distances stored — bit for
bit the torch definition `_nearest_torch`, whatever the chunking, the number of threads or the CPU's vector width.
Where it does not run (no C compiler, a failed build, `RATEQ_KERNELS=torch`, CUDA tensors), `assign` uses that
definition and learning one matmul per chunk of whole problems (`_nearest_matmul`, several times faster than the
definition in torch: a near-tie may go either way, by the machine's rounding, so codebooks learned there may
differ in their last bits from the native ones). k-means++ seeding takes each draw's distances, minima and running
sum in one native pass too (`nearest.seeding`), with the same uniforms and the same result as in torch.

Memory: the learners copy at most `sample` calibration points (a seeded random subset, drawn before anything is
copied); the torch paths form distances in chunks of at most `_CHUNK` (point, centroid) pairs
(`_CHUNK_ACCELERATOR` off the CPU; while learning, `_LEARN_CHUNK` or one problem's), the native kernel none, so a
run holds O(sample · (c + k)) values however large the calibration set (plus the n indices the subset is drawn
from). One Lloyd step costs O(n · k · c); k-means++ seeding costs as much once, in k sequential draws; the grid
start (`init="grid"`) costs one sort per coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import nearest

MAX_CENTROIDS = 1 << 16  # largest codebook per group: 2^16 centroids, codes of at most 16 bits
_CHUNK = 1 << 18  # (point, centroid) distances formed at once on the CPU (1 MiB of fp32: stays in cache)
_CHUNK_ACCELERATOR = 1 << 24  # elsewhere, where each chunk is a kernel launch
_LEARN_CHUNK = 1 << 20  # (point, centroid) scores per matmul while learning (whole problems only)
INITS = ("kmeans++", "quantiles", "grid", "random")


@dataclass(frozen=True)
class KMeansResult:
    """What a run reached: `error` the weighted squared error of the returned centroids (each point at its
    nearest), `iters` the Lloyd updates taken, `converged` whether the error stopped improving before `iters`
    ran out."""

    error: float
    iters: int
    converged: bool


# -- the batched core: G independent problems, x (G, n, c), weights (G, n, c | 1) or None --------------------------

def _nearest(x: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `(G, n)` int64 of the nearest centroids `C (G, k, c)` and each point's weighted error `(G, n)`: the
    native kernel (`rateq.quant.nearest`) where it runs, else `_nearest_torch` — the same bits either way."""
    found = nearest.nearest(x, C, w)
    return found if found is not None else _nearest_torch(x, C, w)


def _nearest_torch(x: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, in torch: d = s_0 + s_1 + … + s_{c−1}, s_j = (x_j − μ_j)² (· w_j per coordinate), every
    operation separately rounded (no fused multiply-add, whatever the CPU), summed in coordinate order; the first
    of equal minima. So a point's code and error depend neither on the chunking nor on the machine. A weight per
    point does not change which centroid is nearest, so it only scales the error."""
    G, n, c = x.shape
    k = C.shape[1]
    per_coord = w is not None and w.shape[-1] > 1
    codes = torch.empty(G, n, dtype=torch.int64, device=x.device)
    err = torch.empty(G, n, dtype=torch.float32, device=x.device)
    chunk = _CHUNK if x.device.type == "cpu" else _CHUNK_ACCELERATOR
    gb = max(1, min(G, chunk // k))
    m = max(1, chunk // (gb * k))
    for g0 in range(0, G, gb):
        Cg = C[g0:g0 + gb].unsqueeze(1)  # (g, 1, k, c)
        for s in range(0, n, m):
            xs = x[g0:g0 + gb, s:s + m].unsqueeze(2)  # (g, m, 1, c)
            ws = w[g0:g0 + gb, s:s + m].unsqueeze(2) if per_coord else None
            d = None
            for j in range(c):
                t = (xs[..., j] - Cg[..., j]).square_()  # (g, m, k)
                if ws is not None:
                    t.mul_(ws[..., j])
                d = t if d is None else d.add_(t)
            dmin, idx = d.min(-1)  # the first of equal minima
            codes[g0:g0 + gb, s:s + m] = idx
            err[g0:g0 + gb, s:s + m] = dmin
    if w is not None and not per_coord:
        err.mul_(w[..., 0])
    return codes, err


def _nearest_learning(x: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest centroids for Lloyd's iteration: the native kernel's exact ones (`_nearest`) where it runs,
    else `_nearest_matmul`'s."""
    found = nearest.nearest(x, C, w)
    return found if found is not None else _nearest_matmul(x, C, w)


def _nearest_matmul(x: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_nearest` by matmul, the torch path while learning: the same codes up to rounding on near-ties, several
    times faster than `_nearest_torch`.

    Σ_j w_j (x_j − μ_j)² = Σ_j w_j x_j² − 2 Σ_j w_j x_j μ_j + Σ_j w_j μ_j²: the first term does not depend on the
    centroid, the others are one matmul of `[w ⊙ x, w]` with `[−2μ, μ²]`. Problems are scored whole (never split
    along points), so a problem's codes depend only on its own data; the errors returned are recomputed at the
    chosen centroids (summed in torch's order, which may round differently from `_nearest`'s)."""
    G, n, c = x.shape
    k = C.shape[1]
    per_coord = w is not None and w.shape[-1] > 1
    a = torch.cat([x * w, w], -1) if per_coord else torch.cat([x, torch.ones_like(x[..., :1])], -1)
    b = torch.cat([-2 * C, C.square()], -1) if per_coord else torch.cat([-2 * C, C.square().sum(-1, keepdim=True)], -1)
    codes = torch.empty(G, n, dtype=torch.int64, device=x.device)
    gb = max(1, _LEARN_CHUNK // max(1, n * k))
    for g0 in range(0, G, gb):
        codes[g0:g0 + gb] = torch.bmm(a[g0:g0 + gb], b[g0:g0 + gb].transpose(1, 2)).argmin(-1)
    mu = C.gather(1, codes.unsqueeze(-1).expand(G, n, c))
    err = (x - mu).square_()
    err = (err.mul_(w) if per_coord else err).sum(-1)
    if w is not None and not per_coord:
        err.mul_(w[..., 0])
    return codes, err


def _distance(x: torch.Tensor, mu: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Weighted squared distance `(G, n)` of every point to one centroid per problem, `mu (G, c)`."""
    d = None
    for j in range(x.shape[-1]):
        t = (x[..., j] - mu[:, j:j + 1]).square_()
        if w is not None and w.shape[-1] > 1:
            t.mul_(w[..., j])
        d = t if d is None else d.add_(t)
    return d if w is None or w.shape[-1] > 1 else d.mul_(w[..., 0])


def _update(x: torch.Tensor, w: torch.Tensor | None, codes: torch.Tensor,
            C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every centroid at the weighted mean of its points, per coordinate; `(centroids, empty (G, k))`, where empty
    centroids (no weight) and coordinates with no weight keep their value."""
    G, k, c = C.shape
    flat = (codes + torch.arange(G, device=x.device).unsqueeze(1) * k).reshape(-1)
    wx = x if w is None else x * w
    num = torch.zeros(G * k, c, dtype=torch.float64, device=x.device).index_add_(0, flat, wx.reshape(-1, c).double())
    if w is None:
        den = torch.bincount(flat, minlength=G * k).double().unsqueeze(1)
    else:
        den = torch.zeros(G * k, w.shape[-1], dtype=torch.float64, device=x.device)
        den.index_add_(0, flat, w.reshape(-1, w.shape[-1]).double())
    new = torch.where(den > 0, num / den, C.reshape(-1, c).double()).float().reshape(G, k, c)
    return new, (den.sum(1) == 0).reshape(G, k)


def _reseed(x: torch.Tensor, w: torch.Tensor | None, C: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Empty centroids moved, one after another, onto the point of largest weighted error under the centroids
    placed so far (farthest-first), so that two of them do not land in the same stray cluster."""
    if not bool(empty.any()):
        return C
    G = x.shape[0]
    rows = torch.arange(G, device=x.device)
    # errors against the non-empty centroids: each empty one stands in as a copy of its group's first non-empty
    first = (~empty).to(torch.uint8).argmax(1)
    C = torch.where(empty.unsqueeze(-1), C[rows, first].unsqueeze(1), C)
    _, err = _nearest_learning(x, C, w)
    count = empty.sum(1)
    slot = torch.where(empty, empty.cumsum(1) - 1, -1)  # (G, k): the i-th empty centroid of a group has slot i
    for i in range(int(count.max())):
        has = count > i
        pos = (slot == i).to(torch.uint8).argmax(1)  # the centroid filled now (any, where the group has none)
        mu = x[rows, err.argmax(1)]  # (G, c): the first point of largest error
        C[rows[has], pos[has]] = mu[has]
        err = torch.where(has.unsqueeze(1), torch.minimum(err, _distance(x, mu, w)), err)
    return C


def _draw(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of `p (G, n)`, with probability ∝ p (uniform where a row is all zero): one seeded uniform
    per row found in the row's cumulative sum (float64, so that no point of positive mass is skipped)."""
    p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))
    cum = p.double().cumsum(1)
    u = torch.rand(p.shape[0], 1, generator=gen, device=p.device, dtype=torch.float64) * cum[:, -1:]
    return torch.searchsorted(cum, u, right=True).squeeze(1).clamp_(max=p.shape[1] - 1)


def _init_kmeanspp(x: torch.Tensor, w: torch.Tensor | None, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii, 2007) under the weighted distance: the first centroid drawn ∝ a point's
    weight, each next one ∝ its weighted squared distance to the nearest centroid so far."""
    G, n, c = x.shape
    rows = torch.arange(G, device=x.device)
    C = torch.empty(G, k, c, device=x.device)
    mass = torch.ones(G, n, device=x.device) if w is None else w.sum(-1).expand(G, n).contiguous()
    C[:, 0] = x[rows, _draw(mass, gen)]
    step = nearest.seeding(x, w) if k > 1 else None
    if step is not None:  # the native kernel: the same distances, minima and draws in one pass per centroid
        d = torch.full((G, n), float("inf"))
        for t in range(1, k):
            u = torch.rand(G, 1, generator=gen, device=x.device, dtype=torch.float64)  # as `_draw` takes it
            C[:, t] = x[rows, step(C[:, t - 1], d, u)]
        return C
    d = _distance(x, C[:, 0], w)
    for t in range(1, k):
        C[:, t] = x[rows, _draw(d, gen)]
        d = torch.minimum(d, _distance(x, C[:, t], w))
    return C


def _init_quantiles(x: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor:
    """Scalar levels at the weighted quantiles (i + 1/2)/k: a start already spread like the data, with no draw."""
    v, order = x[..., 0].sort(1)
    if w is None:
        mass = torch.ones_like(v, dtype=torch.float64)
    else:
        mass = w[..., 0].expand_as(v).gather(1, order).double()
    cum = mass.cumsum(1)
    q = (torch.arange(k, device=x.device, dtype=torch.float64) + 0.5) / k * cum[:, -1:]
    idx = torch.searchsorted(cum, q).clamp_(max=v.shape[1] - 1)
    return v.gather(1, idx).unsqueeze(-1)


def _init_grid(x: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor:
    """For c coordinates and k = m^c centroids: every combination of each coordinate's m weighted-quantile levels —
    the product of per-channel scalar codebooks, a start as good as coding the channels apart, with no draw."""
    G, n, c = x.shape
    m = round(k ** (1 / c))
    if m ** c != k:
        raise ValueError(f"a grid start needs k = m^c centroids, got k={k} for c={c}")
    levels = [_init_quantiles(x[..., j:j + 1], None if w is None else w[..., j:j + 1] if w.shape[-1] > 1 else w,
                              m)[..., 0] for j in range(c)]  # c × (G, m)
    mesh = torch.meshgrid(*[torch.arange(m, device=x.device)] * c, indexing="ij")
    return torch.stack([lv[:, ix.reshape(-1)] for lv, ix in zip(levels, mesh)], -1)  # (G, m^c, c)


def _init_random(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct points (all of them, then repeats, when there are fewer than k)."""
    n = x.shape[1]
    idx = torch.randperm(n, generator=gen, device=x.device).repeat(-(-k // n))[:k]
    return x[:, idx]


def _sort(C: torch.Tensor) -> torch.Tensor:
    """Centroids of each problem in lexicographic order (scalar levels: ascending), by stable sorts from the last
    coordinate to the first."""
    c = C.shape[-1]
    for j in reversed(range(c)):
        idx = C[..., j].argsort(dim=1, stable=True)
        C = C.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))
    return C


def _lloyd(x: torch.Tensor, w: torch.Tensor | None, C: torch.Tensor, iters: int,
           tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's iteration from `C (G, k, c)` → (centroids, error (G,) float64, iterations (G,), converged (G,)).
    Each problem stops on its own; only those still improving are computed."""
    G = x.shape[0]
    C = C.clone()
    codes, err = _nearest_learning(x, C, w)
    total = err.double().sum(1)
    steps = torch.zeros(G, dtype=torch.int64)
    converged = (total == 0).cpu()
    active = (~converged).nonzero().squeeze(1).to(x.device)
    for _ in range(iters):
        if active.numel() == 0:
            break
        xa, wa = x[active], None if w is None else w[active]
        Ca, empty = _update(xa, wa, codes[active], C[active])
        Ca = _reseed(xa, wa, Ca, empty)
        ca, ea = _nearest_learning(xa, Ca, wa)
        ta = ea.double().sum(1)
        before = total[active]
        better = ta <= before  # false only through rounding: keep the previous centroids then
        take = active[better]
        C[take], codes[take], err[take], total[take] = Ca[better], ca[better], ea[better], ta[better]
        steps[take.cpu()] += 1
        done = (~better) | (before - ta <= tol * before) | (ta == 0)
        converged[active[done].cpu()] = True
        active = active[~done]
    return C, total, steps, converged


def _prepare_weights(w: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Weights as `(G, n, c)` or `(G, n, 1)` fp32. A coordinate whose weights are all zero carries no preference, so
    it counts as unweighted (weight 1) there."""
    if w is None:
        return None
    w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("k-means weights must be finite and non-negative")
    w = w.expand(*shape[:2], w.shape[-1])
    return torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))


def _run(x: torch.Tensor, w: torch.Tensor | None, k: int, *, init, seed: int, gen: torch.Generator | None,
         iters: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    G, n, c = x.shape
    if k < 1:
        raise ValueError(f"k-means needs at least one centroid, got k={k}")
    if n < 1:
        raise ValueError("k-means needs at least one point")
    if k > MAX_CENTROIDS:
        raise ValueError(f"a codebook of {k} centroids is too large (at most {MAX_CENTROIDS})")
    if gen is None:
        gen = torch.Generator(device=x.device).manual_seed(seed)
    if isinstance(init, torch.Tensor):
        if init.shape not in ((k, c), (G, k, c)):
            raise ValueError(f"starting centroids must be ({k}, {c}), got {tuple(init.shape)}")
        C = init.to(x.device, torch.float32).expand(G, k, c)
    elif init == "kmeans++":
        C = _init_kmeanspp(x, w, k, gen)
    elif init == "quantiles":
        if c != 1:
            raise ValueError(f"quantile initialization is for scalar codebooks (c = 1), not c = {c}")
        C = _init_quantiles(x, w, k)
    elif init == "grid":
        C = _init_grid(x, w, k)
    elif init == "random":
        C = _init_random(x, k, gen)
    else:
        raise ValueError(f"unknown k-means init {init!r}: one of {', '.join(INITS)}, or a (k, c) tensor")
    C, total, steps, converged = _lloyd(x, w, C, iters, tol)
    return _sort(C), total, steps, converged


def _subset(n: int, sample: int | None, gen: torch.Generator, device) -> torch.Tensor | None:
    """Indices (ascending) of a seeded random subset of `sample` of `n` points; None when all of them fit."""
    if sample is None or n <= sample:
        return None
    if sample < 1:
        raise ValueError(f"sample must be positive, got {sample}")
    return torch.randperm(n, generator=gen, device=device)[:sample].sort().values


# -- public API -------------------------------------------------------------------------------------------------

def weighted_kmeans(x: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, iters: int = 100,
                    tol: float = 1e-5, seed: int = 0,
                    init: str | torch.Tensor = "kmeans++") -> tuple[torch.Tensor, KMeansResult]:
    """k centroids `(k, c)` fp32 of points `x (n, c)` minimizing Σ w (x − μ)², sorted; and what the run reached.

    `weights` `(n,)` per point or `(n, c)` per coordinate, non-negative (Fisher information), None for plain squared
    error. `init`: `kmeans++`, `quantiles` (c = 1), `random`, or starting centroids `(k, c)`. Every given point is
    used (the learners below subsample)."""
    if x.dim() != 2:
        raise ValueError(f"weighted_kmeans takes points (n, c), got shape {tuple(x.shape)}")
    xb = x.to(torch.float32).unsqueeze(0)
    wb = None
    if weights is not None:
        wb = weights.reshape(x.shape[0], -1)
        if wb.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"weights must be (n,) or (n, c) for points {tuple(x.shape)}, got {tuple(weights.shape)}")
        wb = _prepare_weights(wb.unsqueeze(0), xb.shape)
    C, total, steps, converged = _run(xb, wb, k, init=init, seed=seed, gen=None, iters=iters, tol=tol)
    return C[0], KMeansResult(float(total[0]), int(steps[0]), bool(converged[0]))


def learn_scalar_codebook(values: torch.Tensor, bits: int, weights: torch.Tensor | None = None, *, seed: int = 0,
                          sample: int | None = 1 << 16, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """2^bits levels `(2^bits,)` fp32, ascending, for all of `values` (any shape; `weights` the same shape).

    Starts from the weighted quantiles, so the result depends on `seed` only through the subset of at most
    `sample` values it is learned on."""
    if not 1 <= bits <= 8:
        raise ValueError(f"scalar codebooks have 1..8 bits, got {bits}")
    v = values.reshape(-1)
    if weights is not None and weights.numel() != v.numel():
        raise ValueError(f"weights {tuple(weights.shape)} do not match values {tuple(values.shape)}")
    gen = torch.Generator(device=v.device).manual_seed(seed)
    idx = _subset(v.numel(), sample, gen, v.device)
    w = None if weights is None else weights.reshape(-1)
    if idx is not None:
        v, w = v[idx], None if w is None else w[idx]
    xb = v.to(torch.float32).reshape(1, -1, 1)
    wb = None if w is None else _prepare_weights(w.reshape(1, -1, 1), xb.shape)
    C, *_ = _run(xb, wb, 1 << bits, init="quantiles", seed=seed, gen=gen, iters=iters, tol=tol)
    return C[0, :, 0]


def learn_vector_codebook(x: torch.Tensor, bits: int, c: int, weights: torch.Tensor | None = None, *, seed: int = 0,
                          groups: torch.Tensor | None = None, sample: int | None = 1 << 14, iters: int = 100,
                          tol: float = 1e-5, init: str = "kmeans++") -> torch.Tensor:
    """One codebook of 2^(bits·c) centroids per group of c channels: `x (n, D)` → `(D/c, 2^(bits·c), c)` fp32.

    Group g holds channels `groups[g·c:(g + 1)·c]` (a permutation of the D channels; consecutive channels by
    default, `correlated_groups` puts correlated ones together), its centroids' coordinates in that order.
    `weights` `(n,)` per token or `(n, D)` per element. All groups are learned on the same seeded subset of at most
    `sample` tokens, so what couples their channels is kept. c = 1 gives a scalar codebook per channel."""
    if x.dim() != 2:
        raise ValueError(f"learn_vector_codebook takes tokens × channels (n, D), got shape {tuple(x.shape)}")
    n, D = x.shape
    if bits < 1 or c < 1:
        raise ValueError(f"bits and channels per group must be positive, got bits={bits}, c={c}")
    if bits * c > 16:
        raise ValueError(f"{c} channels at {bits} bits need 2^{bits * c} centroids per group, more than the 2^16 "
                         "allowed: use fewer bits or fewer channels per group")
    if D % c:
        raise ValueError(f"{D} channels do not split into groups of {c}")
    perm = _check_groups(groups, D, x.device)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    idx = _subset(n, sample, gen, x.device)
    xs = x if idx is None else x[idx]
    m, G = xs.shape[0], D // c
    xb = xs[:, perm].to(torch.float32).reshape(m, G, c).transpose(0, 1).contiguous()  # (G, m, c)
    wb = None
    if weights is not None:
        if weights.shape not in ((n,), (n, D)):
            raise ValueError(f"weights must be (n,) or (n, D) for x {tuple(x.shape)}, got {tuple(weights.shape)}")
        ws = weights if idx is None else weights[idx]
        ws = ws.reshape(1, m, 1) if ws.dim() == 1 else ws[:, perm].reshape(m, G, c).transpose(0, 1)
        wb = _prepare_weights(ws, xb.shape)
    C, *_ = _run(xb, wb, 1 << (bits * c), init=init, seed=seed, gen=gen, iters=iters, tol=tol)
    return C


def learn_unit_codebooks(x: torch.Tensor, bits: int, c: int, weights: torch.Tensor | None = None, *, seed: int = 0,
                         iters: int = 40, tol: float = 1e-4) -> torch.Tensor:
    """`learn_vector_codebook` for P units at once: `x (P, n, D)` → `(P, D/c, 2^(bits·c), c)` fp32, every group of c
    consecutive channels of every unit its own problem (one batched Lloyd run). `weights` `(P, n)` per token or
    `(P, n, D)` per element. Scalar codebooks (c = 1) start from the weighted quantiles, others from k-means++."""
    if x.dim() != 3:
        raise ValueError(f"learn_unit_codebooks takes units × tokens × channels (P, n, D), got {tuple(x.shape)}")
    P, n, D = x.shape
    if bits < 1 or c < 1 or D % c or bits * c > 16:
        raise ValueError(f"cannot learn {c}-channel codebooks at {bits} bits for {D} channels")
    G = D // c
    xb = x.to(torch.float32).reshape(P, n, G, c).permute(0, 2, 1, 3).reshape(P * G, n, c).contiguous()
    wb = None
    if weights is not None:
        w = weights.to(torch.float32)
        w = w.reshape(P, 1, n, 1).expand(P, G, n, 1) if w.dim() == 2 else w.reshape(P, n, G, c).permute(0, 2, 1, 3)
        wb = _prepare_weights(w.reshape(P * G, n, -1), xb.shape)
    C, *_ = _run(xb, wb, 1 << (bits * c), init="quantiles" if c == 1 else "kmeans++", seed=seed, gen=None,
                 iters=iters, tol=tol)
    return C.reshape(P, G, 1 << (bits * c), c)


def _check_groups(groups, D: int, device) -> torch.Tensor:
    if groups is None:
        return torch.arange(D, device=device)
    perm = torch.as_tensor(groups, dtype=torch.int64, device=device).reshape(-1)
    if perm.numel() != D or not torch.equal(perm.sort().values, torch.arange(D, device=device)):
        raise ValueError(f"groups must be a permutation of the {D} channels")
    return perm


def correlated_groups(x: torch.Tensor, c: int) -> torch.Tensor:
    """A permutation `(D,)` of the channels of `x (n, D)` that puts correlated channels in the same group of c.

    Greedy: the most correlated pair (|Pearson|) of channels still free starts a group, which then takes the free
    channel of highest mean |correlation| to its members until it holds c. Ties go to the lowest index; each group
    is listed ascending and groups by their first channel, so the permutation depends on nothing but `x`. Constant
    channels correlate with nothing."""
    if x.dim() != 2:
        raise ValueError(f"correlated_groups takes tokens × channels (n, D), got shape {tuple(x.shape)}")
    n, D = x.shape
    if c < 1 or D % c:
        raise ValueError(f"{D} channels do not split into groups of {c}")
    if c == 1 or c == D:
        return torch.arange(D, device=x.device)
    corr = _abs_correlation(x)
    corr.fill_diagonal_(-1.0)
    free = torch.ones(D, dtype=torch.bool)
    found = []
    while bool(free.any()):
        pair = corr.masked_fill(~(free[:, None] & free[None, :]), -torch.inf)
        i, j = divmod(int(pair.argmax()), D)
        group = [i, j]
        free[i] = free[j] = False
        while len(group) < c:
            score = corr[group].mean(0).masked_fill(~free, -torch.inf)
            t = int(score.argmax())
            group.append(t)
            free[t] = False
        found.append(sorted(group))
    found.sort()
    return torch.tensor([ch for g in found for ch in g], dtype=torch.int64, device=x.device)


def _abs_correlation(x: torch.Tensor) -> torch.Tensor:
    """|Pearson correlation| `(D, D)` float64 on the CPU, accumulated over chunks of rows; 0 for constant channels."""
    n, D = x.shape
    s = torch.zeros(D, dtype=torch.float64, device=x.device)
    ss = torch.zeros(D, D, dtype=torch.float64, device=x.device)
    shift = x[0].double()  # moments about the first row: no cancellation for channels with a large mean
    rows = max(1, (1 << 22) // D)
    for r in range(0, n, rows):
        y = x[r:r + rows].double() - shift
        s += y.sum(0)
        ss += y.T @ y
    mean = s / n
    cov = (ss / n - torch.outer(mean, mean)).cpu()
    std = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(std, std)
    return torch.where(denom > 0, cov.abs() / denom, torch.zeros_like(cov)).clamp_(max=1.0)


def _batched(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None):
    """`(x (G, n, c), centroids (G, k, c), weights (G, n, c | 1) or None)` from either calling convention."""
    if centroids.dim() == 2:
        if x.dim() != 2 or x.shape[1] != centroids.shape[1]:
            raise ValueError(f"points {tuple(x.shape)} do not match centroids {tuple(centroids.shape)}")
    elif centroids.dim() == 3:
        if x.dim() != 3 or x.shape[1:] != (centroids.shape[0], centroids.shape[2]):
            raise ValueError(f"points {tuple(x.shape)} do not match codebooks {tuple(centroids.shape)}")
    else:
        raise ValueError(f"centroids must be (k, c) or (G, k, c), got {tuple(centroids.shape)}")
    w = None
    if weights is not None:
        w = weights.to(torch.float32)
        if w.dim() == x.dim() - 1:
            w = w.unsqueeze(-1)
        w = torch.broadcast_to(w, (*x.shape[:-1], w.shape[-1]))
        if w.shape[-1] not in (1, x.shape[-1]):
            raise ValueError(f"weights {tuple(weights.shape)} do not match points {tuple(x.shape)}")
    x = x.to(torch.float32)
    if centroids.dim() == 2:
        return x.unsqueeze(0), centroids.to(torch.float32).unsqueeze(0), None if w is None else w.unsqueeze(0)
    return x.transpose(0, 1), centroids.to(torch.float32), None if w is None else w.transpose(0, 1)


def assign(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (int64) of the nearest centroids under the weighted distance Σ_j w_j (x_j − μ_j)², first on ties.

    Points `(n, c)` with centroids `(k, c)` → `(n,)`; or one codebook per group, points `(n, G, c)` with
    `(G, k, c)` → `(n, G)`. `weights` per point (`(n,)`, `(n, G)`) change nothing but are accepted; per coordinate
    they broadcast to the points' shape (`(1, c)`: one weight per channel, for data with no Fisher information of
    its own). The native kernel where it runs, else distances formed in chunks of at most `_CHUNK` pairs: the same
    codes."""
    xb, cb, wb = _batched(x, centroids, weights)
    codes, _ = _nearest(xb, cb, None if wb is not None and wb.shape[-1] == 1 else wb)
    return codes[0] if centroids.dim() == 2 else codes.T.contiguous()


def reconstruct(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Codes → centroids: `(n,)` with `(k, c)` → `(n, c)`; `(n, G)` with `(G, k, c)` → `(n, G, c)`."""
    if centroids.dim() == 2:
        return centroids[codes.to(torch.int64)]
    return centroids[torch.arange(centroids.shape[0], device=centroids.device), codes.to(torch.int64)]


def weighted_error(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Σ w (x − μ)² with every point at its nearest centroid (shapes as for `assign`): the objective k-means
    minimizes, for comparing codebooks."""
    xb, cb, wb = _batched(x, centroids, weights)
    _, err = _nearest(xb, cb, wb)
    return float(err.double().sum())
