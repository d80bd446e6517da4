"""One interface for every quantizer family: `codec_for(spec).encode / decode / fake_quantize / nbytes`.

`encode(x (B, h, T, D), bits, role)` returns what a cache stores — packed codes and metadata in its storage
dtype, a `dict[str, Tensor]` — and `decode(enc, bits, role, shape, dtype)` the dense tensor the attention
uses. `fake_quantize` is `decode ∘ encode` without the packing (bit for bit the same result, faster), and for
the plain uniform specs it is exactly `rateq.quant.affine.fake_quantize`. `nbytes(enc)` is what the encoding
occupies; it equals `spec.bits_per_element(bits) × B·h·T·D / 8` whenever the packed rows hold whole 8-code
groups (head_dim a multiple of 8, and the code-width metadata of each head — integer zero-points, outlier
positions — a multiple of 8 codes; otherwise one row's tail is padded).

The pipeline, each stage optional (spec fields):

    post-RoPE key ─► invert RoPE (prerope) ─► pull sparse outliers ─► rotate (Walsh–Hadamard)
      ─► dense quantizer (uniform grid | norm + Lloyd–Max codebook [+ QJL sketch of the residual])
      ─► … decode in reverse: dequantize ─► unrotate ─► put outliers back ─► re-apply RoPE

Layout of an encoding, every tensor with leading `(B, h)` (a runtime bucket holds one per chunk of tokens):
- `codes` uint8 `(B, h, T, D·b/8)`: the dense codes of each token's row (rotated coordinates when rotated),
  packed along the head dim. Lloyd–Max with QJL stores `b − 1`-bit codes here and the signs in `qjl`.
- uniform grids: `scale` `(B, h, rows, X)` in `scale_dtype` — per token (`rows = T`, `X = D/G`) when groups run
  along channels, per channel of each block of G tokens (`rows = T/G`, `X = D`) when along tokens; `zero` the
  same for float zero-points, or packed at the code width per head `(B, h, ·)` for integer ones.
- Lloyd–Max: `norm` `(B, h, T, D/G)`; with QJL `qjl` uint8 `(B, h, T, D/8)` (one sign per channel) and `rnorm`
  `(B, h, T, D/G)`.
- outliers: `out_val` fp16 `(B, h, n_groups, k)`, `out_idx` packed positions per head `(B, h, ·)`.
- 16 bits: `fp16` `(B, h, T, D)` (pre-RoPE keys for a `prerope` spec).

What attention sees. `decode` returns a reconstruction. For QJL that is `k̂ = k̂_mse + r̂` with
`r̂ = ‖r‖·sqrt(π/2)/m·Sᵀ sign(S r)`, whose inner product with any query is exactly TurboQuant-prod's unbiased
estimator `⟨q, k̂_mse⟩ + ‖r‖·sqrt(π/2)/m·⟨S q, sign(S r)⟩`; the one-pass evaluation and the runtime both
run ordinary attention on the reconstruction, so scores are the estimator and `Σ p v̂` is unbiased given `p`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import RateQError
from . import hadamard, lloydmax, outliers, qjl
from .affine import QuantizedGroups, dequantize_groups, from_groups, quantize_groups, storage_dtype, to_groups
from .pack import pack, unpack
from .rope import Rope, apply_rope, invert_rope
from .spec import FULL_PRECISION_BITS, QuantSpec

Encoding = dict[str, torch.Tensor]


def _pack_wide(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integers of `nbits` ≤ 16 along the last dim: up to 8 bits as one plane, else a raw low byte
    followed by the packed high bits (positions in groups longer than 256)."""
    if nbits <= 8:
        return pack(values, nbits)
    v = values.to(torch.int64)
    return torch.cat([(v & 0xFF).to(torch.uint8), pack(v >> 8, nbits - 8)], -1)


def _unpack_wide(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    if nbits <= 8:
        return unpack(packed, nbits, n).to(torch.int64)
    low = packed[..., :n].to(torch.int64)
    return low | (unpack(packed[..., n:], nbits - 8, n).to(torch.int64) << 8)


@dataclass(frozen=True)
class Codec:
    """Encoder/decoder of one `QuantSpec`; stateless (codebooks, signs and sketches are cached by value)."""

    spec: QuantSpec

    # -- public interface ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, bits: int, role: str, *, rope: Rope | None = None) -> Encoding:
        """`x (B, h, T, D)` → the stored form (packed codes + metadata in storage dtypes)."""
        return self._pack(self._quantize(x, bits, role, rope), bits, x.shape)

    def decode(self, enc: Encoding, bits: int, role: str, shape, dtype=torch.float32, *,
               rope: Rope | None = None) -> torch.Tensor:
        """The stored form → dense `(B, h, T, D)` in `dtype`. `shape` is the encoded tensor's shape."""
        shape = torch.Size(shape)
        return self._dequantize(self._unpack(enc, bits, shape), bits, role, shape, rope).to(dtype)

    def fake_quantize(self, x: torch.Tensor, bits: int, role: str, *, rope: Rope | None = None) -> torch.Tensor:
        """`decode(encode(x))` in `x.dtype`, without packing."""
        return self._dequantize(self._quantize(x, bits, role, rope), bits, role, x.shape, rope).to(x.dtype)

    def quantize_parts(self, x: torch.Tensor, bits: int, role: str, *, rope: Rope | None = None) -> dict:
        """`x (B, h, T, D)` → unpacked parts (integer `codes` in their row layout; `scale`, `zero`, `norm`,
        `rnorm` in fp32 already rounded to their storage format; `qjl` signs; sparse outliers). Storing them in
        their formats is lossless, so a store that packs them decodes to exactly `fake_quantize(x)`."""
        return self._quantize(x, bits, role, rope)

    def dequantize_parts(self, parts: dict, bits: int, role: str, shape, *, rope: Rope | None = None) -> torch.Tensor:
        """Parts (as `quantize_parts` gives them, metadata in fp32) → dense fp32 `(B, h, T, D)`."""
        return self._dequantize(parts, bits, role, torch.Size(shape), rope)

    @staticmethod
    def nbytes(enc: Encoding) -> int:
        return sum(t.numel() * t.element_size() for t in enc.values())

    # -- stages ----------------------------------------------------------------------------------------
    def _uses_rope(self, role: str) -> bool:
        return self.spec.prerope and role == "k"

    def _check(self, bits: int, role: str, rope, shape) -> None:
        if not (1 <= bits <= 8 or bits == FULL_PRECISION_BITS):
            raise RateQError(f"bits must be in 1..8 (or {FULL_PRECISION_BITS} for unquantized), got {bits}")
        if self._uses_rope(role) and rope is None:
            raise RateQError(f"{self.spec.id} quantizes keys before RoPE and needs the rotary tables of their positions: "
                             "pass rope=(cos, sin) (rateq.simulate_plan and the runtime do this)")
        if self.spec.rotation != "none" and bits < FULL_PRECISION_BITS:
            hadamard.check_dim(shape[-1])
        if self.spec.kind == "lloydmax" and shape[-1] % self.spec.group_size:
            raise RateQError(f"head_dim {shape[-1]} does not split into lloydmax groups of {self.spec.group_size}")

    def _rotate(self, y: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        s = self.spec
        if s.rotation == "none":
            return y
        f = hadamard.unrotate if inverse else hadamard.rotate
        return f(y, random_signs=s.rotation == "rhadamard", seed=s.seed)

    def _quantize(self, x: torch.Tensor, bits: int, role: str, rope) -> dict:
        """`x (B, h, T, D)` → unpacked parts: integer codes in their row layout, metadata in fp32 already rounded
        to its storage format (so storing it is lossless)."""
        s = self.spec
        self._check(bits, role, rope, x.shape)
        y = x.to(torch.float32)
        if self._uses_rope(role):
            y = invert_rope(y, rope)
        if bits >= FULL_PRECISION_BITS:
            return {"fp16": y.to(torch.float16)}
        B, h, T, D = x.shape
        G = s.group_size
        axis = s.axis_for(role)
        parts: dict = {}
        k = s.outliers_per_group()
        if k:
            dense, vals, idx = outliers.split(to_groups(y, axis, G), k, "zero" if s.rotation != "none" else "range")
            parts["out_val"], parts["out_idx"] = vals, idx  # (B, h, n, k)
            y = from_groups(dense, axis, G, x.shape)
        y = self._rotate(y)  # (B, h, T, D)
        if s.kind == "lloydmax":
            parts.update(self._quantize_lloydmax(y, bits))
            return parts
        q = quantize_groups(to_groups(y, axis, G), bits, s)  # codes (B, h, n, G), scale (B, h, n, 1)
        rows, X = (T, D // G) if axis == "channels" else (T // G, D)
        parts["codes"] = from_groups(q.codes, axis, G, x.shape)  # (B, h, T, D)
        parts["scale"] = q.scale.reshape(B, h, rows, X)
        if q.zero is not None:
            parts["zero"] = q.zero.reshape(B, h, rows, X)
        return parts

    def _quantize_lloydmax(self, y: torch.Tensor, bits: int) -> dict:
        s = self.spec
        B, h, T, D = y.shape
        G = s.group_size
        g = y.reshape(B, h, T, D // G, G)
        sdt = storage_dtype(s.scale_dtype)
        parts: dict = {}
        base = s.base_bits(bits)
        if base >= 1:
            norm = g.norm(dim=-1, keepdim=True).to(sdt).to(torch.float32)  # (B, h, T, D/G, 1)
            codes = lloydmax.encode_unit(g / norm.clamp_min(1e-30), base)
            parts["codes"], parts["norm"] = codes.reshape(B, h, T, D), norm.squeeze(-1)
            g_hat = norm * lloydmax.decode_unit(codes, base, G)
        else:
            g_hat = torch.zeros_like(g)
        if s.qjl:
            r = g - g_hat  # the residual of what is really stored (rounded norm included)
            parts["qjl"] = qjl.encode(r, s.seed).reshape(B, h, T, D)
            parts["rnorm"] = r.norm(dim=-1).to(sdt).to(torch.float32)  # (B, h, T, D/G)
        return parts

    def _dequantize(self, parts: dict, bits: int, role: str, shape: torch.Size, rope) -> torch.Tensor:
        s = self.spec
        self._check(bits, role, rope, shape)
        if bits >= FULL_PRECISION_BITS:
            y = parts["fp16"].to(torch.float32)
            return apply_rope(y, rope) if self._uses_rope(role) else y
        B, h, T, D = shape
        G = s.group_size
        axis = s.axis_for(role)
        if s.kind == "lloydmax":
            y = self._dequantize_lloydmax(parts, bits, shape)
        else:
            zero = parts.get("zero")
            q = QuantizedGroups(to_groups(parts["codes"], axis, G),
                                # stored scales below 1e-12 (fp16 underflow) were clamped to 1e-12 before use
                                parts["scale"].reshape(B, h, -1, 1).clamp_min(1e-12),
                                None if zero is None else zero.reshape(B, h, -1, 1))
            y = from_groups(dequantize_groups(q, bits, s), axis, G, shape)
        y = self._rotate(y, inverse=True)
        if "out_val" in parts:
            y = from_groups(outliers.merge(to_groups(y, axis, G), parts["out_val"], parts["out_idx"]), axis, G, shape)
        if self._uses_rope(role):
            y = apply_rope(y, rope)
        return y

    def _dequantize_lloydmax(self, parts: dict, bits: int, shape: torch.Size) -> torch.Tensor:
        s = self.spec
        B, h, T, D = shape
        G = s.group_size
        base = s.base_bits(bits)
        if base >= 1:
            codes = parts["codes"].reshape(B, h, T, D // G, G)
            g = parts["norm"].unsqueeze(-1) * lloydmax.decode_unit(codes, base, G)
        else:
            g = torch.zeros(B, h, T, D // G, G, device=parts["qjl"].device)
        if s.qjl:
            signs = parts["qjl"].reshape(B, h, T, D // G, G)
            g = g + qjl.decode(signs, parts["rnorm"].unsqueeze(-1), G, s.seed)
        return g.reshape(B, h, T, D)

    # -- packing ---------------------------------------------------------------------------------------
    def _pack(self, parts: dict, bits: int, shape) -> Encoding:
        s = self.spec
        if bits >= FULL_PRECISION_BITS:
            return {"fp16": parts["fp16"]}
        B, h = shape[:2]
        sdt = storage_dtype(s.scale_dtype)
        enc: Encoding = {}
        base = s.base_bits(bits)
        if "codes" in parts:
            enc["codes"] = pack(parts["codes"], base)  # (B, h, T, D·b/8)
        for name in ("scale", "norm", "rnorm"):
            if name in parts:
                enc[name] = parts[name].to(sdt)
        if "zero" in parts:
            if s.zero == "code":
                enc["zero"] = pack(parts["zero"].reshape(B, h, -1), bits)  # integer zero-points at the code width
            else:
                enc["zero"] = parts["zero"].to(sdt)
        if "qjl" in parts:
            enc["qjl"] = pack(parts["qjl"], 1)  # (B, h, T, D/8)
        if "out_val" in parts:
            enc["out_val"] = parts["out_val"].to(torch.float16)  # (B, h, n, k)
            enc["out_idx"] = _pack_wide(parts["out_idx"].reshape(B, h, -1), s.outlier_index_bits())
        return enc

    def _unpack(self, enc: Encoding, bits: int, shape: torch.Size) -> dict:
        s = self.spec
        if bits >= FULL_PRECISION_BITS:
            return {"fp16": enc["fp16"]}
        B, h, T, D = shape
        parts: dict = {}
        if "codes" in enc:
            parts["codes"] = unpack(enc["codes"], s.base_bits(bits), D)
        for name in ("scale", "norm", "rnorm"):
            if name in enc:
                parts[name] = enc[name].to(torch.float32)
        if "zero" in enc:
            if s.zero == "code":
                scale = parts["scale"]
                parts["zero"] = unpack(enc["zero"], bits, scale[0, 0].numel()).reshape(scale.shape).to(torch.float32)
            else:
                parts["zero"] = enc["zero"].to(torch.float32)
        if "qjl" in enc:
            parts["qjl"] = unpack(enc["qjl"], 1, D)
        if "out_val" in enc:
            vals = enc["out_val"].to(torch.float32)  # (B, h, n, k)
            n_idx = vals[0, 0].numel()
            parts["out_val"] = vals
            parts["out_idx"] = _unpack_wide(enc["out_idx"], s.outlier_index_bits(), n_idx).reshape(vals.shape)
        return parts


@lru_cache(maxsize=None)
def codec_for(spec: QuantSpec) -> Codec:
    """The codec of `spec` (one per spec; codecs hold no tensors)."""
    return Codec(spec)


def encode(x: torch.Tensor, bits: int, spec: QuantSpec, role: str, *, rope: Rope | None = None) -> Encoding:
    return codec_for(spec).encode(x, bits, role, rope=rope)


def decode(enc: Encoding, bits: int, spec: QuantSpec, role: str, shape, dtype=torch.float32, *,
           rope: Rope | None = None) -> torch.Tensor:
    return codec_for(spec).decode(enc, bits, role, shape, dtype, rope=rope)
