"""Baselines at matched storage, each a `Method` that runs through the same one-pass evaluation as a plan.

Names (`rateq eval --baseline NAME`, `rateq.evaluate(model, ids, ["NAME", …])`); `@B` fixes the effective
budget, a name without it is expanded at every `--budget`:

| name | what |
| --- | --- |
| `fp` | full precision (the model as is; 16 bits per element if the cache held fp16) |
| `KxVy[:SPEC]` | fixed split, x-bit keys and y-bit values, quantizer SPEC (default `minmax-g32-fp16`) |
| `kivi@B` | uniform KIVI-style b bits, asymmetric min-max, group size chosen so that b + 32/G = B |
| `splits@B` | every fixed split KxVy (x ≠ y, |x − y| ≤ 2) whose bits and group size match B exactly |
| `wnorm@B` | keys-favoured, data-free greedy from key/value projection weight norms with D ∝ ‖W‖²·2^(−2b) |
| `waterfill@B` | RateQuant-style: fitted D(b) = α·β^(−b) per head and reverse waterfilling (`rateq.solve`) |
| `rateq@B` | rateq's own plan: `rateq.calibrate` + `rateq.solve` at budget B |
| `rank@B`, `rankR` | per-head PCA keeping r of D dims in fp16 (r = B·D/16); `rankR` keeps R dims |
| `hybrid@B` | PCA to D/2 dims, then KIVI-style quantization of the coefficients at the bits that fit B |
| `rot-{identity,hadamard,random,pca}@B`, `rotations@B` | `kivi@B` after rotating each head by an orthogonal matrix |
| `reference` | the reference table of `results/reference.md`: fp, K8V8 … K2V2 and rank 32/16 of 64, fp32 scales |
| a `.safetensors` path | a profile (`rateq.load_profile`), run under its own cache policy |

Names of fixed storage (`fp`, `KxVy`, `rankR`, `reference`, profiles) take no `@B`. `parse_name` checks a name
without a model, `check_name` adds every check that needs only the model's config.

Matched storage: a row is *matched* at a compared budget B when it was built for B and stores at most B
effective bits, or when it stores exactly B (a fixed split, a profile); other rows are reported apart, as
not matched, and get no KIVI comparison. Every default baseline is built at the compared budgets.

Storage accounting: `effective_bits` = code bits + metadata bits (scales, zero-points) per element, the same
count as `QuantSpec.bits_per_element`. Rank reduction stores `r` fp16 coefficients per token and head:
`16·r/D` bits per element; the basis (`D·r` fp16 numbers plus a mean of `D` per unit) is a per-model constant,
like a codebook, and is reported in the row's notes rather than spread over an arbitrary sequence length.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import RateQError
from ..models import ModelFingerprint, fingerprint
from ..plan import Plan
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec, parse_spec
from ..simulate import plan_transform
from ..text import DEFAULT_CALIBRATION_TEXT, text_windows
from .method import Method
from .transforms import KVBases, kv_bases, projected_transform, rank_transform, rotated_transform, rotations

GROUP_SIZES = (16, 32, 64, 128)  # group sizes the matched-bits searches may use (all divide a 128-token block)
ROTATIONS = ("identity", "hadamard", "random", "pca")
REFERENCE_SPLITS = ((8, 8), (4, 4), (4, 3), (3, 4), (3, 3), (4, 2), (3, 2), (2, 4), (2, 3), (2, 2))
REFERENCE_SPEC = QuantSpec(scale_dtype="fp32")  # the reference table keeps scales and zero-points in fp32
DEFAULT_BASELINES = ("fp", "kivi", "splits", "wnorm", "rank", "hybrid")  # all matched: built at each budget
_TOL = 1e-9


# -- calibration data shared by the baselines that need it ----------------------------------------------------
@dataclass
class BaselineContext:
    """Model, tokenizer and calibration data, with the calibrated artefacts computed once, on first use."""

    model: object
    tokenizer: object = None
    calibration: object = None  # token ids (N, T), a text name, or None (austen-emma)
    curves: object = None  # Curves for waterfill / rateq rows
    seq_len: int = 1024
    calibration_windows: int = 2
    _bases: KVBases | None = field(default=None, repr=False)
    _ids: torch.Tensor | None = field(default=None, repr=False)

    def ids(self) -> torch.Tensor:
        if self._ids is None:
            cal = DEFAULT_CALIBRATION_TEXT if self.calibration is None else self.calibration
            if isinstance(cal, torch.Tensor):
                self._ids = cal.long() if cal.dim() == 2 else cal.long()[None]
            else:
                if self.tokenizer is None:
                    raise RateQError("baselines calibrated on text (PCA bases, curves) need the tokenizer, or "
                                     "calibration token ids")
                self._ids = text_windows(self.tokenizer, str(cal), self.calibration_windows, self.seq_len, seed=0)
        return self._ids

    def bases(self) -> KVBases:
        if self._bases is None:
            self._bases = kv_bases(self.model, self.ids())
        return self._bases

    def get_curves(self):
        if self.curves is None:
            try:
                from ..calibrate import calibrate
            except ImportError:
                raise RateQError("waterfill and rateq rows need distortion curves: pass curves=… (--curves FILE); "
                                 "this rateq cannot calibrate") from None
            self.curves = calibrate(self.model, self.tokenizer, self.ids())
        elif isinstance(self.curves, (str, Path)):
            from ..curves import Curves

            self.curves = Curves.load(self.curves)
        return self.curves

    def describe(self) -> dict:
        out = {}
        if self._ids is not None:
            out["pca"] = {"data": self.calibration if isinstance(self.calibration, str) else
                          (DEFAULT_CALIBRATION_TEXT if self.calibration is None else "token ids"),
                          "windows": int(self._ids.shape[0]), "seq_len": int(self._ids.shape[1])}
        if self.curves is not None and not isinstance(self.curves, (str, Path)):
            out["curves"] = {"metric": self.curves.metric, **dict(self.curves.calibration)}
        return out


# -- matched bits ---------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:g}"


def _groups(groups, head_dim: int | None):
    """Group sizes usable with `head_dim` (values are grouped along channels, so G must divide it)."""
    return sorted(g for g in groups if head_dim is None or head_dim % g == 0)


def matched_uniform(budget: float, *, scale_dtype: str = "fp16", groups=GROUP_SIZES,
                    head_dim: int | None = None) -> tuple[int, QuantSpec]:
    """`(bits, spec)` of the uniform min-max quantizer whose effective bits equal `budget`: the most code bits
    with a group size in `groups` that fits exactly; if none fits exactly, the largest storage ≤ budget."""
    groups = _groups(groups, head_dim)
    best = None
    for b in range(8, 0, -1):
        for g in sorted(groups):
            spec = QuantSpec(group_size=g, scale_dtype=scale_dtype)
            eff = spec.bits_per_element(b)
            if abs(eff - budget) < _TOL:
                return b, spec
            if eff <= budget + _TOL and (best is None or eff > best[0] + _TOL):
                best = (eff, b, spec)
    if best is None:
        raise RateQError(f"no uniform quantizer fits {budget} effective bits (1 bit with groups of "
                         f"{max(groups)} already costs {QuantSpec(group_size=max(groups)).bits_per_element(1)})")
    return best[1], best[2]


def matched_splits(budget: float, *, max_gap: int = 2, scale_dtype: str = "fp16", groups=GROUP_SIZES,
                   head_dim: int | None = None):
    """Every `(k_bits, v_bits, spec)` with k ≠ v, |k − v| ≤ max_gap, same group size for K and V, and effective
    bits exactly `budget`."""
    out = []
    for g in _groups(groups, head_dim):
        spec = QuantSpec(group_size=g, scale_dtype=scale_dtype)
        for kb in range(1, 9):
            for vb in range(1, 9):
                if kb == vb or abs(kb - vb) > max_gap:
                    continue
                eff = (spec.bits_per_element(kb) + spec.bits_per_element(vb)) / 2
                if abs(eff - budget) < _TOL:
                    out.append((kb, vb, spec))
    return out


# -- plan-based baselines -------------------------------------------------------------------------------------
def full_precision() -> Method:
    return Method(name="fp", family="fp", nominal_bits=16.0, effective_bits=16.0, label="full precision",
                  notes="no transform; a fp16 cache would hold 16 bits per element")


def fixed_split(fp: ModelFingerprint, k_bits: int, v_bits: int, spec: QuantSpec = QuantSpec(), *,
                name: str | None = None, family: str | None = None, budget: float | None = None) -> Method:
    plan = Plan.uniform(fp, k_bits, v_bits, spec=spec)
    family = family or ("uniform" if k_bits == v_bits else "split")
    return Method.from_plan(plan, name or f"K{k_bits}V{v_bits}:{spec.id}", family=family,
                            label=f"K{k_bits}V{v_bits} {spec.id}", budget=budget)


def kivi(fp: ModelFingerprint, budget: float, *, scale_dtype: str = "fp16") -> Method:
    bits, spec = matched_uniform(budget, scale_dtype=scale_dtype, head_dim=fp.head_dim)
    m = fixed_split(fp, bits, bits, spec, name=f"kivi@{_fmt(budget)}", family="uniform", budget=budget)
    m.label = f"KIVI {bits}-bit g{spec.group_size} {spec.scale_dtype}"
    return m


def splits(fp: ModelFingerprint, budget: float, *, max_gap: int = 2) -> list[Method]:
    out = []
    for kb, vb, spec in matched_splits(budget, max_gap=max_gap, head_dim=fp.head_dim):
        m = fixed_split(fp, kb, vb, spec, name=f"K{kb}V{vb}-g{spec.group_size}@{_fmt(budget)}", family="split",
                        budget=budget)
        out.append(m)
    if not out:
        raise RateQError(f"no fixed K/V split matches {budget} effective bits exactly with groups {GROUP_SIZES}")
    return out


def projection_norms(model) -> torch.Tensor:
    """`(L, H, 2)` squared Frobenius norms of each KV head's rows of `k_proj` / `v_proj`."""
    fp = fingerprint(model)
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    out = torch.full((L, H, 2), float("nan"), dtype=torch.float64)
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if layer is None or not hasattr(module, "k_proj") or not hasattr(module, "v_proj"):
            continue
        for r, proj in enumerate((module.k_proj, module.v_proj)):
            w = proj.weight.detach().to(torch.float64)  # (H*D, hidden)
            out[layer, :, r] = w.view(H, D, -1).pow(2).sum(dim=(1, 2))
    if torch.isnan(out).any():
        raise RateQError("weight-norm allocation needs attention modules with k_proj and v_proj weights "
                         f"({fp.architecture} has a different layout)")
    return out


def greedy_allocate(sensitivity: torch.Tensor, spec: QuantSpec, budget: float, *, bits=range(1, 9)) -> torch.Tensor:
    """Marginal-gain greedy under `D_u(b) = s_u·2^(−2b)`: start every unit at the lowest width and repeatedly
    raise the unit with the largest distortion drop per added storage bit while the mean effective bits stay
    ≤ budget. `sensitivity (N,)` → bits `(N,)`. With one quantizer this is exact (D is convex in b)."""
    widths = sorted(int(b) for b in bits)
    cost = {b: spec.bits_per_element(b) for b in widths}
    n = sensitivity.numel()
    level = [0] * n
    spent = cost[widths[0]] * n
    if spent > budget * n + _TOL:
        raise RateQError(f"{widths[0]} bits with {spec.id} already cost {cost[widths[0]]} > budget {budget}")
    s = sensitivity.tolist()

    def gain(u: int) -> float:
        b0, b1 = widths[level[u]], widths[level[u] + 1]
        return s[u] * (2.0 ** (-2 * b0) - 2.0 ** (-2 * b1)) / (cost[b1] - cost[b0])

    heap = [(-gain(u), u) for u in range(n) if len(widths) > 1]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        b0, b1 = widths[level[u]], widths[level[u] + 1]
        extra = cost[b1] - cost[b0]
        if spent + extra > budget * n + _TOL:
            continue  # this unit cannot grow; others with cheaper steps might
        level[u] += 1
        spent += extra
        if level[u] + 1 < len(widths):
            heapq.heappush(heap, (-gain(u), u))
    return torch.tensor([widths[i] for i in level], dtype=torch.int64)


def weight_norm(model, budget: float, *, spec: QuantSpec = QuantSpec(group_size=64), bits=range(1, 9)) -> Method:
    """A data-free allocator, per head: sensitivity ‖W_k,h‖²_F (keys) and ‖W_v,h‖²_F (values), fixed
    2^(−2b) law, greedy to the budget. One quantizer (`spec`) for every unit."""
    fp = fingerprint(model)
    L, H = fp.num_layers, fp.num_kv_heads
    sens = projection_norms(model)  # (L, H, 2)
    alloc = greedy_allocate(sens.flatten(), spec, budget, bits=bits).view(L, H, 2)
    zeros = torch.zeros(L, H, dtype=torch.int64)
    plan = Plan(alloc[..., 0], alloc[..., 1], zeros, zeros, [spec], fp, budget_bits=budget,
                solver={"method": "weight-norm greedy", "law": "2^(-2b)"})
    return Method.from_plan(plan, f"wnorm@{_fmt(budget)}", family="wnorm", budget=budget,
                            label=f"weight-norm greedy {spec.id}",
                            notes=f"K {plan.mean_bits('k'):.2f} / V {plan.mean_bits('v'):.2f} mean code bits")


def _solve(curves, budget: float, **kw) -> Plan:
    try:
        from ..solve import solve
    except ImportError:
        raise RateQError("this row needs the solver (rateq.solve), which this rateq does not provide") from None
    return solve(curves, budget=budget, **kw)


def waterfill(context: BaselineContext, budget: float) -> Method:
    plan = _solve(context.get_curves(), budget, method="waterfill")
    return Method.from_plan(plan, f"waterfill@{_fmt(budget)}", family="waterfill", budget=budget,
                            label="fitted waterfilling (RateQuant-style)",
                            notes=f"K {plan.mean_bits('k'):.2f} / V {plan.mean_bits('v'):.2f} mean code bits")


def rateq_plan(context: BaselineContext, budget: float) -> Method:
    plan = _solve(context.get_curves(), budget)
    return Method.from_plan(plan, f"rateq@{_fmt(budget)}", family="rateq", budget=budget, label="rateq plan",
                            notes=f"K {plan.mean_bits('k'):.2f} / V {plan.mean_bits('v'):.2f} mean code bits")


def profile(path: str, model=None, *, own_policy: bool = True, overrides: dict | None = None) -> Method:
    """A saved profile; with `model` (a model, its config or a fingerprint), its fingerprint is checked first.

    The row runs under the profile's own cache policy (`plan.policy`) with `overrides` (any of residual,
    block, sinks) replaced; `own_policy=False` leaves the policy to the evaluation instead."""
    try:
        from ..profile import load_profile
    except ImportError:
        raise RateQError("loading profiles needs rateq.load_profile, which this rateq does not provide") from None
    plan = load_profile(path, model)
    policy = replace(plan.policy, **(overrides or {})) if own_policy else None
    return Method.from_plan(plan, Path(path).stem, family="rateq", label=f"profile {Path(path).name}",
                            notes=f"K {plan.mean_bits('k'):.2f} / V {plan.mean_bits('v'):.2f} mean code bits",
                            policy=policy)


# -- transform-based baselines --------------------------------------------------------------------------------
def _basis_note(D: int, r: int) -> str:
    return f"basis: {D}x{r} fp16 + mean per unit, a per-model constant not counted per element"


def rank(context: BaselineContext, *, budget: float | None = None, r: int | None = None) -> Method:
    """Per-head PCA rank reduction (centred, basis from the calibration text), r fp16 coefficients per token."""
    D = fingerprint(context.model).head_dim
    if r is None:
        if budget is None:
            raise RateQError("rank reduction needs a budget or a rank")
        r = int(math.floor(budget * D / FULL_PRECISION_BITS + _TOL))
    if not 0 < r <= D:
        raise RateQError(f"rank {r} is outside 1..{D}")
    eff = FULL_PRECISION_BITS * r / D
    name = f"rank@{_fmt(budget)}" if budget is not None else f"rank{r}"
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
    fits = [b for b in range(1, 9) if r / D * spec.bits_per_element(b) <= budget + _TOL]
    if not fits:
        raise RateQError(f"rank {r}/{D} with 1-bit codes already exceeds {budget} effective bits")
    bits = max(fits)
    eff = r / D * spec.bits_per_element(bits)
    inner_fp = ModelFingerprint(fp.name, fp.architecture, fp.num_layers, fp.num_kv_heads, r)
    plan = Plan.uniform(inner_fp, bits, bits, spec=spec)
    return Method(name=f"hybrid@{_fmt(budget)}", family="hybrid", nominal_bits=r / D * bits, effective_bits=eff,
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

    return Method(name=f"rot-{kind}@{_fmt(budget)}", family="rotation", nominal_bits=plan.nominal_bits,
                  effective_bits=plan.effective_bits, budget=budget, key_group=spec.group_size, build=build,
                  label=f"{kind} rotation + KIVI {bits}-bit g{spec.group_size}",
                  notes="rotation is a per-model constant" if kind in ("random", "pca") else "")


def reference(model) -> list[Method]:
    """The reference table of `results/reference.md` (fp32 scales and zero-points, groups of 32, R = 0)."""
    fp = fingerprint(model)
    out = [full_precision()]
    for kb, vb in REFERENCE_SPLITS:
        m = fixed_split(fp, kb, vb, REFERENCE_SPEC, name=f"K{kb}V{vb}:{REFERENCE_SPEC.id}")
        out.append(m)
    return out


def reference_rank(context: BaselineContext) -> list[Method]:
    D = fingerprint(context.model).head_dim
    return [rank(context, r=D // 2), rank(context, r=D // 4)]


# -- names ----------------------------------------------------------------------------------------------------
_BUDGETED = ("kivi", "splits", "wnorm", "waterfill", "rateq", "rank", "hybrid", "rotations") + tuple(
    f"rot-{k}" for k in ROTATIONS)
_NEED_CALIBRATION = ("rank", "rank-fixed", "hybrid", "rotations", "rot-pca", "reference")  # PCA bases


def check_budget(value, what: str = "budget") -> float:
    """`value` as a positive, finite number of effective bits per element, or a RateQError naming `what`."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise RateQError(f"{what} must be a number of effective bits per element, e.g. 2.5; got {value!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise RateQError(f"{what} must be a positive, finite number of effective bits per element, got {value}")
    return budget


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
        return self.kind in _NEED_CALIBRATION or self.kind in ("waterfill", "rateq")

    @property
    def needs_curves(self) -> bool:
        return self.kind in ("waterfill", "rateq")


def _parse_split(name: str):
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
    if key in ("fp", "reference") or key in _BUDGETED or (key.startswith("rank") and key[4:].isdigit()):
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
    """Parse a baseline name (see the module docstring) without a model: unknown names, malformed `@BITS`,
    bad quantizer ids, missing profiles and budgeted names without any budget raise RateQError."""
    text = str(name).strip()
    if not text:
        raise RateQError("empty baseline name; use e.g. kivi, K3V2 or rank16")
    base, at, bits = text.partition("@")
    key = base.lower()
    if at:
        given = (check_budget(bits, f"the budget in baseline {text!r} (NAME@BITS)"),)
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
    if key in _BUDGETED:
        if not given:
            raise RateQError(f"baseline {key!r} needs an effective-bits budget: {key}@2.5, or --budget 2.5")
        return BaselineName(text, key, budgets=given)
    if is_profile_name(text):
        if not Path(text).is_file():
            raise RateQError(f"profile {text} does not exist")
        return BaselineName(text, "profile", path=text)
    raise RateQError(f"unknown baseline {text!r}; use fp, KxVy[:SPEC], rankR, reference, a profile path, or "
                     f"one of {', '.join(_BUDGETED)} (with @BITS or --budget)")


def check_name(name: str, budgets=(), *, config=None, curves=None) -> BaselineName:
    """`parse_name`, then, given the model's `config` (no weights needed), every check of `build` that needs
    only the model's shape: matched bits that exist for its head_dim, ranks within it, Hadamard sizes, a
    profile's fingerprint. With `curves`, waterfill / rateq budgets are checked against the curves' range."""
    parsed = parse_name(name, budgets)
    if curves is not None and parsed.needs_curves:
        from ..solve import budget_range

        lo, hi = budget_range(curves.quantizers, curves.bits)
        for b in parsed.budgets:
            if not lo - _TOL <= b <= hi + _TOL:
                raise RateQError(f"baseline {parsed.text!r}: budget {b:g} is outside the range [{lo:.4f}, {hi:.4f}] "
                                 f"the curves can be solved for")
    if config is None:
        if parsed.kind == "profile":
            profile(parsed.path)
        elif parsed.kind == "wnorm":
            for b in parsed.budgets:
                _wnorm_fits(b)
        return parsed
    if parsed.kind == "wnorm":
        for b in parsed.budgets:
            _wnorm_fits(b)
    elif not parsed.needs_curves:
        build(parsed, config, context=BaselineContext(config))  # a dry build: plans and shapes, no data
    return parsed


def _wnorm_fits(budget: float, spec: QuantSpec = QuantSpec(group_size=64)) -> None:
    if spec.bits_per_element(1) > budget + _TOL:
        raise RateQError(f"wnorm@{_fmt(budget)}: 1 bit with {spec.id} already costs {spec.bits_per_element(1)} "
                         f"effective bits, more than the budget")


def build(name, model, *, budgets=(), context: BaselineContext | None = None) -> list[Method]:
    """The methods a baseline name (or a `parse_name` result) stands for (see the module docstring)."""
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
        else:
            out.append(rotated(context, kind[4:], budget))
    return out
