"""Fixtures for the solver tests: random curves of chosen shape, and an independent brute-force optimum."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from rateq.curves import Curves
from rateq.models import ModelFingerprint
from rateq.quant.spec import KIVI, QuantSpec

G64 = QuantSpec(group_size=64)  # 0.5 metadata bit per element against KIVI's 1.0


def make_curves(L=1, H=2, bits=(1, 2, 3), quantizers=(KIVI, G64), *, seed=0, kind="random", equal_counts=False):
    """Curves `(L, H, 2, Q, NB)`: `random` (lognormal, sorted falling: monotone but not convex), `exponential`
    (α·β^(−b) with random α, β: convex), or `rising` (random order: non-monotone, for `Curves.monotone`)."""
    rng = np.random.default_rng(seed)
    Q, NB = len(quantizers), len(bits)
    if kind == "exponential":
        alpha = rng.lognormal(0, 1, (L, H, 2, Q, 1))
        beta = rng.uniform(2, 6, (L, H, 2, Q, 1))
        d = alpha * beta ** (-np.array(bits, dtype=np.float64))
    else:
        d = rng.lognormal(0, 1.5, (L, H, 2, Q, NB))
        if kind == "random":
            d = np.sort(d, -1)[..., ::-1].copy()
    counts = np.full((L, H, 2), 640.0) if equal_counts else rng.integers(64, 1024, (L, H, 2)).astype(np.float64)
    fp = ModelFingerprint("synthetic", "llama", L, H, 64)
    return Curves(torch.tensor(d), bits, list(quantizers), torch.tensor(counts), "output", fp,
                  {"data": "synthetic", "seed": seed})


def brute_force(curves, budget, *, min_bits=None, max_bits=None, keys_at_least_values=False, per_layer_budget=None,
                fixed=None, tie=None, devices=None, rtol=1e-12):
    """Minimum total distortion over every combination, by enumeration (independent of rateq.solve).

    `tie` ("layer", "layer-kv" or "model") enumerates one slot per tied group; `devices` is `[(first, last, cap), …]`."""
    L, H = curves.model.num_layers, curves.model.num_kv_heads
    Q, NB = len(curves.quantizers), len(curves.bits)
    N = L * H * 2
    d = np.minimum.accumulate(curves.distortion.numpy(), axis=-1).reshape(N, Q * NB)
    bits = np.tile(np.array(curves.bits), Q)
    qs = np.repeat(np.arange(Q), NB)
    cost = np.array([q.bits_per_element(b) for q in curves.quantizers for b in curves.bits])
    w = curves.counts.numpy().reshape(N)
    w = w / w.sum()
    options = []
    stored = np.array([q.allows_bits(b) for q in curves.quantizers for b in curves.bits])  # engine formats: one width
    for u in range(N):
        ok = stored.copy()
        if min_bits is not None:
            ok &= bits >= min_bits
        if max_bits is not None:
            ok &= bits <= max_bits
        key = (u // (2 * H), (u // 2) % H, "kv"[u % 2])
        if fixed and key in fixed:
            v = fixed[key]
            q, b = v if isinstance(v, tuple) else (None, v)
            ok = stored & (bits == b)
            if q is not None:
                ok &= qs == q
        options.append(np.nonzero(ok)[0])
    u = np.arange(N)
    group = {None: u, "layer": u // (2 * H) * 2 + u % 2, "layer-kv": u // (2 * H), "model": u % 2}[tie]
    group_options = [functools.reduce(np.intersect1d, [options[i] for i in np.nonzero(group == g)[0]])
                     for g in range(group.max() + 1)]
    if any(len(o) == 0 for o in group_options):
        return None
    combos = np.array(list(itertools.product(*group_options)))[:, group]  # (M, N)
    tot = (w * cost[combos]).sum(1)
    feasible = tot <= budget * (1 + rtol)
    if per_layer_budget is not None:
        for l in range(L):
            sl = slice(l * 2 * H, (l + 1) * 2 * H)
            lc = (w[sl] * cost[combos[:, sl]]).sum(1) / w[sl].sum()
            feasible &= lc <= per_layer_budget * (1 + rtol)
    for first, last, cap in devices or []:
        sl = slice(first * 2 * H, (last + 1) * 2 * H)
        feasible &= (w[sl] * cost[combos[:, sl]]).sum(1) / w[sl].sum() <= cap * (1 + rtol)
    if keys_at_least_values:
        feasible &= (bits[combos[:, 0::2]] >= bits[combos[:, 1::2]]).all(1)
    if not feasible.any():
        return None
    dist = d[np.arange(N), combos].sum(1)
    return float(dist[feasible].min())


def plan_distortion(curves, plan):
    """Total monotone distortion of a plan, read back from the plan's bits and quantizers."""
    mono = np.minimum.accumulate(curves.distortion.numpy(), axis=-1)
    ids = [curves.quantizers.index(q) for q in plan.quantizers]
    total = 0.0
    for l in range(plan.num_layers):
        for h in range(plan.num_kv_heads):
            for r, role in enumerate("kv"):
                b = int(plan.bits(role)[l, h])
                q = ids[int(plan.quantizer_ids(role)[l, h])]
                total += 0.0 if b == 16 else mono[l, h, r, q, curves.bits.index(b)]
    return total


@pytest.fixture
def curves_factory():
    return make_curves


@pytest.fixture
def brute():
    return brute_force


@pytest.fixture
def plan_dist():
    return plan_distortion
