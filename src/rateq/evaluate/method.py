"""`Method`: one row of an evaluation — a plan, a baseline quantizer, or full precision — with its storage cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from ..plan import Plan, learned_facts
from ..policy import CachePolicy
from ..simulate import KVTransform, plan_transform


@dataclass
class Method:
    """What the evaluation runs: `build(policy)` returns the KV transform (None: full precision, no transform).

    `nominal_bits` are code bits per cached element; `effective_bits` add metadata (scales, zero-points) and,
    for rank reduction, count the kept coefficients — what `--budget` means. `key_group` is the token-group
    size of the keys' quantizer: the evaluation's key block must be a multiple of it (KIVI quantizes keys
    block by block, one group per block). `policy` is the row's own cache policy (a profile's); None runs the
    row under the evaluation's policy.
    """

    name: str
    family: str
    nominal_bits: float
    effective_bits: float
    build: Callable[[CachePolicy], KVTransform] | None = None
    plan: Plan | None = None
    budget: float | None = None
    key_group: int = 1
    label: str = ""
    notes: str = ""
    info: dict = field(default_factory=dict)
    policy: CachePolicy | None = None

    @property
    def is_full_precision(self) -> bool:
        return self.build is None

    def policy_for(self, policy: CachePolicy) -> CachePolicy:
        """The policy this row runs under: its own if it has one, else `policy`, with the key block raised to a
        multiple of this method's key group size."""
        policy = self.policy if self.policy is not None else policy
        block = policy.block * self.key_group // math.gcd(policy.block, self.key_group)
        return policy if block == policy.block else replace(policy, block=block)

    def row(self, num_parameters: int | None = None) -> dict:
        """The row's description; with the bytes of its plan's learned parameters (codebooks, static scales: 0
        without) and their share of the model's fp16 weights (`num_parameters`, by default the plan's
        fingerprint's; None when unknown) — a per-model cost outside `effective_bits`."""
        plan = self.plan
        learned = plan.learned_nbytes() if plan is not None else 0
        count = num_parameters or (plan.model.num_parameters if plan is not None else None)
        return {
            "name": self.name, "label": self.label or self.name, "family": self.family, "budget": self.budget,
            "nominal_bits": self.nominal_bits, "effective_bits": self.effective_bits, "notes": self.notes,
            **learned_facts(learned, count),
        }

    @classmethod
    def from_plan(cls, plan: Plan, name: str | None = None, *, family: str = "plan", label: str = "",
                  notes: str = "", budget: float | None = None, policy: CachePolicy | None = None) -> "Method":
        """A plan run through the one-pass evaluation with its own quantizers; under `policy` if given (e.g.
        `plan.policy`), else under the evaluation's policy."""
        groups = [q.group_size for q in plan.quantizers if q.axis_for("k") == "tokens"]
        key_group = math.lcm(*groups) if groups else 1
        return cls(
            name=name or f"plan@{plan.effective_bits:.3g}", family=family, nominal_bits=plan.nominal_bits,
            effective_bits=plan.effective_bits, build=lambda policy, rope=None: plan_transform(plan, policy, rope), plan=plan,
            budget=plan.budget_bits if budget is None else budget, key_group=key_group, policy=policy, label=label,
            notes=notes,
        )
