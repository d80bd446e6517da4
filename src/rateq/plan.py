"""`Plan`: bits and quantizer per unit (layer, KV head, K or V) — the solver's output, the runtime's input.

Saving and loading as a safetensors profile, and JSON export, live in `rateq.profile`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral

import torch

from .errors import RateQError
from .memory import format_bytes
from .models import ModelFingerprint
from .policy import CachePolicy
from .quant.spec import KIVI, QuantSpec, is_bits
from .quant.params import check_params, unit_param, wanted_params


@dataclass
class Plan:
    k_bits: torch.Tensor  # (L, H) int: code bits of each layer's KV head keys (16 = unquantized fp16)
    v_bits: torch.Tensor  # (L, H) int
    k_quantizer: torch.Tensor  # (L, H) int: index into `quantizers`
    v_quantizer: torch.Tensor  # (L, H) int
    quantizers: list[QuantSpec]
    model: ModelFingerprint
    budget_bits: float | None = None  # the effective-bits budget it was solved for (None: hand-made)
    policy: CachePolicy = field(default_factory=CachePolicy)  # runtime defaults (residual, block, sinks)
    calibration: dict = field(default_factory=dict)  # data, tokens, metric, seed, … of the curves behind it
    solver: dict = field(default_factory=dict)  # method, predicted distortion, gap, seconds
    weights: torch.Tensor | None = None  # (L, H, 2) elements per unit (counts); None = all equal
    params: dict = field(default_factory=dict)  # learned parameters of its quantizers (rateq.quant.params)

    def __post_init__(self):
        if not isinstance(self.model, ModelFingerprint):
            raise RateQError(f"a plan's model is a ModelFingerprint, got {type(self.model).__name__}")
        self.quantizers = list(self.quantizers)
        if not self.quantizers or not all(isinstance(q, QuantSpec) for q in self.quantizers):
            raise RateQError("a plan needs at least one quantizer, each a QuantSpec")
        self.budget_bits = check_budget(self.budget_bits, "a plan's budget", optional=True)
        if not isinstance(self.policy, CachePolicy):
            raise RateQError(f"a plan's policy is a CachePolicy, got {type(self.policy).__name__}")
        for name in ("calibration", "solver"):
            if not isinstance(getattr(self, name), dict):
                raise RateQError(f"a plan's {name} facts are a dict, got {type(getattr(self, name)).__name__}")
        L, H = self.model.num_layers, self.model.num_kv_heads
        for name in ("k_bits", "v_bits", "k_quantizer", "v_quantizer"):
            t = torch.as_tensor(getattr(self, name))
            if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not bool((t == t.round()).all())):
                raise RateQError(f"plan {name} must hold integers, got {t.dtype}")
            t = t.to(torch.int64)
            if tuple(t.shape) != (L, H):
                raise RateQError(f"plan {name} has shape {tuple(t.shape)}, expected ({L}, {H}) for {self.model.name}")
            setattr(self, name, t)
        for bits in (self.k_bits, self.v_bits):
            bad = sorted(b for b in set(bits.flatten().tolist()) if not is_bits(b))
            if bad:
                raise RateQError(f"plan bits must be 1..8 or 16, found {bad}")
        nq = len(self.quantizers)
        for q in (self.k_quantizer, self.v_quantizer):
            if q.numel() and (q.min() < 0 or q.max() >= nq):
                raise RateQError(f"plan quantizer ids must be in 0..{nq - 1}")
        for role, bits, qid in (("K", self.k_bits, self.k_quantizer), ("V", self.v_bits, self.v_quantizer)):
            for b, i in sorted(set(zip(bits.flatten().tolist(), qid.flatten().tolist()))):
                if not self.quantizers[i].allows_bits(b):
                    raise RateQError(f"the plan stores {role} units with {self.quantizers[i].id} at {b} bits; that "
                                     f"format is stored at {self.quantizers[i].fixed_bits} bits only")
        if self.weights is not None:
            w = torch.as_tensor(self.weights)
            if w.dtype == torch.bool or w.is_complex() or tuple(w.shape) != (L, H, 2):
                raise RateQError(f"plan weights must be real numbers of shape ({L}, {H}, 2), got {w.dtype} "
                                 f"{tuple(w.shape)}")
            w64 = w.to(torch.float64)
            if not bool(torch.isfinite(w64).all()) or bool((w64 < 0).any()) or not float(w64.sum()) > 0:
                raise RateQError("plan weights (elements per unit) must be finite, non-negative and not all zero")
            self.weights = w
        self.params = check_params(self.params, wanted_params(self.pairs(), L, H, self.model.head_dim),
                                   "the plan's quantizers")

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, model: ModelFingerprint, k_bits: int, v_bits: int | None = None,
                spec: QuantSpec = KIVI, **kw) -> "Plan":
        """Every head at the same bits (KxVy); `v_bits` defaults to `k_bits`."""
        L, H = model.num_layers, model.num_kv_heads
        v_bits = k_bits if v_bits is None else v_bits
        full = lambda v: torch.full((L, H), int(v), dtype=torch.int64)  # noqa: E731
        return cls(full(k_bits), full(v_bits), full(0), full(0), [spec], model, **kw)

    # -- per-unit views --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    def bits(self, role: str) -> torch.Tensor:
        return self.k_bits if role == "k" else self.v_bits

    def quantizer_ids(self, role: str) -> torch.Tensor:
        return self.k_quantizer if role == "k" else self.v_quantizer

    def spec(self, layer: int, head: int, role: str) -> QuantSpec:
        return self.quantizers[int(self.quantizer_ids(role)[layer, head])]

    def pairs(self) -> list[tuple[QuantSpec, int]]:
        """Every (quantizer, bits) some unit is stored with."""
        seen = set()
        for role in ("k", "v"):
            seen |= set(zip(self.quantizer_ids(role).flatten().tolist(), self.bits(role).flatten().tolist()))
        return [(self.quantizers[q], b) for q, b in sorted(seen)]

    def param(self, layer: int, heads, role: str, spec: QuantSpec, bits: int) -> torch.Tensor | None:
        """What the codec of `heads` of `layer`'s `role` under (`spec`, `bits`) learned in calibration (static
        scales, codebooks: `rateq.quant.params.unit_param`); None for quantizers that learn nothing."""
        return unit_param(self.params, spec, int(bits), layer, role, heads)

    def learned_nbytes(self) -> int:
        """Bytes of the learned parameters the plan's units use — a codebook (fp16 centroids) or a static scale
        (fp32) per unit and width, per layer and role for per-layer scales — a fixed cost per model, like the
        weights, not per cached token (`effective_bits` leaves it out)."""
        total = 0
        for r, role in enumerate(("k", "v")):
            for (qi, b), n in zip(*torch.unique(torch.stack([self.quantizer_ids(role), self.bits(role)], -1)
                                               .reshape(-1, 2), dim=0, return_counts=True)):
                spec, b, n = self.quantizers[int(qi)], int(b), int(n)
                if b >= 16 or not spec.learned:
                    continue
                if spec.static_scale == "tensor":  # one scale per layer holding the format
                    layers = ((self.quantizer_ids(role) == qi) & (self.bits(role) == b)).any(1)
                    total += 4 * int(layers.sum())
                elif spec.static_scale:
                    total += 4 * n
                else:
                    total += 2 * n * self.model.head_dim * (1 << (b * spec.group_size))
        return total

    def learned_share(self, num_parameters: int | None = None) -> float | None:
        """`learned_nbytes()` as a share of the model's fp16 weights (2 bytes per parameter: `num_parameters`, by
        default the fingerprint's); None when the parameter count is unknown."""
        return learned_facts(self.learned_nbytes(), num_parameters or self.model.num_parameters)["learned_share"]

    def unit_bits_per_element(self) -> torch.Tensor:
        """`(L, H, 2)` effective bits per element of every unit (code + metadata)."""
        out = torch.empty(self.num_layers, self.num_kv_heads, 2, dtype=torch.float64)
        for r, role in enumerate(("k", "v")):
            bits, qid = self.bits(role), self.quantizer_ids(role)
            for i, spec in enumerate(self.quantizers):
                for b in bits.unique().tolist():
                    sel = (qid == i) & (bits == b)
                    if sel.any():
                        out[..., r][sel] = spec.bits_per_element(int(b))
        return out

    def _mean(self, x: torch.Tensor) -> float:
        if self.weights is None:
            return float(x.mean())
        w = self.weights.to(torch.float64)
        return float((x * w).sum() / w.sum())

    @property
    def effective_bits(self) -> float:
        """Average stored bits per cached K/V element, metadata included (what `--budget` means)."""
        return self._mean(self.unit_bits_per_element())

    @property
    def nominal_bits(self) -> float:
        """Average code bits per cached K/V element (what most papers report)."""
        return self._mean(torch.stack([self.k_bits, self.v_bits], -1).to(torch.float64))

    def mean_bits(self, role: str) -> float:
        return float(self.bits(role).to(torch.float64).mean())

    def describe(self) -> str:
        return (f"{self.model.name}: {self.effective_bits:.3f} effective bits ({self.nominal_bits:.3f} nominal), "
                f"K {self.mean_bits('k'):.2f} / V {self.mean_bits('v'):.2f} mean code bits")


def learned_facts(nbytes: int, num_parameters: int | None) -> dict:
    """What every summary, evaluation row and cache report says of learned parameters: `learned_bytes`, the
    model's `fp16_weight_bytes` (2 per parameter) and the `learned_share` of them; those two are None where the
    parameter count is unknown (a plan made without the model, an old profile)."""
    weights = 2 * int(num_parameters) if num_parameters else None
    return {"learned_bytes": int(nbytes), "fp16_weight_bytes": weights,
            "learned_share": nbytes / weights if weights else None}


def learned_text(nbytes: int, share: float | None, *, short: bool = False) -> str:
    """`1.0 MiB, 0.39% of the model's fp16 weights` (`short`: `1.0 MiB (0.39%)`); the bytes alone when the
    share is unknown."""
    if share is None:
        return format_bytes(nbytes)
    pct = "<0.01%" if 0 < share < 5e-5 else f"{100 * share:.2f}%"
    return f"{format_bytes(nbytes)} ({pct})" if short else f"{format_bytes(nbytes)}, {pct} of the model's fp16 weights"


def check_budget(value, what: str = "budget", *, optional: bool = False) -> float | None:
    """The budget rule, for every budget rateq takes (solver, evaluation, plans, command line): a positive,
    finite number of effective bits per element, metadata included. Returns it as a float; None passes only
    when `optional` (a hand-made plan has no budget). `what` names the argument or option in the message
    (`budget`, `--budget`, …). Text is not a number here: parse it first."""
    if value is None and optional:
        return None
    budget = None
    if not isinstance(value, (bool, str, bytes)):
        try:
            budget = float(value)
        except (TypeError, ValueError, OverflowError, RuntimeError):  # not a number, or not one number
            pass
    if budget is None or not math.isfinite(budget) or budget <= 0:
        shown = repr(value) if budget is None else f"{budget:g}"
        none = " (or None)" if optional else ""
        raise RateQError(f"{what} must be a positive, finite number of effective bits per element{none}, e.g. 2.5; "
                         f"got {shown}")
    return budget


def policy_from_dict(data, where: str = "policy") -> CachePolicy:
    """A `CachePolicy` from stored JSON: a dict of whole numbers `residual`, `block`, `sinks` (each optional)."""
    if not isinstance(data, dict):
        raise RateQError(f"{where} must be a JSON object with residual, block and sinks, got {type(data).__name__}")
    unknown = set(data) - {"residual", "block", "sinks"}
    if unknown:
        raise RateQError(f"{where} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise RateQError(f"{where} {k} must be a whole number, got {v!r}")
    return CachePolicy(**{k: int(v) for k, v in data.items()})
