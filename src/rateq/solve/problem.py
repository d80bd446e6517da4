"""The solvers' shared view of an allocation problem: one row per unit, one column ("slot") per candidate.

Unit `u = (layer · H + head) · 2 + role` (role 0 = K, 1 = V), so a KV head's K and V units are neighbours.
Slot `c` is one `(quantizer, bits)` pair of the curves, in the curves' order (quantizer-major), plus an
optional last slot for unquantized fp16 (16 bits per element, no metadata, zero distortion). A slot whose
quantizer is not stored at its width (an engine format outside its one code width, `QuantSpec.allows_bits`)
is never valid, so fixed-width formats are chosen at their own width only.

Costs are effective bits per element (`QuantSpec.bits_per_element`: code bits + scales/zero-points), and a
unit's share of the budget is its element count over the total, so `Σ_u weight_u · cost_u ≤ budget` is exactly
the `Plan.effective_bits ≤ budget` that the plan will report. Per-unit restrictions (bit range, chosen
quantizers, fixed units) are expressed only as which slots are `valid`, so every solver honours them alike.

Rules of the engine that will run the plan are expressed the same way, once for every solver:

- tied groups (`group`): units that must take one slot together, e.g. every KV head of a layer when the engine
  stores a layer's cache at one width. The solvers choose per group; a group's valid slots are the intersection
  of its units'. Without ties every unit is its own group. Groups never span layers, except under
  `tie="model"` (one slot for every K unit of the model and one for every V unit, as llama.cpp's global
  `--cache-type-k` / `--cache-type-v`), which therefore takes no per-layer or per-device caps.
- caps (`layer_budget`, `device_layers` / `device_budget`): effective bits per element of a set of layers'
  units — one layer, or the layers one device (GPU) holds when the model is split across devices.

Keys ≥ values pairs a K group with a V group (one per KV head, or one per layer when heads are tied); a group
holding both K and V meets it by itself. The solvers work on *items*: every group alone, or every such pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import csr_array, vstack

from ..curves import Curves
from ..errors import RateQError
from ..plan import Plan, policy_from_dict
from ..plan import check_budget as check_budget_value  # build_problem's `check_budget` flag shadows the name
from ..policy import CachePolicy
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec
from ..quant.params import param_key

ROLES = ("k", "v")
FP16 = -1  # slot quantizer index of the unquantized candidate
TIES = ("layer", "layer-kv", "model")
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
    group: np.ndarray | None = None  # (N,) tied group 0..G−1 of every unit (None: every unit alone)
    tie: str | None = None  # the rule the groups come from (`TIES`), for the plan's record
    device_layers: np.ndarray | None = None  # (P, 2) first and last layer (inclusive) of each device
    device_budget: np.ndarray | None = None  # (P,) effective bits per element cap of each device's units
    learned_tokens: int | None = None  # learned parameters charged in slot_cost as if over this many tokens

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

    # -- tied groups and items -------------------------------------------------------------------------
    @property
    def unit_group(self) -> np.ndarray:
        """`(N,)` tied group of every unit."""
        return np.arange(self.num_units) if self.group is None else self.group

    @property
    def num_groups(self) -> int:
        return self.num_units if self.group is None else int(self.group.max()) + 1

    def group_weight(self) -> np.ndarray:
        """`(G,)` budget share of every group."""
        if self.group is None:
            return self.weight
        return np.bincount(self.group, weights=self.weight, minlength=self.num_groups)

    def group_valid(self) -> np.ndarray:
        """`(G, C)` slots a group may take: those every one of its units may take."""
        if self.group is None:
            return self.valid
        bad = np.zeros((self.num_groups, self.valid.shape[1]), dtype=bool)
        np.logical_or.at(bad, self.group, ~self.valid)
        return ~bad

    def group_dist(self) -> np.ndarray:
        """`(G, C)` summed distortion of every group's units."""
        if self.group is None:
            return self.dist
        d = np.zeros((self.num_groups, self.dist.shape[1]))
        np.add.at(d, self.group, self.dist)
        return d

    def group_layer(self) -> np.ndarray:
        """`(G,)` layer of every group."""
        layer = np.empty(self.num_groups, dtype=np.int64)
        layer[self.unit_group] = self.unit_layer
        return layer

    def group_pairs(self) -> np.ndarray:
        """`(P, 2)` (K group, V group) pairs that keys ≥ values binds (none without it)."""
        if not self.keys_at_least_values:
            return np.zeros((0, 2), dtype=np.int64)
        g = self.unit_group
        pairs = np.stack([g[0::2], g[1::2]], 1)
        return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)

    def items(self) -> np.ndarray:
        """`(I, M)` groups of every item: each group alone (M = 1), or each keys ≥ values pair (M = 2)."""
        pairs = self.group_pairs()
        if len(pairs) == 0:
            return np.arange(self.num_groups)[:, None]
        if not (np.bincount(pairs.ravel(), minlength=self.num_groups) == 1).all():
            raise AssertionError("with keys ≥ values every tied group must be in exactly one K/V pair")  # a bug
        return pairs

    def pair_candidates(self, gk: int, gv: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Slots `(ck, cv)` of every valid (K, V) choice of groups `gk`, `gv` with K bits ≥ V bits; `keep`
        `(G, C)` narrows the slots (default: the groups' valid slots)."""
        keep = self.group_valid() if keep is None else keep
        ck, cv = np.meshgrid(np.nonzero(keep[gk])[0], np.nonzero(keep[gv])[0], indexing="ij")
        ok = self.slot_bits[ck] >= self.slot_bits[cv]
        return ck[ok], cv[ok]

    def item_candidates(self, keep: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Every item's candidates, padded to one width with +inf cost and distortion: items `(I, M)`, costs
        `(I, K)` as shares of the whole budget, distortions `(I, K)`, and the groups' slots `(I, K, M)`.
        `keep` `(G, C)` narrows the slots (default: the groups' valid slots)."""
        keep = self.group_valid() if keep is None else keep
        w, d, items = self.group_weight(), self.group_dist(), self.items()
        if items.shape[1] == 1:
            G, C = keep.shape
            cost = np.where(keep, w[:, None] * self.slot_cost[None, :], np.inf)
            dist = np.where(keep, d, np.inf)
            return items, cost, dist, np.broadcast_to(np.arange(C)[None, :, None], (G, C, 1))
        cands = [self.pair_candidates(gk, gv, keep) for gk, gv in items]
        width = max(len(ck) for ck, _ in cands)
        cost = np.full((len(items), width), np.inf)
        dist = np.full((len(items), width), np.inf)
        slots = np.zeros((len(items), width, 2), dtype=np.int64)
        for i, ((gk, gv), (ck, cv)) in enumerate(zip(items, cands)):
            n = len(ck)
            cost[i, :n] = w[gk] * self.slot_cost[ck] + w[gv] * self.slot_cost[cv]
            dist[i, :n] = d[gk, ck] + d[gv, cv]
            slots[i, :n] = np.stack([ck, cv], 1)
        return items, cost, dist, slots

    def expand(self, group_choice: np.ndarray) -> np.ndarray:
        """Slot `(N,)` of every unit from the slot `(G,)` of every group."""
        return np.asarray(group_choice, dtype=np.int64)[self.unit_group]

    def group_choice(self, choice: np.ndarray) -> np.ndarray:
        """Slot `(G,)` of every group from a tie-honouring choice `(N,)`."""
        g = np.empty(self.num_groups, dtype=np.int64)
        g[self.unit_group] = choice
        return g

    def honours_ties(self, choice: np.ndarray) -> bool:
        return bool((self.expand(self.group_choice(choice)) == choice).all())

    def _name(self, units: np.ndarray) -> str:
        """Units in words: `layer 3 head 1 keys`, `layer 3 head 1`, `layer 3 values`, `layer 3`, `every layer's
        keys`."""
        H = self.num_kv_heads
        layers, heads, roles = (set(a.tolist()) for a in (units // (2 * H), units // 2, units % 2))
        if len(layers) > 1:
            every = len(units) == self.num_units // 2 and len(roles) == 1
            return f"every layer's {('keys', 'values')[roles.pop()]}" if every else f"units {units.tolist()}"
        name = f"layer {layers.pop()}" + (f" head {heads.pop() % H}" if len(heads) == 1 else "")
        return name + (f" {('keys', 'values')[roles.pop()]}" if len(roles) == 1 else "")

    def _tied(self) -> str:
        return f" with tie={self.tie!r}" if self.tie else ""

    # -- budget accounting -----------------------------------------------------------------------------
    def total_cost(self, choice: np.ndarray) -> float:
        """Effective bits per element of a choice `(N,)` of slots."""
        return float(np.dot(self.weight, self.slot_cost[choice]))

    def layer_weight(self) -> np.ndarray:
        """`(L,)` budget share of every layer."""
        return self.weight.reshape(self.num_layers, -1).sum(1)

    def caps(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer then per-device caps as rows over layers: `(R, L)` bool, which layers' units a row
        bounds, and `(R,)` the cap in effective bits per element of those units."""
        L = self.num_layers
        member, cap = [np.zeros((0, L), dtype=bool)], [np.zeros(0)]
        if self.layer_budget is not None:
            member.append(np.eye(L, dtype=bool))
            cap.append(self.layer_budget)
        if self.device_layers is not None:
            m = np.zeros((len(self.device_layers), L), dtype=bool)
            for p, (first, last) in enumerate(self.device_layers):
                m[p, first: last + 1] = True
            member.append(m)
            cap.append(self.device_budget)
        return np.concatenate(member), np.concatenate(cap).astype(np.float64)

    def cap_shares(self) -> tuple[np.ndarray, np.ndarray] | None:
        """`caps()` with every cap as a share of the whole budget (cap × the rows' share); None without caps."""
        member, cap = self.caps()
        return None if len(cap) == 0 else (member, cap * (member @ self.layer_weight()))

    def cap_costs(self, choice: np.ndarray) -> np.ndarray:
        """`(R,)` effective bits per element of every cap row's units under `choice`."""
        member, _ = self.caps()
        share = np.bincount(self.unit_layer, weights=self.weight * self.slot_cost[choice], minlength=self.num_layers)
        return (member @ share) / (member @ self.layer_weight())

    def distortion(self, choice: np.ndarray) -> float:
        return float(self.dist[np.arange(self.num_units), choice].sum())

    def _group_cost_range(self) -> tuple[np.ndarray, np.ndarray]:
        """`(G,)` cheapest and dearest valid slot cost of every group, with keys ≥ values honoured pairwise."""
        valid = self.group_valid()
        cost = np.where(valid, self.slot_cost[None, :], np.nan)  # (G, C)
        lo, hi = np.nanmin(cost, 1), np.nanmax(cost, 1)
        if not self.keys_at_least_values:
            return lo, hi
        # A pair's cheapest need not be both groups' cheapest slots when K must carry ≥ V bits.
        w = self.group_weight()
        for gk, gv in self.group_pairs():
            ck, cv = self.pair_candidates(gk, gv, valid)
            c = self.slot_cost[ck] * w[gk] + self.slot_cost[cv] * w[gv]
            i, j = int(np.argmin(c)), int(np.argmax(c))
            lo[gk], lo[gv] = self.slot_cost[ck[i]], self.slot_cost[cv[i]]
            hi[gk], hi[gv] = self.slot_cost[ck[j]], self.slot_cost[cv[j]]
        return lo, hi

    def cost_range(self) -> tuple[float, float]:
        """The budgets some plan can meet: (all groups at their cheapest, all at their dearest)."""
        lo, hi = self._group_cost_range()
        w = self.group_weight()
        return float(w @ lo), float(w @ hi)

    def check_feasible(self, *, budget: bool = True) -> None:
        """Raise a RateQError naming the feasible range if no plan can meet the budget(s) and constraints.

        All groups at their cheapest meets every cap that any plan meets (caps only bound costs from above, and
        a group or pair never spans layers), so these checks are exact, not only necessary."""
        valid = self.group_valid()
        empty = np.nonzero(~valid.any(1))[0]
        if len(empty):
            units = np.nonzero(self.unit_group == empty[0])[0]
            raise RateQError(f"tie={self.tie!r}: {self._name(units)}: no candidate is allowed for all of these units "
                             "(fixed units, or a quantizer only some can hold); unfix them or drop the tie")
        for gk, gv in self.group_pairs():
            if len(self.pair_candidates(gk, gv, valid)[0]) == 0:
                units = np.nonzero((self.unit_group == gk) | (self.unit_group == gv))[0]
                raise RateQError(f"{self._name(units)}: no allowed key width is ≥ an allowed value width"
                                 f"{self._tied()}; widen --min-bits/--max-bits or drop keys_at_least_values")
        if budget:
            tied = f"; tie={self.tie!r}" if self.tie else ""
            used = sorted({int(q) for q in self.slot_q[self.valid.any(0)] if q != FP16})  # those left to choose
            check_budget_range(self.budget, *self.cost_range(),
                               f"for these curves and constraints (quantizers "
                               f"{', '.join(self.curves.quantizers[i].id for i in used) or 'none: fp16 only'}; "
                               f"bits {list(self.curves.bits)}{tied})")
        member, cap = self.caps()
        if len(cap):
            lo, _ = self._group_cost_range()
            share = np.bincount(self.group_layer(), weights=self.group_weight() * lo, minlength=self.num_layers)
            cheapest = (member @ share) / (member @ self.layer_weight())
            bad = np.nonzero(cheapest > cap * (1 + BUDGET_RTOL))[0]
            if len(bad):
                r = int(bad[0])
                n_layer = 0 if self.layer_budget is None else self.num_layers
                if r < n_layer:
                    what = f"per-layer budget {cap[r]:g} for layer {r}"
                else:
                    first, last = self.device_layers[r - n_layer]
                    what = f"devices[{r - n_layer}] cap {cap[r]:g} for layers {first}..{last}"
                raise RateQError(f"{what} is below the cheapest {'that layer' if r < n_layer else 'those layers'} "
                                 f"can be stored at ({cheapest[r]:.4f} effective bits{self._tied()}); raise it")

    def within_budget(self, choice: np.ndarray) -> bool:
        """Whether `choice` meets the budget and every per-layer and per-device cap."""
        if self.total_cost(choice) > self.budget * (1 + BUDGET_RTOL):
            return False
        _, cap = self.caps()
        return not (len(cap) and (self.cap_costs(choice) > cap * (1 + BUDGET_RTOL)).any())

    def excess(self, choice: np.ndarray) -> float:
        """By how many effective bits per element `choice` exceeds its most exceeded budget or cap (≤ 0: none)."""
        over = self.total_cost(choice) - self.budget
        _, cap = self.caps()
        return max(over, float((self.cap_costs(choice) - cap).max())) if len(cap) else over

    def rows(self, var_group: np.ndarray, var_slot: np.ndarray) -> tuple[csr_array, np.ndarray, np.ndarray, int]:
        """The coupling rows `lo ≤ A·x ≤ hi` over variables `x[v]` (1 when group `var_group[v]` takes slot
        `var_slot[v]`): the budget and every cap (the first `n` rows, `≤` in shares of the whole budget), then
        one row per keys ≥ values pair (`Σ bits·x[K] − Σ bits·x[V] ≥ 0`). Returns `(A, lo, hi, n)`."""
        V = len(var_group)
        cols = np.arange(V)
        var_cost = self.group_weight()[var_group] * self.slot_cost[var_slot]
        rows, lo, hi = [csr_array(var_cost[None, :])], [-np.inf], [self.budget]
        shares = self.cap_shares()
        if shares is not None:
            member, limit = shares
            per_layer = csr_array((var_cost, (self.group_layer()[var_group], cols)), shape=(self.num_layers, V))
            rows.append(csr_array(member.astype(np.float64)) @ per_layer)
            lo += [-np.inf] * len(limit)
            hi += limit.tolist()
        n = len(hi)
        pairs = self.group_pairs()
        if len(pairs):
            row, sign = np.full(self.num_groups, -1), np.zeros(self.num_groups)
            row[pairs[:, 0]], row[pairs[:, 1]] = np.arange(len(pairs)), np.arange(len(pairs))
            sign[pairs[:, 0]], sign[pairs[:, 1]] = 1.0, -1.0
            on = row[var_group] >= 0
            coef = sign[var_group[on]] * self.slot_bits[var_slot[on]]
            rows.append(csr_array((coef, (row[var_group[on]], cols[on])), shape=(len(pairs), V)))
            lo += [0.0] * len(pairs)
            hi += [np.inf] * len(pairs)
        return vstack(rows, format="csr"), np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64), n

    # -- result ----------------------------------------------------------------------------------------
    def _param_keys(self, choice: np.ndarray) -> set:
        """The learned parameters the units' chosen (quantizer, bits) need."""
        q, b = self.slot_q[choice], self.slot_bits[choice]
        return {param_key(self.curves.quantizers[int(qi)], int(bi)) for qi, bi in zip(q, b) if qi >= 0} - {None}

    def to_plan(self, choice: np.ndarray, solver: dict) -> Plan:
        """The plan of a choice `(N,)` of slots; quantizers are renumbered to those the plan uses."""
        choice = np.asarray(choice, dtype=np.int64)
        if not self.valid[np.arange(self.num_units), choice].all():
            raise AssertionError("solver chose a slot that is not allowed")  # a solver bug, not a user error
        if not self.honours_ties(choice):
            raise AssertionError("solver gave tied units different slots")
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
        if self.tie is not None:
            info["tie"] = self.tie
        if self.learned_tokens is not None:
            info["learned_tokens"] = self.learned_tokens
        if self.device_layers is not None:
            info["devices"] = [[int(a), int(b), float(c)] for (a, b), c in zip(self.device_layers, self.device_budget)]
        return Plan(
            k_bits=t(bits[..., 0]), v_bits=t(bits[..., 1]), k_quantizer=t(qid[..., 0]), v_quantizer=t(qid[..., 1]),
            quantizers=[self.curves.quantizers[i] for i in used], model=self.curves.model, budget_bits=self.budget,
            policy=self.policy, calibration={"metric": self.curves.metric, **self.curves.calibration},
            solver=info, weights=self.curves.counts.clone(),
            params={k: v for k, v in self.curves.params.items() if k in self._param_keys(choice)},
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
    costs = [q.bits_per_element(b) for q in quantizers for b in widths if q.allows_bits(b)]
    if allow_fp16:
        costs.append(float(FULL_PRECISION_BITS))
    if not costs:
        raise RateQError(f"none of quantizers {', '.join(q.id for q in quantizers)} is stored at bits {widths} "
                         f"(engine formats take their own width only: {_fixed_widths(quantizers)})")
    return min(costs), max(costs)


def _fixed_widths(quantizers) -> str:
    """`nvfp4 at 4, q8_0 at 8` for the fixed-width formats among `quantizers` (or `none`)."""
    return ", ".join(f"{q.id} at {q.fixed_bits}" for q in quantizers if q.fixed_bits is not None) or "none"


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
                  tie: str | None = None, devices=None, check_budget: bool = True,
                  learned_tokens: int | None = None) -> Problem:
    """Flatten curves and constraints into a `Problem`, validating every input and the budget's feasibility.

    `tie`: `"layer"` ties every KV head of a layer (its K units take one slot, its V units one slot),
    `"layer-kv"` ties K and V too (one slot per layer), `"model"` ties every K unit of the model and every V unit
    (one slot each; no per-layer budgets or devices with it). `devices`: `[(first layer, last layer, cap), …]`, the
    layers each device holds (inclusive, disjoint) and the cap in effective bits per element of their units.
    `learned_tokens`: charge learned parameters (codebooks, static scales) against the budget as if spread over
    that many cached tokens per sequence.
    """
    if not isinstance(curves, Curves):
        raise RateQError(f"solve needs a rateq.Curves, got {type(curves).__name__}")
    budget = check_budget_value(budget, "budget")
    if tie is not None and tie not in TIES:
        raise RateQError(f"tie must be None, {', '.join(map(repr, TIES[:-1]))} or {TIES[-1]!r}, got {tie!r}")
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
    if learned_tokens is not None and (isinstance(learned_tokens, bool) or not isinstance(learned_tokens, int)
                                       or learned_tokens < 1):
        raise RateQError(f"learned_tokens must be a positive whole number of cached tokens, got {learned_tokens!r}")
    slot_cost = curves.cost(learned_tokens).reshape(-1).numpy()
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

    # Slots every free unit may take: widths the quantizer is stored at, bit range and quantizer subset.
    stored = np.array([q == FP16 or curves.quantizers[q].allows_bits(int(b)) for q, b in zip(slot_q, slot_bits)])
    free = stored.copy()
    if min_bits is not None:
        free &= (slot_bits >= min_bits) | (slot_q == FP16)
    if max_bits is not None:
        free &= (slot_bits <= max_bits) | (slot_q == FP16)
    if quantizers is not None:
        allowed = {_quantizer_index(curves, q) for q in (quantizers if isinstance(quantizers, (list, tuple)) else [quantizers])}
        free &= np.isin(slot_q, sorted(allowed)) | (slot_q == FP16)
    if not free.any():
        raise RateQError(f"no candidate left: bits {list(curves.bits)} within [{min_bits}, {max_bits}] "
                         f"and quantizers {quantizers!r} leave nothing to choose (engine formats take their own "
                         f"width only: {_fixed_widths(curves.quantizers)})")
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
                stored = np.append(stored, True)
                allow_fp16 = True
            row = slot_q == FP16
        else:
            if b not in curves.bits:
                raise RateQError(f"fixed unit {key!r}: {b} bits is not a calibrated width {list(curves.bits)} (or 16)")
            row = (slot_bits == b) & stored
            if q is not None:
                qi = _quantizer_index(curves, q)
                row &= slot_q == qi
                if not row.any():
                    raise RateQError(f"fixed unit {key!r}: quantizer {curves.quantizers[qi].id} is stored at "
                                     f"{curves.quantizers[qi].fixed_bits} bits only, not {b}")
            elif not row.any():
                raise RateQError(f"fixed unit {key!r}: no quantizer of the curves is stored at {b} bits (engine "
                                 f"formats take their own width only: {_fixed_widths(curves.quantizers)})")
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

    device_layers, device_budget = _devices(devices, L)
    if tie == "model" and (layer_budget is not None or device_layers is not None):
        raise RateQError("tie='model' gives every layer's keys one slot and every layer's values one, across layers; "
                         "per-layer budgets and devices cap single layers: drop them or use tie='layer'")
    group = None
    if tie is not None:
        u = np.arange(N)
        group = {"layer": u // (2 * H) * 2 + u % 2, "layer-kv": u // (2 * H), "model": u % 2}[tie]

    problem = Problem(curves=curves, weight=weight, slot_q=slot_q, slot_bits=slot_bits, slot_cost=slot_cost,
                      dist=dist, valid=valid, budget=budget, layer_budget=layer_budget,
                      keys_at_least_values=bool(keys_at_least_values), policy=policy or calibration_policy(curves),
                      group=group, tie=tie, device_layers=device_layers, device_budget=device_budget,
                      learned_tokens=learned_tokens)
    problem.check_feasible(budget=check_budget)
    return problem


def _devices(devices, L: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`(P, 2)` first and last layer and `(P,)` caps of `[(first, last, cap), …]`, checked; None for none."""
    if devices is None or (isinstance(devices, (list, tuple)) and len(devices) == 0):
        return None, None
    if not isinstance(devices, (list, tuple)):
        raise RateQError(f"devices must be a list of (first layer, last layer, cap), got {type(devices).__name__}")
    layers, caps = [], []
    for i, d in enumerate(devices):
        try:
            first, last, cap = d
        except (TypeError, ValueError):
            raise RateQError(f"devices[{i}] must be (first layer, last layer, cap), got {d!r}") from None
        ints = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (first, last))
        if not ints or not 0 <= first <= last < L:
            raise RateQError(f"devices[{i}] layers {first!r}..{last!r} must be whole numbers with "
                             f"0 ≤ first ≤ last ≤ {L - 1}")
        layers.append((int(first), int(last)))
        caps.append(check_budget_value(cap, f"devices[{i}] cap"))
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    for a, b in zip(order, order[1:]):
        if layers[b][0] <= layers[a][1]:
            raise RateQError(f"devices[{b}] layers {layers[b][0]}..{layers[b][1]} overlap devices[{a}] layers "
                             f"{layers[a][0]}..{layers[a][1]}; each layer lives on one device")
    return np.array(layers, dtype=np.int64), np.array(caps, dtype=np.float64)


def calibration_policy(curves: Curves) -> CachePolicy:
    """The runtime policy of plans solved from `curves`: the one they were measured under (their calibration
    facts' `policy`), or, for curves that do not record one, the default policy for their quantizers (a key
    block holding whole key groups of each). `rateq.solve` and `rateq solve` both take it from here."""
    d = curves.calibration.get("policy")
    if d is None:
        return CachePolicy.for_quantizers(curves.quantizers)
    return policy_from_dict(d, "the curves' calibration policy")
