"""The solvers' shared view of an allocation problem: one row per unit, one column ("slot") per candidate.

Unit `u = (layer · H + head) · 2 + role` (role 0 = K, 1 = V), so a KV head's K and V units are neighbours.
Slot `c` is one `(quantizer, bits)` pair of the curves, in the curves' order (quantizer-major), plus an
optional last slot for unquantized fp16 (16 bits per element, no metadata, zero distortion).

Costs are effective bits per element (`QuantSpec.bits_per_element`: code bits + scales/zero-points), and a
unit's share of the budget is its element count over the total, so `Σ_u weight_u · cost_u ≤ budget` is exactly
the `Plan.effective_bits ≤ budget` that the plan will report. Per-unit restrictions (bit range, chosen
quantizers, fixed units) are expressed only as which slots are `valid`, so every solver honours them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..curves import Curves
from ..errors import RateQError
from ..plan import Plan, policy_from_dict
from ..plan import check_budget as check_budget_value  # build_problem's `check_budget` flag shadows the name
from ..policy import CachePolicy
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec

ROLES = ("k", "v")
FP16 = -1  # slot quantizer index of the unquantized candidate
# Budget comparisons allow this much relative slack, so that a budget equal to a plan's own cost (e.g. a
# uniform plan's effective bits typed back in) is met rather than lost to float rounding.
BUDGET_RTOL = 1e-12


@dataclass
class Problem:
    curves: Curves  # monotone curves the problem was built from
    weight: np.ndarray  # (N,) unit elements / all elements: the unit's share of the budget
    slot_q: np.ndarray  # (C,) quantizer index into curves.quantizers, FP16 for the unquantized slot
    slot_bits: np.ndarray  # (C,) code bits (16 for fp16)
    slot_cost: np.ndarray  # (C,) effective bits per element
    dist: np.ndarray  # (N, C) distortion of every unit under every slot (0 for fp16)
    valid: np.ndarray  # (N, C) bool: slots a unit may take
    budget: float  # effective bits per element, over all units
    layer_budget: np.ndarray | None = None  # (L,) effective bits per element cap of each layer's units
    keys_at_least_values: bool = False
    policy: CachePolicy = field(default_factory=CachePolicy)

    # -- shape -----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.curves.model.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.curves.model.num_kv_heads

    @property
    def num_units(self) -> int:
        return self.dist.shape[0]

    @property
    def unit_layer(self) -> np.ndarray:
        """`(N,)` layer of every unit."""
        return np.arange(self.num_units) // (2 * self.num_kv_heads)

    @property
    def unit_role(self) -> np.ndarray:
        """`(N,)` 0 for K units, 1 for V units."""
        return np.arange(self.num_units) % 2

    # -- budget accounting -----------------------------------------------------------------------------
    def total_cost(self, choice: np.ndarray) -> float:
        """Effective bits per element of a choice `(N,)` of slots."""
        return float(np.dot(self.weight, self.slot_cost[choice]))

    def layer_costs(self, choice: np.ndarray) -> np.ndarray:
        """`(L,)` effective bits per element of each layer's units under `choice`."""
        w = self.weight.reshape(self.num_layers, -1)
        return (w * self.slot_cost[choice].reshape(self.num_layers, -1)).sum(1) / w.sum(1)

    def distortion(self, choice: np.ndarray) -> float:
        return float(self.dist[np.arange(self.num_units), choice].sum())

    def _unit_cost_range(self) -> tuple[np.ndarray, np.ndarray]:
        """`(N,)` cheapest and dearest valid cost of every unit, with keys ≥ values honoured pairwise."""
        cost = np.where(self.valid, self.slot_cost[None, :], np.nan)  # (N, C)
        lo, hi = np.nanmin(cost, 1), np.nanmax(cost, 1)
        if not self.keys_at_least_values:
            return lo, hi
        # A KV head's cheapest pair need not be both units' cheapest slots when K must carry ≥ V bits.
        for g in range(self.num_units // 2):
            ck, cv = self.pair_candidates(g)
            c = self.slot_cost[ck] * self.weight[2 * g] + self.slot_cost[cv] * self.weight[2 * g + 1]
            i, j = int(np.argmin(c)), int(np.argmax(c))
            lo[2 * g], lo[2 * g + 1] = self.slot_cost[ck[i]], self.slot_cost[cv[i]]
            hi[2 * g], hi[2 * g + 1] = self.slot_cost[ck[j]], self.slot_cost[cv[j]]
        return lo, hi

    def pair_candidates(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots `(ck, cv)` of every valid (K, V) pair of KV head `g` (unit 2g, 2g+1) with K bits ≥ V bits."""
        ks, vs = np.nonzero(self.valid[2 * g])[0], np.nonzero(self.valid[2 * g + 1])[0]
        ck, cv = np.meshgrid(ks, vs, indexing="ij")
        ok = self.slot_bits[ck] >= self.slot_bits[cv]
        return ck[ok], cv[ok]

    def cost_range(self) -> tuple[float, float]:
        """The budgets some plan can meet: (all units at their cheapest, all at their dearest)."""
        lo, hi = self._unit_cost_range()
        return float(self.weight @ lo), float(self.weight @ hi)

    def check_feasible(self, *, budget: bool = True) -> None:
        """Raise a RateQError naming the feasible range if no plan can meet the budget(s) and constraints."""
        if self.keys_at_least_values:
            for g in range(self.num_units // 2):
                if len(self.pair_candidates(g)[0]) == 0:
                    l, h = divmod(g, self.num_kv_heads)
                    raise RateQError(f"layer {l} head {h}: no allowed key width is ≥ an allowed value width; "
                                     "widen --min-bits/--max-bits or drop keys_at_least_values")
        if budget:
            check_budget_range(self.budget, *self.cost_range(),
                               f"for these curves and constraints (quantizers "
                               f"{', '.join(q.id for q in self.curves.quantizers)}; bits {list(self.curves.bits)})")
        if self.layer_budget is not None:
            ulo, _ = self._unit_cost_range()
            w = self.weight.reshape(self.num_layers, -1)
            layer_lo = (w * ulo.reshape(self.num_layers, -1)).sum(1) / w.sum(1)
            bad = np.nonzero(layer_lo > self.layer_budget * (1 + BUDGET_RTOL))[0]
            if len(bad):
                l = int(bad[0])
                raise RateQError(f"per-layer budget {self.layer_budget[l]:g} for layer {l} is below the cheapest "
                                 f"that layer can be stored at ({layer_lo[l]:.4f} effective bits); raise it")

    def within_budget(self, choice: np.ndarray) -> bool:
        if self.total_cost(choice) > self.budget * (1 + BUDGET_RTOL):
            return False
        if self.layer_budget is not None and (self.layer_costs(choice) > self.layer_budget * (1 + BUDGET_RTOL)).any():
            return False
        return True

    # -- result ----------------------------------------------------------------------------------------
    def to_plan(self, choice: np.ndarray, solver: dict) -> Plan:
        """The plan of a choice `(N,)` of slots; quantizers are renumbered to those the plan uses."""
        choice = np.asarray(choice, dtype=np.int64)
        if not self.valid[np.arange(self.num_units), choice].all():
            raise AssertionError("solver chose a slot that is not allowed")  # a solver bug, not a user error
        L, H = self.num_layers, self.num_kv_heads
        q = self.slot_q[choice]
        used = sorted(set(q[q >= 0].tolist())) or [0]
        remap = np.zeros(len(self.curves.quantizers), dtype=np.int64)
        remap[used] = np.arange(len(used))
        qid = np.where(q >= 0, remap[np.maximum(q, 0)], 0).reshape(L, H, 2)
        bits = self.slot_bits[choice].reshape(L, H, 2)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        info = {"predicted_distortion": self.distortion(choice), "metric": self.curves.metric, **solver}
        if self.keys_at_least_values:
            info["keys_at_least_values"] = True
        if self.layer_budget is not None:
            info["per_layer_budget"] = [float(b) for b in self.layer_budget]
        return Plan(
            k_bits=t(bits[..., 0]), v_bits=t(bits[..., 1]), k_quantizer=t(qid[..., 0]), v_quantizer=t(qid[..., 1]),
            quantizers=[self.curves.quantizers[i] for i in used], model=self.curves.model, budget_bits=self.budget,
            policy=self.policy, calibration={"metric": self.curves.metric, **self.curves.calibration},
            solver=info, weights=self.curves.counts.clone(),
        )


# -- construction ----------------------------------------------------------------------------------------

def _quantizer_index(curves: Curves, q) -> int:
    specs = curves.quantizers
    if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
        if 0 <= q < len(specs):
            return int(q)
    elif isinstance(q, QuantSpec) and q in specs:
        return specs.index(q)
    elif isinstance(q, str):
        ids = [s.id for s in specs]
        if q in ids:
            return ids.index(q)
    raise RateQError(f"quantizer {q!r} is not in the curves; they have {', '.join(s.id for s in specs)} "
                     f"(ids 0..{len(specs) - 1})")


def _unit_index(curves: Curves, key) -> int:
    try:
        layer, head, role = key
    except (TypeError, ValueError):
        raise RateQError(f"fixed keys are (layer, head, 'k' or 'v'), got {key!r}") from None
    L, H = curves.model.num_layers, curves.model.num_kv_heads
    r = {"k": 0, "v": 1, 0: 0, 1: 1}.get(role.lower() if isinstance(role, str) else role)
    if r is None or not (0 <= int(layer) < L and 0 <= int(head) < H):
        raise RateQError(f"fixed unit {key!r} is outside layers 0..{L - 1}, heads 0..{H - 1}, roles 'k'/'v'")
    return (int(layer) * H + int(head)) * 2 + r


def budget_range(quantizers: list[QuantSpec], bits, *, min_bits: int | None = None, max_bits: int | None = None,
                 allow_fp16: bool = False) -> tuple[float, float]:
    """Feasible budgets before any curve exists (every unit the same choices): for checking a budget early."""
    widths = [b for b in bits if (min_bits is None or b >= min_bits) and (max_bits is None or b <= max_bits)]
    if not widths and not allow_fp16:
        raise RateQError(f"no bit width of {list(bits)} lies in [{min_bits}, {max_bits}]")
    costs = [q.bits_per_element(b) for q in quantizers for b in widths]
    if allow_fp16:
        costs.append(float(FULL_PRECISION_BITS))
    return min(costs), max(costs)


def in_budget_range(budget: float, lo: float, hi: float) -> bool:
    """Whether `budget` lies in the feasible range `[lo, hi]`, with the solvers' slack (`BUDGET_RTOL`)."""
    return lo * (1 - BUDGET_RTOL) <= budget <= hi * (1 + BUDGET_RTOL)


def check_budget_range(budget: float, lo: float, hi: float, of: str, *, what: str = "budget") -> None:
    """A RateQError naming the feasible range `[lo, hi]` (of `of`: which candidates it is the range of) when
    `budget` lies outside it. `what` names the argument or option (`budget`, `--budget`)."""
    if not in_budget_range(budget, lo, hi):
        raise RateQError(f"{what} {budget:g} effective bits per element is outside the feasible range "
                         f"[{lo:.4f}, {hi:.4f}] {of}; pick a budget inside it")


def check_feasible_budget(budget, quantizers: list[QuantSpec], bits, *, min_bits: int | None = None,
                          max_bits: int | None = None, allow_fp16: bool = False, what: str = "budget") -> float:
    """`budget` checked as the solver will check it, before any curve exists (so before a model loads): the
    budget rule (`rateq.plan.check_budget`), then the feasible range of these candidates (`budget_range`).
    Returns the budget as a float. `what` names the argument or option in the messages."""
    budget = check_budget_value(budget, what)
    check_budget_range(budget, *budget_range(quantizers, bits, min_bits=min_bits, max_bits=max_bits,
                                             allow_fp16=allow_fp16),
                       f"of quantizers {', '.join(q.id for q in quantizers)} at bits {list(bits)}", what=what)
    return budget


def build_problem(curves: Curves, budget: float, *, min_bits: int | None = None, max_bits: int | None = None,
                  keys_at_least_values: bool = False, fixed: dict | None = None, per_layer_budget=None,
                  quantizers=None, allow_fp16: bool = False, policy: CachePolicy | None = None,
                  check_budget: bool = True) -> Problem:
    """Flatten curves and constraints into a `Problem`, validating every input and the budget's feasibility."""
    if not isinstance(curves, Curves):
        raise RateQError(f"solve needs a rateq.Curves, got {type(curves).__name__}")
    budget = check_budget_value(budget, "budget")
    if min_bits is not None and max_bits is not None and min_bits > max_bits:
        raise RateQError(f"min_bits {min_bits} is above max_bits {max_bits}")

    curves = curves.monotone()
    L, H = curves.model.num_layers, curves.model.num_kv_heads
    Q, NB = len(curves.quantizers), len(curves.bits)
    N = L * H * 2

    counts = curves.counts.reshape(N).numpy().astype(np.float64)
    if (counts < 0).any() or counts.sum() <= 0:
        raise RateQError("curve counts must be non-negative with a positive total")
    weight = counts / counts.sum()

    bits = np.array(curves.bits, dtype=np.int64)
    slot_q = np.repeat(np.arange(Q), NB)
    slot_bits = np.tile(bits, Q)
    slot_cost = curves.cost().reshape(-1).numpy()
    dist = curves.distortion.reshape(N, Q * NB).numpy().copy()  # (N, C)
    if np.isnan(dist).any() or (dist < 0).any() or np.isneginf(dist).any():
        raise RateQError("curves contain negative or NaN distortion; recalibrate")
    # +inf marks a candidate the unit cannot take (a quantizer that cannot hold that role): never valid.
    holdable = np.isfinite(dist)
    if allow_fp16:
        slot_q = np.append(slot_q, FP16)
        slot_bits = np.append(slot_bits, FULL_PRECISION_BITS)
        slot_cost = np.append(slot_cost, float(FULL_PRECISION_BITS))
        dist = np.concatenate([dist, np.zeros((N, 1))], 1)
        holdable = np.concatenate([holdable, np.ones((N, 1), dtype=bool)], 1)

    # Slots every free unit may take: bit range and quantizer subset.
    free = np.ones(len(slot_q), dtype=bool)
    if min_bits is not None:
        free &= (slot_bits >= min_bits) | (slot_q == FP16)
    if max_bits is not None:
        free &= (slot_bits <= max_bits) | (slot_q == FP16)
    if quantizers is not None:
        allowed = {_quantizer_index(curves, q) for q in (quantizers if isinstance(quantizers, (list, tuple)) else [quantizers])}
        free &= np.isin(slot_q, sorted(allowed)) | (slot_q == FP16)
    if not free.any():
        raise RateQError(f"no candidate left: bits {list(curves.bits)} within [{min_bits}, {max_bits}] "
                         f"and quantizers {quantizers!r} leave nothing to choose")
    valid = np.broadcast_to(free, (N, len(slot_q))) & holdable
    if not valid.any(1).all():
        raise RateQError("some units have no candidate their quantizers can hold; add a quantizer for both K and V")

    # Fixed units: `bits` (any allowed quantizer at that width) or `(quantizer, bits)`; 16 = fp16.
    for key, value in (fixed or {}).items():
        u = _unit_index(curves, key)
        q, b = (None, value) if not isinstance(value, (tuple, list)) else value
        b = int(b)
        if b == FULL_PRECISION_BITS:
            if not allow_fp16:
                slot_q = np.append(slot_q, FP16)
                slot_bits = np.append(slot_bits, FULL_PRECISION_BITS)
                slot_cost = np.append(slot_cost, float(FULL_PRECISION_BITS))
                dist = np.concatenate([dist, np.zeros((N, 1))], 1)
                valid = np.concatenate([valid, np.zeros((N, 1), dtype=bool)], 1)
                allow_fp16 = True
            row = slot_q == FP16
        else:
            if b not in curves.bits:
                raise RateQError(f"fixed unit {key!r}: {b} bits is not a calibrated width {list(curves.bits)} (or 16)")
            row = slot_bits == b
            if q is not None:
                row &= slot_q == _quantizer_index(curves, q)
        valid[u] = row

    layer_budget = None
    if per_layer_budget is not None:
        values = per_layer_budget
        if isinstance(values, (np.ndarray, torch.Tensor)):
            values = values.tolist()
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if len(values) not in (1, L):
            raise RateQError(f"per_layer_budget must be one budget or {L} of them (one per layer), got {len(values)}")
        lb = [check_budget_value(v, "per_layer_budget" if len(values) == 1 else f"per_layer_budget[{l}]")
              for l, v in enumerate(values)]
        layer_budget = np.array(lb * L if len(lb) == 1 else lb, dtype=np.float64)

    problem = Problem(curves=curves, weight=weight, slot_q=slot_q, slot_bits=slot_bits, slot_cost=slot_cost,
                      dist=dist, valid=valid, budget=budget, layer_budget=layer_budget,
                      keys_at_least_values=bool(keys_at_least_values), policy=policy or calibration_policy(curves))
    problem.check_feasible(budget=check_budget)
    return problem


def calibration_policy(curves: Curves) -> CachePolicy:
    """The runtime policy of plans solved from `curves`: the one they were measured under (their calibration
    facts' `policy`), or, for curves that do not record one, the default policy for their quantizers (a key
    block holding whole key groups of each). `rateq.solve` and `rateq solve` both take it from here."""
    d = curves.calibration.get("policy")
    if d is None:
        return CachePolicy.for_quantizers(curves.quantizers)
    return policy_from_dict(d, "the curves' calibration policy")
