"""The stored form of every quantizer family, in one place: `encode`, `decode`, `nbytes`, `fake_quantize`.

`codec_for(spec)` gives a unit's codec. `quantize(x (B, h, T, D), bits, role)` turns K or V into named *parts*
(integer codes, metadata already rounded to its storage format) and `dequantize(parts)` turns them back into
the dense tensor attention uses; `layout(bits, role, D)` says how each part is stored (`Part`), `encode` /
`decode` pack and unpack them, `nbytes` counts what an encoding occupies, and `fake_quantize` is
`decode ∘ encode` without the packing (bit for bit the same result). Calibration, the one-pass evaluation and
`RateQCache` all go through these; the cache holds the parts of `encode`, grown along tokens.

The pipeline, each stage optional (spec fields):

    post-RoPE key ─► invert RoPE (prerope) ─► pull sparse outliers ─► rotate (Walsh–Hadamard)
      ─► dense quantizer (uniform grid | norm + Lloyd–Max codebook [+ QJL sketch of the residual])
      ─► … decode in reverse: dequantize ─► unrotate ─► put outliers back ─► re-apply RoPE

Parts, each with leading `(B, h)` and one row per token (or per block of G tokens for metadata of groups
along tokens):
- `codes` `(rows, D)` at the dense quantizer's code bits (rotated coordinates when rotated). Lloyd–Max with QJL
  stores `b − 1`-bit codes here and the signs in `qjl` `(rows, D)` at 1 bit.
- uniform grids: `scale` `(rows, X)` in `scale_dtype` — per token (`X = D/G`) when groups run along channels,
  per channel of each block of G tokens (`X = D`, one row per block) along tokens; `zero` the same, as floats
  in `scale_dtype` or integer zero-points at the code width.
- Lloyd–Max: `norm` `(rows, D/G)`; with QJL `rnorm` `(rows, D/G)`, the residual's norm.
- outliers: `out_val` fp16 `(rows, X·k)` and their positions in the group, `out_idx` (low 8 bits) and, for
  groups longer than 256, `out_hi` (the rest).
- 16 bits: `fp16` `(rows, D)` (pre-RoPE keys for a `prerope` spec).

How a part is stored (`Part`): floats in their dtype `(B, h, rows, cols)`; integer codes packed along the row
`(B, h, rows, cols·w/8)` when a row fills whole 8-code groups (`rateq.quant.pack`), else — a value's two integer
zero-points per token, say — as one stream per head, row after row, `(B, h, ⌈rows·cols/8⌉·w)`. So
`nbytes = spec.bits_per_element(bits) × B·h·T·D / 8` exactly, up to one partly filled 8-code group per
head in a stream.

What attention sees. `decode` returns a reconstruction. For QJL that is `k̂ = k̂_mse + r̂` with
`r̂ = ‖r‖·sqrt(π/2)/m·Sᵀ sign(S r)`, whose inner product with any query is exactly TurboQuant-prod's unbiased
estimator `⟨q, k̂_mse⟩ + ‖r‖·sqrt(π/2)/m·⟨S q, sign(S r)⟩`; the one-pass evaluation and the runtime both
run ordinary attention on the reconstruction, so scores are the estimator and `Σ p v̂` is unbiased given `p`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import RateQError
from . import codebook, engine_formats, hadamard, lloydmax, outliers, qjl
from .affine import (QuantizedGroups, dequantize_groups, from_groups, quantize_groups, requantize_groups, storage_dtype,
                     to_groups)
from .pack import lookup, pack, packed_nbytes, unpack, unpack_levels
from .rope import Rope, apply_rope, invert_rope
from .spec import ENGINE_FORMATS, FULL_PRECISION_BITS, QuantSpec, check_bits

Encoding = dict[str, torch.Tensor]
Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Part:
    """How one named tensor of an encoding is stored: `cols` values per row, one row per `tokens` tokens; integer
    codes packed at `width` bits (1..8), or floats kept in `dtype` (`width` 0)."""

    name: str
    cols: int
    width: int = 0
    dtype: torch.dtype = torch.uint8
    tokens: int = 1

    @property
    def stream(self) -> bool:
        """Packed as one stream per head across rows: a row's codes do not fill whole 8-code groups."""
        return 0 < self.width < 8 and self.cols % 8 != 0

    def rows(self, tokens: int) -> int:
        return tokens // self.tokens

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """Values `(B, h, rows, cols)` (integers for codes, fp32 for floats) → stored form."""
        if not self.width:
            return values.to(self.dtype)
        if self.stream:
            return pack(values.reshape(*values.shape[:2], -1), self.width)
        return pack(values, self.width)

    def unpack(self, stored: torch.Tensor, rows: int) -> torch.Tensor:
        """Stored form → values `(B, h, rows, cols)`: uint8 codes, or floats in fp32."""
        if not self.width:
            return stored.to(torch.float32)
        if self.stream:
            return unpack(stored, self.width, rows * self.cols).reshape(*stored.shape[:2], rows, self.cols)
        return unpack(stored, self.width, self.cols)

    def unpack_levels(self, stored: torch.Tensor, rows: int, levels: torch.Tensor) -> torch.Tensor:
        """Integer codes → `levels[code]` fp32 `(B, h, rows, cols)`, read from the packed bytes in one step."""
        if self.stream:
            return lookup(self.unpack(stored, rows), levels)
        return unpack_levels(stored, self.width, self.cols, levels)

    def slice(self, stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` of a stored part (a view). A stream is cut between bytes, so `start · cols`
        must fall on an 8-code group (callers cut at multiples of 8 rows)."""
        if not self.stream:
            return stored[:, :, start:stop]
        if (start * self.cols) % 8:
            raise ValueError(f"a {self.name} stream cannot be cut at row {start}")
        return stored[..., (start * self.cols // 8) * self.width:packed_nbytes(stop * self.cols, self.width)]

    def nbytes(self, rows: int) -> int:
        """Bytes of `rows` rows of one (batch row, head)."""
        if not self.width:
            return rows * self.cols * torch.empty((), dtype=self.dtype).element_size()
        if self.stream:
            return packed_nbytes(rows * self.cols, self.width)
        return rows * packed_nbytes(self.cols, self.width)


@lru_cache(maxsize=None)
def _layout(s: QuantSpec, bits: int, role: str, D: int) -> tuple[Part, ...]:
    if bits >= FULL_PRECISION_BITS:
        return (Part("fp16", D, dtype=torch.float16),)
    G = s.group_size
    if s.static_scale:  # codes only: the scale is one per layer or KV head, fixed in calibration
        return (Part("codes", D, bits),)
    if s.kind == "codebook":  # one code of b·c bits per group of c channels; the codebooks are per model
        return (Part("codes", D // G, bits * G),)
    if s.kind in ENGINE_FORMATS:  # codes, and the engine's own metadata per group of G channels of a token
        meta = {"fp8": (), "nvfp4": (("scale", torch.float8_e4m3fn),), "q4_1": (("scale", torch.float16),
                ("zero", torch.float16))}.get(s.kind, (("scale", torch.float16),))
        return (Part("codes", D, bits), *(Part(name, D // G, dtype=dt) for name, dt in meta))
    X, per = (D // G, 1) if s.axis_for(role) == "channels" else (D, G)
    sdt = storage_dtype(s.scale_dtype)
    parts: list[Part] = []
    base = s.base_bits(bits)
    if s.kind == "lloydmax":
        if base >= 1:
            parts += [Part("codes", D, base), Part("norm", D // G, dtype=sdt)]
        if s.qjl:
            parts += [Part("qjl", D, 1), Part("rnorm", D // G, dtype=sdt)]
    else:
        parts += [Part("codes", D, bits), Part("scale", X, dtype=sdt, tokens=per)]
        if s.kind == "minmax":
            parts.append(Part("zero", X, bits, tokens=per) if s.zero == "code" else
                         Part("zero", X, dtype=sdt, tokens=per))
    k = s.outliers_per_group()
    if k:
        ib = s.outlier_index_bits()
        parts += [Part("out_val", X * k, dtype=torch.float16, tokens=per), Part("out_idx", X * k, min(ib, 8), tokens=per)]
        if ib > 8:
            parts.append(Part("out_hi", X * k, ib - 8, tokens=per))
    return tuple(parts)


@dataclass(frozen=True)
class Codec:
    """Encoder/decoder of one `QuantSpec`; stateless (codebooks, signs and sketches are cached by value).

    Quantizers with learned parameters (`QuantSpec.learned`) need those of the heads they encode, at the width
    they encode: `codec.bind(param)` with the static scales `(h,)` or the codebooks `(h, D/c, 2^(b·c), c)` of the
    `h` heads of the tensors it is given (`rateq.quant.params.unit_param`)."""

    spec: QuantSpec
    param: torch.Tensor | None = field(default=None, compare=False)

    def bind(self, param) -> "Codec":
        """This codec with the learned parameter of the heads it will encode and decode."""
        if not self.spec.learned:
            raise RateQError(f"{self.spec.id} learns no parameter to bind")
        param = torch.as_tensor(param, dtype=torch.float32)
        if self.spec.static_scale:
            param = param.flatten()
            if not bool(torch.isfinite(param).all()) or not bool((param > 0).all()):
                raise RateQError(f"{self.spec.id} scales must be positive finite numbers, got {param.tolist()}")
        elif param.dim() != 4 or param.shape[-1] != self.spec.group_size or not bool(torch.isfinite(param).all()):
            raise RateQError(f"{self.spec.id} codebooks are finite (heads, groups, centroids, "
                             f"{self.spec.group_size}), got {tuple(param.shape)}")
        return Codec(self.spec, param)

    def param_for(self, bits: int, heads: int, head_dim: int) -> torch.Tensor:
        """The bound parameter of `heads` heads of `head_dim` channels at `bits` (`_param_of`): what a kernel reading
        the stored codes needs beside them (codebooks `(h, D/c, 2^(b·c), c)`, or scales `(1, h, 1, 1)`)."""
        return self._param_of(bits, (1, heads, 1, head_dim))

    def _param_of(self, bits: int, shape, device=None) -> torch.Tensor:
        """The bound parameter for tensors of `shape (B, h, T, D)` at `bits`: a scale `(1, h, 1, 1)` (on `device`
        when given), or codebooks `(h, D/c, 2^(b·c), c)`; checked against the shape either way."""
        s = self.spec
        if self.param is None:
            what = (f"a calibrated scale per {'layer' if s.static_scale == 'tensor' else 'KV head'}"
                    if s.static_scale else "codebooks learned per unit")
            raise RateQError(f"{s.id} stores codes against {what}: bind them first (plans and curves carry "
                             "them; calibrate the quantizer to learn them)")
        h = shape[1]
        if s.static_scale:
            if self.param.numel() != h:
                raise RateQError(f"{s.id} holds {self.param.numel()} scales for {h} heads")
            scale = self.param if device is None else self.param.to(device)
            return scale.view(1, -1, 1, 1)
        want = (h, shape[-1] // s.group_size, 1 << (bits * s.group_size), s.group_size)
        if tuple(self.param.shape) != want:
            raise RateQError(f"{s.id} at {bits} bits needs codebooks of shape {want}, got {tuple(self.param.shape)}")
        return self.param

    # -- the stored form -------------------------------------------------------------------------------
    def layout(self, bits: int, role: str, head_dim: int) -> tuple[Part, ...]:
        """The parts an encoding of `role` at `bits` holds, and how each is stored (see module doc)."""
        return _layout(self.spec, bits, role, head_dim)

    def encode(self, x: torch.Tensor, bits: int, role: str, *, rope: Rope | None = None) -> Encoding:
        """`x (B, h, T, D)` → the stored form: every part of `layout` packed in its storage format."""
        parts = self.quantize(x, bits, role, rope=rope)
        return {p.name: p.pack(parts[p.name]) for p in self.layout(bits, role, x.shape[-1])}

    def decode(self, enc: Encoding, bits: int, role: str, shape, dtype=torch.float32, *,
               rope: Rope | None = None) -> torch.Tensor:
        """The stored form → dense `(B, h, T, D)` in `dtype`. `shape` is the encoded tensor's shape."""
        shape = torch.Size(shape)
        parts = {p.name: p.unpack(enc[p.name], p.rows(shape[2])) for p in self.layout(bits, role, shape[-1])}
        return self.dequantize(parts, bits, role, shape, rope=rope).to(dtype)

    def fake_quantize(self, x: torch.Tensor, bits: int, role: str, *, rope: Rope | None = None) -> torch.Tensor:
        """`decode(encode(x))` in `x.dtype`, without packing."""
        return self.dequantize(self.quantize(x, bits, role, rope=rope), bits, role, x.shape, rope=rope).to(x.dtype)

    @staticmethod
    def nbytes(enc: Encoding) -> int:
        return sum(t.numel() * t.element_size() for t in enc.values())

    # -- stages ----------------------------------------------------------------------------------------
    def _uses_rope(self, role: str) -> bool:
        return self.spec.prerope and role == "k"

    def _check(self, bits: int, role: str, rope, shape) -> None:
        check_bits(bits)
        if not self.spec.allows_bits(bits):
            raise RateQError(f"{self.spec.id} is stored at {self.spec.fixed_bits} bits only, not {bits}")
        if self.spec.kind in ENGINE_FORMATS and shape[-1] % self.spec.group_size:
            raise RateQError(f"head_dim {shape[-1]} does not split into {self.spec.id} blocks of {self.spec.group_size}")
        if self.spec.learned and bits < FULL_PRECISION_BITS:
            self._param_of(bits, shape)  # checked only: no copy on the decode path
        if self.spec.kind == "codebook" and shape[-1] % self.spec.group_size:
            raise RateQError(f"head_dim {shape[-1]} does not split into codebook groups of {self.spec.group_size}")
        if self._uses_rope(role) and rope is None:
            raise RateQError(f"{self.spec.id} quantizes keys before RoPE and needs the rotary tables of their positions: "
                             "pass rope=(cos, sin) (rateq.simulate_plan and the runtime do this)")
        if self.spec.rotation != "none" and bits < FULL_PRECISION_BITS:
            hadamard.check_dim(shape[-1])
        if self.spec.kind == "lloydmax" and shape[-1] % self.spec.group_size:
            raise RateQError(f"head_dim {shape[-1]} does not split into lloydmax groups of {self.spec.group_size}")

    def rotate(self, y: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """The spec's orthonormal rotation of the head dim (or its inverse); the identity without one."""
        s = self.spec
        if s.rotation == "none":
            return y
        f = hadamard.unrotate if inverse else hadamard.rotate
        return f(y, random_signs=s.rotation == "rhadamard", seed=s.seed)

    def _rows(self, axis: str, shape) -> tuple[int, int]:
        B, h, T, D = shape
        G = self.spec.group_size
        return (T, D // G) if axis == "channels" else (T // G, D)

    def quantize(self, x: torch.Tensor, bits: int, role: str, *, rope: Rope | None = None) -> Parts:
        """`x (B, h, T, D)` → unpacked parts `(B, h, rows, cols)`: integer codes, metadata in fp32 already rounded
        to its storage format (so storing it is lossless and a store that packs the parts decodes to exactly
        `fake_quantize(x)`)."""
        s = self.spec
        self._check(bits, role, rope, x.shape)
        y = x.to(torch.float32)
        if self._uses_rope(role):
            y = invert_rope(y, rope)
        if bits >= FULL_PRECISION_BITS:
            return {"fp16": y.to(torch.float16).to(torch.float32)}
        B, h, T, D = x.shape
        G = s.group_size
        if s.static_scale:
            return {"codes": engine_formats.quantize_static(s.kind, y, self._param_of(bits, x.shape, y.device))}
        if s.kind == "codebook":
            y = self.rotate(y)
            codes = codebook.encode(y.reshape(B, h, T, D // G, G), self._param_of(bits, x.shape, y.device))
            return {"codes": codes}
        if s.kind in ENGINE_FORMATS:
            q = engine_formats.quantize(s.kind, y.reshape(B, h, T, D // G, G))
            return {name: t.reshape(B, h, T, -1) for name, t in q.items()}
        axis = s.axis_for(role)
        rows, X = self._rows(axis, x.shape)
        parts: Parts = {}
        k = s.outliers_per_group()
        if k:
            dense, vals, idx = outliers.split(to_groups(y, axis, G), k, "zero" if s.rotation != "none" else "range")
            parts["out_val"] = vals.reshape(B, h, rows, X * k)
            idx = idx.reshape(B, h, rows, X * k)
            parts["out_idx"] = idx & 0xFF
            if s.outlier_index_bits() > 8:
                parts["out_hi"] = idx >> 8
            y = from_groups(dense, axis, G, x.shape)
        y = self.rotate(y)  # (B, h, T, D)
        if s.kind == "lloydmax":
            parts.update(self._quantize_lloydmax(y, bits))
            return parts
        q = quantize_groups(to_groups(y, axis, G), bits, s)  # codes (B, h, n, G), scale (B, h, n, 1)
        parts["codes"] = from_groups(q.codes, axis, G, x.shape)  # (B, h, T, D)
        parts["scale"] = q.scale.reshape(B, h, rows, X)
        if q.zero is not None:
            parts["zero"] = q.zero.reshape(B, h, rows, X)
        return parts

    def _quantize_lloydmax(self, y: torch.Tensor, bits: int) -> Parts:
        s = self.spec
        B, h, T, D = y.shape
        G = s.group_size
        g = y.reshape(B, h, T, D // G, G)
        sdt = storage_dtype(s.scale_dtype)
        parts: Parts = {}
        base = s.base_bits(bits)
        if base >= 1:
            norm = g.norm(dim=-1, keepdim=True).to(sdt).to(torch.float32)  # (B, h, T, D/G, 1)
            codes = lloydmax.encode_unit(g / norm.clamp_min(1e-30), base)
            parts["codes"], parts["norm"] = codes.reshape(B, h, T, D), norm.squeeze(-1)
        if s.qjl:
            # the residual of what is really stored (rounded norm included)
            r = g - norm * lloydmax.decode_unit(codes, base, G) if base >= 1 else g
            parts["qjl"] = qjl.encode(r, s.seed).reshape(B, h, T, D)
            parts["rnorm"] = r.norm(dim=-1).to(sdt).to(torch.float32)  # (B, h, T, D/G)
        return parts

    def dequantize(self, parts: Parts, bits: int, role: str, shape, *, rope: Rope | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Parts (as `quantize` gives them, or unpacked from storage) → dense fp32 `(B, h, T, D)`; written into
        `out` (fp32, that shape, any strides) when given — in place, with no temporary, for plain grids."""
        s = self.spec
        shape = torch.Size(shape)
        self._check(bits, role, rope, shape)
        if bits >= FULL_PRECISION_BITS:
            y = parts["fp16"].to(torch.float32)
            y = apply_rope(y, rope) if self._uses_rope(role) else y
            return y if out is None else out.copy_(y)
        if s.is_uniform_plain:
            return self._dequantize_uniform(parts, bits, role, shape, out)
        B, h, T, D = shape
        G = s.group_size
        if s.static_scale:
            codes = parts["codes"]
            y = engine_formats.dequantize_static(s.kind, codes, self._param_of(bits, shape, codes.device)).reshape(shape)
            return y if out is None else out.copy_(y)
        if s.kind == "codebook":
            codes = parts["codes"].reshape(B, h, T, D // G)
            y = self.rotate(codebook.decode(codes, self._param_of(bits, shape, codes.device)).reshape(shape), inverse=True)
            y = apply_rope(y, rope) if self._uses_rope(role) else y
            return y if out is None else out.copy_(y)
        if s.kind in ENGINE_FORMATS:
            groups = {name: t.reshape(B, h, T, D // G, -1).to(torch.float32 if name != "codes" else t.dtype)
                      for name, t in parts.items()}
            y = engine_formats.dequantize(s.kind, groups).reshape(shape)
            return y if out is None else out.copy_(y)
        axis = s.axis_for(role)
        y = self._dequantize_lloydmax(parts, bits, shape) if s.kind == "lloydmax" else \
            self._dequantize_uniform(parts, bits, role, shape, None)
        y = self.rotate(y, inverse=True)
        if "out_val" in parts:
            idx = parts["out_idx"].to(torch.int64)
            if "out_hi" in parts:
                idx = idx | (parts["out_hi"].to(torch.int64) << 8)
            n = to_groups(y, axis, G).shape[2]
            y = from_groups(outliers.merge(to_groups(y, axis, G), parts["out_val"].reshape(B, h, n, -1),
                                           idx.reshape(B, h, n, -1)), axis, G, shape)
        if self._uses_rope(role):
            y = apply_rope(y, rope)
        return y if out is None else out.copy_(y)

    def _dequantize_uniform(self, parts: Parts, bits: int, role: str, shape: torch.Size,
                            out: torch.Tensor | None) -> torch.Tensor:
        """`dequantize_groups` on broadcast views of the row layout (no regrouping copy): each group's
        metadata broadcasts over its G entries, along channels or along tokens."""
        s = self.spec
        B, h, T, D = shape
        G = s.group_size
        if s.axis_for(role) == "channels":
            view, meta = (B, h, T, D // G, G), (B, h, T, D // G, 1)
        else:
            view, meta = (B, h, T // G, G, D), (B, h, T // G, 1, D)
        zero = parts.get("zero")
        # stored scales below 1e-12 (fp16 underflow) were clamped to 1e-12 before use
        q = QuantizedGroups(parts["codes"].reshape(view), parts["scale"].to(torch.float32).reshape(meta).clamp_min(1e-12),
                            None if zero is None else zero.to(torch.float32).reshape(meta))
        y = dequantize_groups(q, bits, s, out=None if out is None else out.view(view))
        return y.view(shape) if out is None else out

    def _dequantize_lloydmax(self, parts: Parts, bits: int, shape: torch.Size) -> torch.Tensor:
        s = self.spec
        B, h, T, D = shape
        G = s.group_size
        base = s.base_bits(bits)
        if base >= 1:
            codes = parts["codes"].reshape(B, h, T, D // G, G)
            g = parts["norm"].to(torch.float32).unsqueeze(-1) * lloydmax.decode_unit(codes, base, G)
        else:
            g = torch.zeros(B, h, T, D // G, G, device=parts["qjl"].device)
        if s.qjl:
            signs = parts["qjl"].reshape(B, h, T, D // G, G)
            g = g + qjl.decode(signs, parts["rnorm"].to(torch.float32).unsqueeze(-1), G, s.seed)
        return g.reshape(B, h, T, D)


@lru_cache(maxsize=None)
def codec_for(spec: QuantSpec) -> Codec:
    """The codec of `spec` (one per spec; codecs hold no tensors)."""
    return Codec(spec)


def bound_codec(spec: QuantSpec, param=None) -> Codec:
    """`codec_for(spec)`, bound to the learned parameter of the heads it will see when one is given."""
    codec = codec_for(spec)
    return codec if param is None else codec.bind(param)


def encode(x: torch.Tensor, bits: int, spec: QuantSpec, role: str, *, rope: Rope | None = None,
           param=None) -> Encoding:
    return bound_codec(spec, param).encode(x, bits, role, rope=rope)


def decode(enc: Encoding, bits: int, spec: QuantSpec, role: str, shape, dtype=torch.float32, *,
           rope: Rope | None = None, param=None) -> torch.Tensor:
    return bound_codec(spec, param).decode(enc, bits, role, shape, dtype, rope=rope)


def fake_quantize(x: torch.Tensor, bits: int, spec: QuantSpec, role: str, *, rope: Rope | None = None,
                  param=None) -> torch.Tensor:
    """Quantize and dequantize `(B, H, T, D)` K or V (role 'k'/'v') at one bit width; same dtype out.

    Along tokens, T must be a multiple of the group size (callers quantize only complete key blocks). Specs that
    store keys before RoPE need `rope=(cos, sin)` of the positions; quantizers with learned parameters those of
    each head at `bits` (`param`, see `Codec.bind`)."""
    return bound_codec(spec, param).fake_quantize(x, bits, role, rope=rope)


def fake_quantize_multi(x: torch.Tensor, bits: list[int] | tuple[int, ...], spec: QuantSpec, role: str, *,
                        rope: Rope | None = None, unroped: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize `(B, H, T, D)` at several bit widths at once → `(len(bits), B, H, T, D)` in `x.dtype`, so
    calibration scores all bit widths of a unit in one call: the same values as `fake_quantize` at each width.
    For grids (minmax, symmetric; pre-RoPE and rotated ones too, without outliers) and Lloyd–Max codebooks (without
    QJL or outliers), RoPE is inverted, the rotation applied and the groups (or norms) formed once; grids then
    quantize every width in the same tensor ops (`affine.requantize_groups`), and RoPE is reapplied once to all:
    a few dozen tensor operations per quantizer instead of that many per width (each a kernel launch on a GPU).
    `unroped`: `invert_rope(x, rope)` in fp32 where the caller has it (pre-RoPE keys of several quantizers)."""
    grid = spec.kind in ("minmax", "symmetric") and not spec.outlier_frac
    lloyd = spec.kind == "lloydmax" and not spec.qjl and not spec.outlier_frac
    if not (grid or lloyd):
        return torch.stack([fake_quantize(x, b, spec, role, rope=rope) for b in bits])
    codec = codec_for(spec)
    for b in bits:
        codec._check(b, role, rope, x.shape)
    uses_rope = codec._uses_rope(role)
    y = x.to(torch.float32)
    if uses_rope:
        y = invert_rope(y, rope) if unroped is None else unroped
    low = [b for b in bits if b < FULL_PRECISION_BITS]
    B, h, T, D = x.shape
    G, axis = spec.group_size, spec.axis_for(role)
    stacked = None  # (len(low), B, h, T, D) in the rotated domain, when the widths come out as one tensor
    if not low:
        widths = []
    elif grid:  # every width's dequantized groups at once, back to (B, h, T, D) layout in one copy
        groups = requantize_groups(to_groups(codec.rotate(y), axis, G), low, spec)
        stacked = from_groups(groups.flatten(0, 1), axis, G, (len(low) * B, h, T, D)).view(len(low), *x.shape)
        widths = list(stacked)
    else:  # Lloyd–Max: the groups' norms (rounded as stored) and unit vectors once, each width's levels from them
        g = codec.rotate(y).reshape(B, h, T, D // G, G)
        norm = g.norm(dim=-1, keepdim=True).to(storage_dtype(spec.scale_dtype)).to(torch.float32)
        unit = g / norm.clamp_min(1e-30)
        widths = [(norm * lloydmax.round_unit(unit, b)).reshape(x.shape) for b in low]
    if spec.rotation != "none":  # undone per width: one matmul each, as fake_quantize does it
        widths, stacked = [codec.rotate(w, inverse=True) for w in widths], None
    if stacked is None or len(low) < len(bits):
        rest = iter(widths)  # full-precision widths are stored as fp16 (pre-RoPE keys before RoPE), never rotated
        stacked = torch.stack([y.to(torch.float16).to(torch.float32) if b >= FULL_PRECISION_BITS else next(rest)
                               for b in bits])
    return (apply_rope(stacked, rope) if uses_rope else stacked).to(x.dtype)
