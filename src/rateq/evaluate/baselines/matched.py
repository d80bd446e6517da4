"""Matched storage: which quantizers and K/V splits store exactly (or at most) a budget of effective bits.

Effective bits are code bits plus metadata bits (scales, zero-points) per element, counted by
`QuantSpec.bits_per_element`; every baseline built for a budget B is sized here so that it stores B, or the
most below B that its family allows.
"""

from __future__ import annotations

from ...errors import RateQError
from ...plan import check_budget  # noqa: F401 — the budget rule, re-exported for the baselines' callers
from ...quant.spec import QuantSpec

GROUP_SIZES = (16, 32, 64, 128)  # group sizes the matched-bits searches may use (all divide a 128-token block)
TOL = 1e-9  # two budgets closer than this are the same budget


def fmt_bits(x: float) -> str:
    """A budget as it appears in a row name: `2.5`, `3` (as in `kivi@3`)."""
    return f"{x:g}"


def usable_groups(groups, head_dim: int | None) -> list[int]:
    """Group sizes of `groups` usable for both K and V of heads of `head_dim` (values are grouped along
    channels, so G must divide it), in increasing order; all of them when `head_dim` is None."""
    return sorted(g for g in groups if head_dim is None or head_dim % g == 0)


def matched_uniform(budget: float, *, scale_dtype: str = "fp16", groups=GROUP_SIZES,
                    head_dim: int | None = None) -> tuple[int, QuantSpec]:
    """`(bits, spec)` of the uniform min-max quantizer whose effective bits equal `budget`: the most code bits
    with a group size in `groups` that fits exactly; if none fits exactly, the largest storage ≤ budget."""
    groups = usable_groups(groups, head_dim)
    best = None
    for b in range(8, 0, -1):
        for g in groups:
            spec = QuantSpec(group_size=g, scale_dtype=scale_dtype)
            eff = spec.bits_per_element(b)
            if abs(eff - budget) < TOL:
                return b, spec
            if eff <= budget + TOL and (best is None or eff > best[0] + TOL):
                best = (eff, b, spec)
    if best is None:
        raise RateQError(f"no uniform quantizer fits {budget} effective bits (1 bit with groups of "
                         f"{max(groups)} already costs {QuantSpec(group_size=max(groups)).bits_per_element(1)})")
    return best[1], best[2]


def matched_splits(budget: float, *, max_gap: int = 2, scale_dtype: str = "fp16", groups=GROUP_SIZES,
                   head_dim: int | None = None) -> list[tuple[int, int, QuantSpec]]:
    """Every `(k_bits, v_bits, spec)` with k ≠ v, |k − v| ≤ max_gap, same group size for K and V, and effective
    bits exactly `budget`."""
    out = []
    for g in usable_groups(groups, head_dim):
        spec = QuantSpec(group_size=g, scale_dtype=scale_dtype)
        for kb in range(1, 9):
            for vb in range(1, 9):
                if kb == vb or abs(kb - vb) > max_gap:
                    continue
                eff = (spec.bits_per_element(kb) + spec.bits_per_element(vb)) / 2
                if abs(eff - budget) < TOL:
                    out.append((kb, vb, spec))
    return out
