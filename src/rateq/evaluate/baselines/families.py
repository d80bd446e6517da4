"""The baseline families as `Method`s: full precision, fixed splits, KIVI, fitted waterfilling, rateq's own
plan, profiles, PCA rank reduction, rank + quantization, rotations, and the reference table.

Each builder sizes its row with `matched` so that it stores its budget (or, where its family cannot, the
most below it), and returns a `Method` that runs through the same one-pass evaluation as any plan. The
weight-norm allocator lives in `weight_norm`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ...errors import RateQError
from ...models import ModelFingerprint, fingerprint
from ...plan import Plan
from ...profile import load_profile
from ...quant.spec import FULL_PRECISION_BITS, QuantSpec
from ...simulate import plan_transform
from ...solve import solve
from ..method import Method
from ..transforms import projected_transform, rank_transform, rotated_transform, rotations
from .context import BaselineContext
from .matched import GROUP_SIZES, TOL, fmt_bits, matched_splits, matched_uniform

ROTATIONS = ("identity", "hadamard", "random", "pca")
REFERENCE_SPLITS = ((8, 8), (4, 4), (4, 3), (3, 4), (3, 3), (4, 2), (3, 2), (2, 4), (2, 3), (2, 2))
REFERENCE_SPEC = QuantSpec(scale_dtype="fp32")  # the reference table keeps scales and zero-points in fp32


def _code_bits_note(plan: Plan) -> str:
    return f"K {plan.mean_bits('k'):.2f} / V {plan.mean_bits('v'):.2f} mean code bits"


# -- plan-based baselines -------------------------------------------------------------------------------------
def full_precision() -> Method:
    """The model as is: the reference row of KL, flips and ΔPPL."""
    return Method(name="fp", family="fp", nominal_bits=16.0, effective_bits=16.0, label="full precision",
                  notes="no transform; a fp16 cache would hold 16 bits per element")


def fixed_split(fp: ModelFingerprint, k_bits: int, v_bits: int, spec: QuantSpec = QuantSpec(), *,
                name: str | None = None, family: str | None = None, budget: float | None = None) -> Method:
    """Every head at `k_bits` keys and `v_bits` values (KxVy) under one quantizer."""
    plan = Plan.uniform(fp, k_bits, v_bits, spec=spec)
    family = family or ("uniform" if k_bits == v_bits else "split")
    return Method.from_plan(plan, name or f"K{k_bits}V{v_bits}:{spec.id}", family=family,
                            label=f"K{k_bits}V{v_bits} {spec.id}", budget=budget)


def kivi(fp: ModelFingerprint, budget: float, *, scale_dtype: str = "fp16") -> Method:
    """KIVI-style uniform quantization at `budget`: asymmetric min-max, keys per channel over token groups,
    values per token over channel groups, b bits with the group size G that makes b + 32/G = budget."""
    bits, spec = matched_uniform(budget, scale_dtype=scale_dtype, head_dim=fp.head_dim)
    m = fixed_split(fp, bits, bits, spec, name=f"kivi@{fmt_bits(budget)}", family="uniform", budget=budget)
    m.label = f"KIVI {bits}-bit g{spec.group_size} {spec.scale_dtype}"
    return m


def splits(fp: ModelFingerprint, budget: float, *, max_gap: int = 2) -> list[Method]:
    """Every fixed split KxVy (x ≠ y, |x − y| ≤ max_gap) whose bits and group size store `budget` exactly."""
    out = []
    for kb, vb, spec in matched_splits(budget, max_gap=max_gap, head_dim=fp.head_dim):
        out.append(fixed_split(fp, kb, vb, spec, name=f"K{kb}V{vb}-g{spec.group_size}@{fmt_bits(budget)}",
                               family="split", budget=budget))
    if not out:
        raise RateQError(f"no fixed K/V split matches {budget} effective bits exactly with groups {GROUP_SIZES}")
    return out


def waterfill(context: BaselineContext, budget: float) -> Method:
    """RateQuant-style: `D(b) = α·β^(−b)` fitted per unit to the context's curves, reverse waterfilling."""
    plan = solve(context.get_curves(), budget=budget, method="waterfill")
    return Method.from_plan(plan, f"waterfill@{fmt_bits(budget)}", family="waterfill", budget=budget,
                            label="fitted waterfilling (RateQuant-style)", notes=_code_bits_note(plan))


def rateq_plan(context: BaselineContext, budget: float) -> Method:
    """rateq's own plan: `rateq.solve` (exact) on the context's curves at `budget`."""
    plan = solve(context.get_curves(), budget=budget)
    return Method.from_plan(plan, f"rateq@{fmt_bits(budget)}", family="rateq", budget=budget, label="rateq plan",
                            notes=_code_bits_note(plan))


def engine_plan(context: BaselineContext, budget: float, engine: str) -> Method:
    """The best plan a serving engine can run (`rateq.engines.solve_for`: its formats, tie and K/V rule) on the
    context's curves at `budget`, beside the free per-head plan of the same curves."""
    from ...engines import get_engine, solve_for

    eng = get_engine(engine)
    plan = solve_for(context.get_curves(), budget, eng)
    layers = eng.layer_formats(plan)
    used = sorted({f for pair in layers for f in pair})
    return Method.from_plan(plan, f"{eng.name}@{fmt_bits(budget)}", family="engine", budget=budget,
                            label=f"{eng.name} plan ({', '.join(used)}; {eng.tie} tie)",
                            notes=f"{_code_bits_note(plan)}; predicted {plan.solver['metric']} "
                                  f"{plan.solver['predicted_distortion']:.4g}")


def profile(path: str, model=None, *, own_policy: bool = True, overrides: dict | None = None) -> Method:
    """A saved profile; with `model` (a model, its config or a fingerprint), its fingerprint is checked first.

    The row runs under the profile's own cache policy (`plan.policy`) with `overrides` (any of residual,
    block, sinks) replaced; `own_policy=False` leaves the policy to the evaluation instead."""
    plan = load_profile(path, model)
    policy = replace(plan.policy, **(overrides or {})) if own_policy else None
    return Method.from_plan(plan, Path(path).stem, family="rateq", label=f"profile {Path(path).name}",
                            notes=_code_bits_note(plan), policy=policy)


# -- transform-based baselines --------------------------------------------------------------------------------
def _basis_note(D: int, r: int) -> str:
    return f"basis: {D}x{r} fp16 + mean per unit, a per-model constant not counted per element"


def rank(context: BaselineContext, *, budget: float | None = None, r: int | None = None) -> Method:
    """Per-head PCA rank reduction (centred, basis from the calibration text), r fp16 coefficients per token:
    `16·r/D` effective bits per element (r = the most that fit `budget`, or `r` given)."""
    D = fingerprint(context.model).head_dim
    if r is None:
        if budget is None:
            raise RateQError("rank reduction needs a budget or a rank")
        r = int(math.floor(budget * D / FULL_PRECISION_BITS + TOL))
    if not 0 < r <= D:
        raise RateQError(f"rank {r} is outside 1..{D}")
    eff = FULL_PRECISION_BITS * r / D
    name = f"rank@{fmt_bits(budget)}" if budget is not None else f"rank{r}"
    return Method(name=name, family="rank", nominal_bits=eff, effective_bits=eff, budget=budget,
                  build=lambda policy: rank_transform(context.bases(), r), label=f"PCA rank {r}/{D} fp16",
                  notes=_basis_note(D, r), info={"rank": r})


def hybrid(context: BaselineContext, budget: float, *, rank_fraction: float = 0.5, group_size: int = 32) -> Method:
    """Rank reduction to `rank_fraction·D` dims, then min-max quantization of the coefficients (keys per
    coefficient over token groups, values per token over groups of coefficients) at the most bits that fit."""
    fp = fingerprint(context.model)
    D = fp.head_dim
    r = int(round(D * rank_fraction))
    g = min(group_size, r)
    if r % g:
        raise RateQError(f"hybrid rank {r} does not split into value groups of {g}")
    spec = QuantSpec(group_size=g)
    fits = [b for b in range(1, 9) if r / D * spec.bits_per_element(b) <= budget + TOL]
    if not fits:
        raise RateQError(f"rank {r}/{D} with 1-bit codes already exceeds {budget} effective bits")
    bits = max(fits)
    eff = r / D * spec.bits_per_element(bits)
    inner_fp = ModelFingerprint(fp.name, fp.architecture, fp.num_layers, fp.num_kv_heads, r)
    plan = Plan.uniform(inner_fp, bits, bits, spec=spec)
    return Method(name=f"hybrid@{fmt_bits(budget)}", family="hybrid", nominal_bits=r / D * bits, effective_bits=eff,
                  budget=budget, key_group=g,
                  build=lambda policy: projected_transform(plan_transform(plan, policy), context.bases(), r),
                  label=f"PCA rank {r}/{D} + {bits}-bit {spec.id}", notes=_basis_note(D, r),
                  info={"rank": r, "bits": bits})


def rotated(context: BaselineContext, kind: str, budget: float, *, seed: int = 0) -> Method:
    """`kivi@budget` in a rotated basis: identity (plain KIVI), Hadamard, random orthogonal, or PCA axes."""
    fp = fingerprint(context.model)
    bits, spec = matched_uniform(budget, head_dim=fp.head_dim)
    plan = Plan.uniform(fp, bits, bits, spec=spec)
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    if kind not in ROTATIONS:
        raise RateQError(f"unknown rotation {kind!r}; use one of {', '.join(ROTATIONS)}")
    if kind == "hadamard":
        rotations("hadamard", 1, 1, D)  # fail now, not mid-evaluation, if head_dim is not a power of two

    def build(policy):
        rot = rotations(kind, L, H, D, bases=context.bases() if kind == "pca" else None, seed=seed)
        return rotated_transform(plan_transform(plan, policy), rot)

    return Method(name=f"rot-{kind}@{fmt_bits(budget)}", family="rotation", nominal_bits=plan.nominal_bits,
                  effective_bits=plan.effective_bits, budget=budget, key_group=spec.group_size, build=build,
                  label=f"{kind} rotation + KIVI {bits}-bit g{spec.group_size}",
                  notes="rotation is a per-model constant" if kind in ("random", "pca") else "")


def reference(model) -> list[Method]:
    """The reference table of `results/reference.md` (fp32 scales and zero-points, groups of 32, R = 0)."""
    fp = fingerprint(model)
    out = [full_precision()]
    for kb, vb in REFERENCE_SPLITS:
        out.append(fixed_split(fp, kb, vb, REFERENCE_SPEC, name=f"K{kb}V{vb}:{REFERENCE_SPEC.id}"))
    return out


def reference_rank(context: BaselineContext) -> list[Method]:
    """The reference table's rank rows: PCA rank D/2 and D/4."""
    D = fingerprint(context.model).head_dim
    return [rank(context, r=D // 2), rank(context, r=D // 4)]
