"""Quantizer specifications: validated plain data, serialised as JSON in curves and profiles.

A spec says *how* a unit's K or V is quantized; the bit width is chosen per unit by the solver and passed
separately. Every budget in rateq is counted with `QuantSpec.bits_per_element`, which includes metadata
(scales, zero-points, norms, residual norms, sparse outliers) — the "effective" bits. Code bits alone are the
"nominal" bits. `rateq.quant.codec_for(spec)` encodes and decodes every spec through one interface.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from ..errors import RateQError

# Storage formats for scales (and float zero-points), with their size in bits.
SCALE_DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8}
# Formats serving engines run, each at its one code width, with its own fixed metadata (see `QuantSpec`).
ENGINE_FORMATS = {"fp8": 8, "nvfp4": 4, "q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "iq4_nl": 4,
                  "fp8_tensor": 8, "fp8_head": 8, "int8_tensor": 8, "int8_head": 8, "int4_head": 4}
ENGINE_GROUP = {"fp8": 1, "nvfp4": 16, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "iq4_nl": 32,
                "fp8_tensor": 1, "fp8_head": 1, "int8_tensor": 1, "int8_head": 1, "int4_head": 1}
# Engine formats whose one scale is calibrated offline and fixed (no per-token metadata): shared by a layer's
# heads (`tensor`: one per layer and role, as vLLM's, SGLang's and TensorRT-LLM's checkpoint k_scale/v_scale)
# or one per KV head (`head`: compressed-tensors' `attn_head` strategy).
STATIC_SCALE = {"fp8_tensor": "tensor", "fp8_head": "head", "int8_tensor": "tensor", "int8_head": "head",
                "int4_head": "head"}
KINDS = ("minmax", "symmetric", "lloydmax", "codebook", *ENGINE_FORMATS)
CODE_BITS_MAX = 8  # codebook codes (b bits × c channels) are packed like any code: at most 8 bits each
CODEBOOK_BITS_MAX = 4  # beyond 4 bits per element a uniform grid with its metadata costs little more
ROTATIONS = ("none", "hadamard", "rhadamard")
OUTLIER_VALUE_BITS = 16  # sparse outliers are kept in fp16
ZERO_FORMATS = ("float", "code")
GROUP_ALONG = ("auto", "tokens", "channels")
FULL_PRECISION_BITS = 16  # a unit planned at 16 bits is stored unquantized in fp16


def is_bits(bits: int) -> bool:
    """Whether `bits` is a width a unit can be stored at: 1..8 code bits, or 16 (unquantized fp16)."""
    return 1 <= bits <= 8 or bits == FULL_PRECISION_BITS


def check_bits(bits: int) -> int:
    """`bits` itself, or a RateQError naming the widths a unit can be stored at."""
    if not is_bits(bits):
        raise RateQError(f"bits must be in 1..8 (or {FULL_PRECISION_BITS} for unquantized), got {bits}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one unit (a layer's KV head, K or V) is quantized.

    - `kind`: `minmax` (asymmetric: scale + zero-point per group, KIVI) or `symmetric` (mid-rise, one scale
      per group, every code used; per-channel symmetric INT when groups run along tokens).
    - `group_size`: elements sharing one scale (and zero-point).
    - `group_along`: `tokens` — each group is G consecutive tokens of one channel (per-channel, KIVI keys);
      `channels` — G consecutive channels of one token (per-token, KIVI values); `auto` picks those two for
      K and V respectively.
    - `scale_dtype`: storage of scales and float zero-points (`fp16` default; `bf16`, `fp8`, `fp32`).
    - `zero`: `float` stores the group minimum in `scale_dtype`; `code` stores an integer zero-point of the
      code's own width (cheaper metadata).

    Families beyond uniform grids (all default off, so the specs above keep their ids and bits):
    - `kind="lloydmax"`: rotate, split each token's head vector into groups of `group_size` channels, store each
      group's norm in `scale_dtype` and its unit direction coordinate-wise with the Lloyd–Max codebook of a
      random unit vector's coordinate (TurboQuant-MSE; `group_size = head_dim` is one norm per vector).
      Groups always run along channels. Needs a rotation.
    - `kind="codebook"`: every token's head vector cut into groups of `group_size` = c channels (1, 2, 4 or 8),
      each group stored as the index of the nearest of 2^(b·c) centroids — b bits per element, no per-token
      metadata — from a codebook learned per unit, per group and per width in calibration (Coupled
      Quantization's channel-coupled codebooks; c = 1 is a non-uniform scalar datatype per channel, KVQuant's).
      b·c ≤ 8 and b ≤ 4. Takes `rotation` and `prerope` (keys coded before RoPE); no scales, zero-points or outliers.
    - `qjl`: (lloydmax only) TurboQuant-prod: at `b` bits, `b − 1` bits of Lloyd–Max plus a 1-bit QJL sketch
      (one sign per channel) of each group's residual and the residual norm in `scale_dtype`; inner products
      with the reconstruction are unbiased.
    - `rotation`: `hadamard` (normalised Walsh–Hadamard over the head dim, before quantizing; inverse after) or
      `rhadamard` (the same after a fixed ±1 sign flip drawn from `seed`). Costs no stored bits.
    - `outlier_frac`: in each group, the ceil(frac·G) largest-magnitude entries are kept exactly in fp16 with
      their index in the group (KVQuant's dense-and-sparse), picked before any rotation; counted in the bits.
    - `prerope`: keys are quantized before the rotary embedding and re-rotated after dequantization
      (KVQuant); needs the rotary tables of the positions (`rateq.quant.rope`). Values are unaffected.
    - `seed`: seed of the random signs and of the QJL matrix.

    Engine formats (`kind` one of `ENGINE_FORMATS`; id = the kind alone), each at its one code width
    (`fixed_bits`), every token's head vector quantized in groups of channels with the engine's own metadata,
    so that a plan of them is what the engine stores:
    - `fp8`: FP8 e4m3 codes with unit scale (vLLM / SGLang / TensorRT-LLM `fp8` KV without calibrated scales):
      8 bits, no metadata.
    - `nvfp4`: FP4 e2m1 codes, one FP8 e4m3 scale per 16 channels (amax / 6), unit tensor scale: 4.5 bits.
    - llama.cpp's `q8_0` (8.5 bits), `q4_0` (4.5), `q5_0` (5.5): symmetric, one fp16 scale per 32; `q4_1` (5):
      fp16 scale and minimum per 32; `iq4_nl` (4.5): fp16 scale per 32 times a fixed non-linear 16-level table.
    - static scales, calibrated offline (`static_scale`), no per-token metadata: `fp8_tensor` / `fp8_head` (FP8
      e4m3 of x / s, one s per layer and role, or per KV head), `int8_tensor` / `int8_head` (symmetric INT8,
      round(x / s) in −127..127) and `int4_head` (symmetric INT4, −8..7): 8, 8, 8, 8 and 4 bits. The scales are
      learned in calibration on windows apart from the priced ones and kept with the curves, plans and
      profiles (`rateq.quant.static`).
    They take no rotation, pre-RoPE, outliers or other options (engines store post-RoPE keys as they are).
    """

    kind: str = "minmax"
    group_size: int = 32
    group_along: str = "auto"
    scale_dtype: str = "fp16"
    zero: str = "float"
    rotation: str = "none"
    qjl: bool = False
    outlier_frac: float = 0.0
    prerope: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RateQError(f"unknown quantizer kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind in ENGINE_FORMATS:
            plain = QuantSpec(group_size=ENGINE_GROUP[self.kind])
            changed = [f.name for f in fields(self) if f.name != "kind" and getattr(self, f.name) != getattr(plain, f.name)]
            if changed:
                raise RateQError(f"{self.kind} is an engine format with fixed groups and metadata: it takes no "
                                 f"{', '.join(changed)} (use the id {self.kind!r} alone)")
            return
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise RateQError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.group_along not in GROUP_ALONG:
            raise RateQError(f"group_along must be one of {', '.join(GROUP_ALONG)}, got {self.group_along!r}")
        if self.scale_dtype not in SCALE_DTYPE_BITS:
            raise RateQError(f"scale_dtype must be one of {', '.join(SCALE_DTYPE_BITS)}, got {self.scale_dtype!r}")
        if self.zero not in ZERO_FORMATS:
            raise RateQError(f"zero must be one of {', '.join(ZERO_FORMATS)}, got {self.zero!r}")
        if self.rotation not in ROTATIONS:
            raise RateQError(f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        if self.kind == "lloydmax":
            if self.rotation == "none":
                raise RateQError("lloydmax codebooks are designed for rotated coordinates: add rotation='rhadamard' "
                                 "(id part 'rhadamard', e.g. lloydmax-g64-rhadamard-fp16)")
            if self.group_along == "tokens":
                raise RateQError("lloydmax normalises each token's vector: its groups run along channels, "
                                 "use group_along='auto' or 'channels'")
            if self.zero != "float":
                raise RateQError("lloydmax stores a norm per group, not a zero-point: leave zero='float'")
            if self.group_size < 2:
                raise RateQError("lloydmax needs groups of at least 2 channels")
        if self.kind == "codebook":
            if self.group_size not in (1, 2, 4, 8):
                raise RateQError(f"codebook groups code 1, 2, 4 or 8 channels jointly, got {self.group_size}")
            if self.group_along == "tokens" or self.zero != "float" or self.scale_dtype != "fp16" or self.outlier_frac:
                raise RateQError("codebook quantizers store one code per group of channels and nothing else: they "
                                 "take no group_along='tokens', zero, scale_dtype or outliers")
        if not isinstance(self.qjl, bool) or not isinstance(self.prerope, bool):
            raise RateQError("qjl and prerope must be true or false")
        if self.qjl and self.kind != "lloydmax":
            raise RateQError("a QJL residual sketch is available for kind='lloydmax' only (TurboQuant-prod)")
        if not isinstance(self.outlier_frac, (int, float)) or not 0 <= self.outlier_frac < 1:
            raise RateQError(f"outlier_frac must be in [0, 1), got {self.outlier_frac!r}")
        if self.outliers_per_group() >= self.group_size:
            raise RateQError(f"outlier_frac {self.outlier_frac} keeps every entry of a group of {self.group_size}; "
                             "use a smaller fraction or a 16-bit plan")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise RateQError(f"seed must be a non-negative integer, got {self.seed!r}")

    # -- identity ---------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Short stable name, e.g. `minmax-g32-fp16`, `lloydmax-qjl-g64-rhadamard-fp16`, `minmax-g32-fp16-o0.02-prerope`,
        or an engine format's kind (`nvfp4`, `q4_0`)."""
        if self.kind in ENGINE_FORMATS:
            return self.kind
        parts = [self.kind] + (["qjl"] if self.qjl else []) + [f"g{self.group_size}"]
        if self.group_along != "auto":
            parts.append(self.group_along)
        if self.rotation != "none":
            parts.append(self.rotation)
        if self.kind != "codebook":  # no scales: nothing stored in a scale dtype
            parts.append(self.scale_dtype)
        if self.kind == "minmax" and self.zero != "float":
            parts.append(f"z{self.zero}")
        if self.outlier_frac:
            parts.append("o" + f"{self.outlier_frac:.12f}".rstrip("0"))  # never an exponent: ids split on '-'
        if self.prerope:
            parts.append("prerope")
        if self.seed:
            parts.append(f"s{self.seed}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        # Fields added after the first format are written only when set, so the specs that existed before them
        # serialise exactly as they did (older profiles and readers stay byte-compatible).
        d = asdict(self)
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

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
        if self.kind in ("lloydmax", "codebook") or self.kind in ENGINE_FORMATS:
            return "channels"
        if self.group_along != "auto":
            return self.group_along
        return "tokens" if role == "k" else "channels"

    # -- accounting -------------------------------------------------------------------------------------
    @property
    def is_uniform_plain(self) -> bool:
        """A plain uniform grid (minmax/symmetric, no rotation, outliers or pre-RoPE): `affine.py` alone."""
        return (self.kind in ("minmax", "symmetric") and self.rotation == "none" and not self.outlier_frac
                and not self.prerope)

    @property
    def fixed_bits(self) -> int | None:
        """The one code width an engine format is stored at; None for families calibrated at any width."""
        return ENGINE_FORMATS.get(self.kind)

    @property
    def static_scale(self) -> str | None:
        """`tensor` or `head`: the format's one scale is calibrated offline per layer and role, or per KV head
        (kept with the curves and plans, see `rateq.quant.static`); None for formats with no learned scale."""
        return STATIC_SCALE.get(self.kind)

    @property
    def learned(self) -> bool:
        """Whether calibration learns a parameter of this quantizer per unit (static scales, codebooks), kept
        with curves and plans (`rateq.quant.params`)."""
        return bool(self.static_scale) or self.kind == "codebook"

    def allows_bits(self, bits: int) -> bool:
        """Whether a unit can be stored at `bits` with this spec (16 = unquantized is always possible)."""
        if bits == FULL_PRECISION_BITS:
            return True
        if self.kind == "codebook" and (bits * self.group_size > CODE_BITS_MAX or bits > CODEBOOK_BITS_MAX):
            return False
        return is_bits(bits) and (self.fixed_bits is None or bits == self.fixed_bits)

    def base_bits(self, bits: int) -> int:
        """Code bits of the dense quantizer at `bits`: `bits − 1` with a QJL sketch (its 1 bit per element), else
        `bits`. 0 means no dense stage (1-bit TurboQuant-prod is the sketch alone)."""
        return bits - 1 if self.qjl else bits

    def outliers_per_group(self) -> int:
        """Entries of each group kept sparse in fp16: ceil(outlier_frac · group_size)."""
        if not self.outlier_frac:
            return 0
        return math.ceil(round(self.outlier_frac * self.group_size, 9))

    def outlier_index_bits(self) -> int:
        """Bits of one outlier's position inside its group."""
        return (self.group_size - 1).bit_length()

    def metadata_bits_per_group(self, bits: int) -> int:
        if bits >= FULL_PRECISION_BITS:
            return 0
        if self.kind in ENGINE_FORMATS:  # fp8: none; nvfp4: an e4m3 scale; q4_1: fp16 scale + min; others: fp16 scale
            if self.static_scale:
                return 0  # one scale per layer or head, calibrated offline: a fixed cost, not per token
            return {"fp8": 0, "nvfp4": 8, "q4_1": 32}.get(self.kind, 16)
        if self.kind == "codebook":
            return 0  # codebooks are a fixed per-model cost, not per token
        scale = SCALE_DTYPE_BITS[self.scale_dtype]
        sparse = self.outliers_per_group() * (OUTLIER_VALUE_BITS + self.outlier_index_bits())
        if self.kind == "lloydmax":
            # the group norm (when there is a dense stage) and, with QJL, the residual norm
            return scale * (self.base_bits(bits) >= 1) + scale * self.qjl + sparse
        if self.kind == "symmetric":
            return scale + sparse
        return scale + (scale if self.zero == "float" else bits) + sparse

    def learned_bits_per_element(self, bits: int, tokens: int, head_dim: int) -> float:
        """A unit's learned parameter spread over `tokens` cached tokens of `head_dim` channels, in bits per cached
        element: codebooks of 2^(b·c) fp16 centroids of c channels, one per group of c channels, cost
        16·2^(b·c) / tokens; a static scale (fp32, counted once per head: an upper bound for per-layer scales)
        32 / (tokens · head_dim). 0 for quantizers that learn nothing."""
        if bits >= FULL_PRECISION_BITS or not (self.static_scale or self.kind == "codebook"):
            return 0.0
        if self.static_scale:
            return 32.0 / (tokens * head_dim)
        return 16.0 * (1 << (bits * self.group_size)) / tokens

    def bits_per_element(self, bits: int) -> float:
        """Effective stored bits per element at `bits` code bits: code bits + metadata bits / group size."""
        if check_bits(bits) == FULL_PRECISION_BITS:
            return float(FULL_PRECISION_BITS)
        return bits + self.metadata_bits_per_group(bits) / self.group_size


_LATER_FIELDS = ("rotation", "qjl", "outlier_frac", "prerope", "seed")

KIVI = QuantSpec()  # asymmetric min-max, groups of 32, fp16 scale and zero-point: +1.0 bit per element


def parse_spec(text: str) -> QuantSpec:
    """Parse a spec id such as `minmax-g32-fp16`, `symmetric-g64-bf16`, `minmax-g64-fp16-zcode`,
    `lloydmax-qjl-g64-rhadamard-fp16` or `minmax-g32-hadamard-fp16-o0.02-prerope-s3`, or JSON."""
    text = text.strip()
    if text.startswith("{"):
        return QuantSpec.from_dict(json.loads(text))
    if text in ENGINE_FORMATS:
        return QuantSpec(kind=text, group_size=ENGINE_GROUP[text])
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
        elif p in ROTATIONS:
            kw["rotation"] = p
        elif p == "qjl":
            kw["qjl"] = True
        elif p == "prerope":
            kw["prerope"] = True
        elif p.startswith("o") and _is_float(p[1:]):
            kw["outlier_frac"] = float(p[1:])
        elif p.startswith("s") and p[1:].isdigit():
            kw["seed"] = int(p[1:])
        else:
            raise RateQError(f"cannot parse quantizer {text!r}: unknown part {p!r}")
    return QuantSpec(**kw)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def role_problem(spec: QuantSpec, role: str, head_dim: int) -> str | None:
    """Why `spec` cannot store `role` ('k'/'v') of heads of `head_dim` (None: it can). Channel groups must divide
    the head dim, and values (quantized per token as they leave the residual window) need their groups along
    channels. A quantizer may serve one role only — keys per channel over 128 tokens, say, with 64-dim heads."""
    axis = spec.axis_for(role)
    if axis == "channels" and head_dim % spec.group_size:
        return (f"quantizer {spec.id} groups {spec.group_size} channels but head_dim {head_dim} is not a multiple of "
                f"it; use a group size that divides {head_dim}")
    if role == "v" and axis == "tokens":
        return (f"values are quantized per token as they leave the residual window, so their groups must run along "
                f"channels; quantizer {spec.id} groups them along tokens (use group_along='auto' or 'channels')")
    return None


def holds_role(spec: QuantSpec, role: str, head_dim: int) -> bool:
    """Whether `spec` can store `role` of heads of `head_dim` (`role_problem` says why not)."""
    return role_problem(spec, role, head_dim) is None
