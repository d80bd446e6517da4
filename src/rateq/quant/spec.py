"""Quantizer specifications: validated plain data, serialised as JSON in curves and profiles.

A spec says *how* a unit's K or V is quantized; the bit width is chosen per unit by the solver and passed
separately. Every budget in rateq is counted with `QuantSpec.bits_per_element`, which includes metadata
(scales, zero-points) — the "effective" bits. Code bits alone are the "nominal" bits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import RateQError

# Storage formats for scales (and float zero-points), with their size in bits.
SCALE_DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8}
KINDS = ("minmax", "symmetric")
ZERO_FORMATS = ("float", "code")
GROUP_ALONG = ("auto", "tokens", "channels")
FULL_PRECISION_BITS = 16  # a unit planned at 16 bits is stored unquantized in fp16


@dataclass(frozen=True)
class QuantSpec:
    """How one unit (a layer's KV head, K or V) is quantized.

    - `kind`: `minmax` (asymmetric: scale + zero-point per group, KIVI) or `symmetric` (mid-rise, one scale
      per group, every code used; the seeds' "per-channel symmetric INT").
    - `group_size`: elements sharing one scale (and zero-point).
    - `group_along`: `tokens` — each group is G consecutive tokens of one channel (per-channel, KIVI keys);
      `channels` — G consecutive channels of one token (per-token, KIVI values); `auto` picks those two for
      K and V respectively.
    - `scale_dtype`: storage of scales and float zero-points (`fp16` default; `bf16`, `fp8`, `fp32`).
    - `zero`: `float` stores the group minimum in `scale_dtype`; `code` stores an integer zero-point of the
      code's own width (cheaper metadata).
    """

    kind: str = "minmax"
    group_size: int = 32
    group_along: str = "auto"
    scale_dtype: str = "fp16"
    zero: str = "float"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RateQError(f"unknown quantizer kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise RateQError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.group_along not in GROUP_ALONG:
            raise RateQError(f"group_along must be one of {', '.join(GROUP_ALONG)}, got {self.group_along!r}")
        if self.scale_dtype not in SCALE_DTYPE_BITS:
            raise RateQError(f"scale_dtype must be one of {', '.join(SCALE_DTYPE_BITS)}, got {self.scale_dtype!r}")
        if self.zero not in ZERO_FORMATS:
            raise RateQError(f"zero must be one of {', '.join(ZERO_FORMATS)}, got {self.zero!r}")

    # -- identity ---------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Short stable name, e.g. `minmax-g32-fp16`."""
        parts = [self.kind, f"g{self.group_size}"]
        if self.group_along != "auto":
            parts.append(self.group_along)
        parts.append(self.scale_dtype)
        if self.kind == "minmax" and self.zero != "float":
            parts.append(f"z{self.zero}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RateQError(f"quantizer spec has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- layout -----------------------------------------------------------------------------------------
    def axis_for(self, role: str) -> str:
        """`tokens` or `channels`: the direction groups run in for `role` ('k' or 'v')."""
        if role not in ("k", "v"):
            raise ValueError(f"role must be 'k' or 'v', got {role!r}")
        if self.group_along != "auto":
            return self.group_along
        return "tokens" if role == "k" else "channels"

    # -- accounting -------------------------------------------------------------------------------------
    def metadata_bits_per_group(self, bits: int) -> int:
        if bits >= FULL_PRECISION_BITS:
            return 0
        scale = SCALE_DTYPE_BITS[self.scale_dtype]
        if self.kind == "symmetric":
            return scale
        return scale + (scale if self.zero == "float" else bits)

    def bits_per_element(self, bits: int) -> float:
        """Effective stored bits per element at `bits` code bits: code bits + metadata bits / group size."""
        if bits >= FULL_PRECISION_BITS:
            return float(FULL_PRECISION_BITS)
        if not 1 <= bits <= 8:
            raise RateQError(f"bits must be in 1..8 (or {FULL_PRECISION_BITS} for unquantized), got {bits}")
        return bits + self.metadata_bits_per_group(bits) / self.group_size


KIVI = QuantSpec()  # asymmetric min-max, groups of 32, fp16 scale and zero-point: +1.0 bit per element


def parse_spec(text: str) -> QuantSpec:
    """Parse a spec id such as `minmax-g32-fp16`, `symmetric-g64-bf16` or `minmax-g64-fp16-zcode`, or JSON."""
    text = text.strip()
    if text.startswith("{"):
        return QuantSpec.from_dict(json.loads(text))
    parts = text.split("-")
    kw: dict = {"kind": parts[0]}
    for p in parts[1:]:
        if p.startswith("g") and p[1:].isdigit():
            kw["group_size"] = int(p[1:])
        elif p in SCALE_DTYPE_BITS:
            kw["scale_dtype"] = p
        elif p in ("tokens", "channels"):
            kw["group_along"] = p
        elif p.startswith("z") and p[1:] in ZERO_FORMATS:
            kw["zero"] = p[1:]
        else:
            raise RateQError(f"cannot parse quantizer {text!r}: unknown part {p!r}")
    return QuantSpec(**kw)
