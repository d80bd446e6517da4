"""Baseline names: parsing and checking them before any model loads, and building the rows they stand for.

The names and what each builds are listed in `rateq.evaluate.baselines`. `parse_name` needs no model,
`check_name` adds every check that needs only the model's config, `build` constructs the `Method`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...engines import ENGINES, engine_quantizers, get_engine
from ...errors import RateQError
from ...models import fingerprint
from ...quant.spec import FULL_PRECISION_BITS, QuantSpec, parse_spec
from ...solve import budget_range
from ..method import Method
from .context import BaselineContext
from .families import (ROTATIONS, engine_plan, fixed_split, full_precision, hybrid, kivi, profile, rank, rateq_plan,
                       reference, reference_rank, rotated, splits, waterfill)
from .matched import TOL, check_budget
from .weight_norm import WNORM_BITS, WNORM_QUANTIZERS, check_weight_norm, weight_norm

DEFAULT_BASELINES = ("fp", "kivi", "splits", "wnorm", "rank", "hybrid")  # all matched: built at each budget
BUDGETED = ("kivi", "splits", "wnorm", "waterfill", "rateq", "rank", "hybrid", "rotations") + tuple(
    f"rot-{k}" for k in ROTATIONS) + tuple(ENGINES)
_NEED_BASES = ("rank", "rank-fixed", "hybrid", "rotations", "rot-pca", "reference")  # PCA bases
_NEED_CURVES = ("waterfill", "rateq", *ENGINES)


@dataclass(frozen=True)
class BaselineName:
    """A parsed baseline name: what `build` will construct, known before any model is loaded.

    `kind` is `fp`, `reference`, `rank-fixed` (rankR), `split` (KxVy[:SPEC]), `profile` (a path), or one of
    the budgeted families (`kivi`, `splits`, `wnorm`, `waterfill`, `rateq`, `rank`, `hybrid`, `rotations`,
    `rot-KIND`), which are built once per entry of `budgets`."""

    text: str
    kind: str
    budgets: tuple[float, ...] = ()
    split: tuple[int, int, QuantSpec] | None = None
    rank: int | None = None
    path: str | None = None

    @property
    def needs_calibration(self) -> bool:
        """Whether the rows need calibration text (PCA bases; curves for waterfill / rateq unless given)."""
        return self.kind in _NEED_BASES or self.kind in _NEED_CURVES

    @property
    def needs_curves(self) -> bool:
        """Whether the rows solve distortion curves (waterfill, rateq)."""
        return self.kind in _NEED_CURVES


def _parse_split(name: str):
    """`(k_bits, v_bits, spec)` of a `KxVy[:SPEC]` name, None if `name` is not of that form."""
    head, _, spec = name.partition(":")
    head = head.upper()
    if not (head.startswith("K") and "V" in head):
        return None
    k, _, v = head[1:].partition("V")
    if not (k.isdigit() and v.isdigit()):
        return None
    k, v = int(k), int(v)
    for role, b in (("key", k), ("value", v)):
        if not (1 <= b <= 8 or b == FULL_PRECISION_BITS):
            raise RateQError(f"baseline {name!r}: {role} bits must be 1..8 or {FULL_PRECISION_BITS}, got {b}")
    return k, v, (parse_spec(spec) if spec else QuantSpec())


def _known(base: str) -> bool:
    key = base.lower()
    if key in ("fp", "reference") or key in BUDGETED or (key.startswith("rank") and key[4:].isdigit()):
        return True
    head = base.partition(":")[0].upper()
    k, _, v = head[1:].partition("V")
    return head.startswith("K") and k.isdigit() and v.isdigit()


def is_profile_name(name: str) -> bool:
    """Whether a baseline name stands for a profile: a `.safetensors` path, or an existing file whose name is
    not a baseline's."""
    text = str(name).strip()
    return text.endswith(".safetensors") or (Path(text).is_file() and not _known(text.partition("@")[0]))


def parse_name(name: str, budgets=()) -> BaselineName:
    """Parse a baseline name without a model: unknown names, malformed `@BITS`, bad quantizer ids, missing
    profiles and budgeted names without any budget raise RateQError."""
    text = str(name).strip()
    if not text:
        raise RateQError("empty baseline name; use e.g. kivi, K3V2 or rank16")
    base, at, bits = text.partition("@")
    key = base.lower()
    if at:
        try:
            number = float(bits)
        except ValueError:
            number = bits  # refused by the budget rule, which names it
        given = (check_budget(number, f"the budget in baseline {text!r} (NAME@BITS)"),)
    else:
        given = tuple(check_budget(b, "--budget") for b in budgets)

    def fixed(kind: str, **kw) -> BaselineName:
        if at:
            raise RateQError(f"baseline {base!r} has a fixed storage and takes no @BITS; write {base}, or pick a "
                             f"budgeted family such as kivi@{bits}")
        return BaselineName(text, kind, **kw)

    if key == "fp":
        return fixed("fp")
    if key == "reference":
        return fixed("reference")
    if key.startswith("rank") and key[4:].isdigit():
        r = int(key[4:])
        if r < 1:
            raise RateQError(f"baseline {text!r}: the rank must be at least 1")
        return fixed("rank-fixed", rank=r)
    split = _parse_split(base)
    if split is not None:
        return fixed("split", split=split)
    if key in BUDGETED:
        if not given:
            raise RateQError(f"baseline {key!r} needs an effective-bits budget: {key}@2.5, or --budget 2.5")
        return BaselineName(text, key, budgets=given)
    if is_profile_name(text):
        if not Path(text).is_file():
            raise RateQError(f"profile {text} does not exist")
        return BaselineName(text, "profile", path=text)
    raise RateQError(f"unknown baseline {text!r}; use fp, KxVy[:SPEC], rankR, reference, a profile path, or "
                     f"one of {', '.join(BUDGETED)} (with @BITS or --budget)")


def _check_budget_range(parsed: BaselineName, lo: float, hi: float, what: str) -> None:
    for b in parsed.budgets:
        if not lo - TOL <= b <= hi + TOL:
            raise RateQError(f"baseline {parsed.text!r}: budget {b:g} is outside the range [{lo:.4f}, {hi:.4f}] "
                             f"{what}")


def check_name(name: str, budgets=(), *, config=None, curves=None) -> BaselineName:
    """`parse_name`, then, given the model's `config` (no weights needed), every check of `build` that needs
    only the model's shape: matched bits that exist for its head_dim, ranks within it, Hadamard sizes, the
    weight-norm budget's range, a profile's fingerprint. With `curves`, waterfill / rateq budgets are checked
    against the curves' range. Without `config`, a profile is checked on its own and a weight-norm budget
    against the range of its quantizers whatever the head size."""
    parsed = parse_name(name, budgets)
    if curves is not None and parsed.kind in ENGINES:
        eng = get_engine(parsed.kind)
        held = engine_quantizers(curves, eng)  # none: a RateQError naming what to calibrate
        _check_budget_range(parsed, *budget_range(held, curves.bits, allow_fp16=eng.allow_fp16),
                            f"{eng.name}'s formats in the curves can be solved for")
    elif curves is not None and parsed.needs_curves:
        _check_budget_range(parsed, *budget_range(curves.quantizers, curves.bits), "the curves can be solved for")
    if config is None:
        if parsed.kind == "profile":
            profile(parsed.path)
        elif parsed.kind == "wnorm":
            _check_budget_range(parsed, *budget_range(WNORM_QUANTIZERS, WNORM_BITS),
                                "the weight-norm allocator's quantizers can store")
        return parsed
    if parsed.kind == "wnorm":
        for b in parsed.budgets:
            check_weight_norm(config, b)
    elif not parsed.needs_curves:
        build(parsed, config, context=BaselineContext(config))  # a dry build: plans and shapes, no data
    return parsed


def build(name, model, *, budgets=(), context: BaselineContext | None = None) -> list[Method]:
    """The methods a baseline name (or a `parse_name` result) stands for."""
    parsed = name if isinstance(name, BaselineName) else parse_name(name, budgets)
    context = context or BaselineContext(model)
    kind = parsed.kind
    if kind == "fp":
        return [full_precision()]
    if kind == "profile":
        return [profile(parsed.path, model)]
    if kind == "reference":
        return reference(model) + reference_rank(context)
    if kind == "rank-fixed":
        return [rank(context, r=parsed.rank)]
    if kind == "split":
        return [fixed_split(fingerprint(model), *parsed.split, name=parsed.text)]
    fp = fingerprint(model)
    out: list[Method] = []
    for budget in parsed.budgets:
        if kind == "kivi":
            out.append(kivi(fp, budget))
        elif kind == "splits":
            out.extend(splits(fp, budget))
        elif kind == "wnorm":
            out.append(weight_norm(model, budget))
        elif kind == "waterfill":
            out.append(waterfill(context, budget))
        elif kind == "rateq":
            out.append(rateq_plan(context, budget))
        elif kind == "rank":
            out.append(rank(context, budget=budget))
        elif kind == "hybrid":
            out.append(hybrid(context, budget))
        elif kind == "rotations":
            out.extend(rotated(context, k, budget) for k in ROTATIONS)
        elif kind in ENGINES:
            out.append(engine_plan(context, budget, kind))
        else:
            out.append(rotated(context, kind[4:], budget))
    return out
