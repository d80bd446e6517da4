"""Packed storage of the quantized history of one role (K or V) of one layer.

KV heads are grouped into buckets by (bits, quantizer): one bucket holds all its heads in one set of tensors,
so quantizing, dequantizing, reordering and cropping cost one tensor operation per bucket, never one per head
or per token. Every bucket lays its codes out `(B, h, T, D)` and packs them along the head dim, so each token's
row is `D * bits / 8` bytes with no padding (head_dim is a multiple of 8 in every model rateq knows):

- groups along **channels** (per token, KIVI values): scales `(B, h, T, D / G)`;
- groups along **tokens** (per channel over G tokens, KIVI keys): scales `(B, h, T / G, D)`, so a group's
  scale broadcasts over its G rows without any transpose of the codes;
- float zero-points like the scales, in the spec's `scale_dtype`; integer zero-points packed at the code width
  (`RowPackedCodes`); symmetric quantizers store none;
- 16-bit units: the tokens in fp16, unquantized;
- rotated and Lloyd–Max quantizers (`CodecBucket`): the parts of `rateq.quant.codec` (codes, scales or
  per-group norms, zero-points, QJL signs and residual norms), each in its storage format, rows along tokens.

Quantization is `rateq.quant.quantize_groups`, dequantization the same arithmetic as
`rateq.quant.dequantize_groups` (in place, in fp32), so what the cache returns is bit for bit what the
one-pass fake-quant evaluation computes from the same inputs.
"""

from __future__ import annotations

import copy

import torch

from ..errors import RateQError
from ..quant.affine import from_groups, quantize_groups, storage_dtype, to_groups
from ..quant.codec import codec_for
from ..quant.pack import pack
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec
from .codes import RowPackedCodes, unpack_codes


class Bucket:
    """The heads of one role of one layer that share (bits, quantizer)."""

    def __init__(self, bits: int, spec: QuantSpec, heads: list[int], role: str, num_heads: int, head_dim: int):
        self.bits, self.spec, self.role = int(bits), spec, role
        self.head_list = heads
        self.axis = spec.axis_for(role)
        self.group = spec.group_size
        self.head_dim = head_dim
        # A run of consecutive heads is written into the output through a slice view (no gather, no copy).
        contiguous = heads == list(range(heads[0], heads[0] + len(heads)))
        self.head_slice = slice(heads[0], heads[0] + len(heads)) if contiguous else None
        self.all_heads = contiguous and len(heads) == num_heads
        self._heads: torch.Tensor | None = None  # index tensor on the cache's device, made on first use
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | RowPackedCodes | None = None

    @property
    def quantized(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    def heads(self, device) -> torch.Tensor:
        if self._heads is None or self._heads.device != torch.device(device):
            self._heads = torch.tensor(self.head_list, dtype=torch.long, device=device)
        return self._heads

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """This bucket's heads of `(B, H, ...)`."""
        if self.all_heads:
            return x
        if self.head_slice is not None:
            return x[:, self.head_slice]
        return x.index_select(1, self.heads(x.device))

    # -- writing ----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Quantize `(B, h, t, D)` → packed codes `(B, h, t, D·bits/8)`, scales, zero-points (see module doc)."""
        if not self.quantized:
            # A fresh tensor even when x is already fp16: x is a view of the residual tail, whose memory must go.
            return torch.empty(x.shape, dtype=torch.float16, device=x.device).copy_(x), None, None
        B, h, t, D = x.shape
        q = quantize_groups(to_groups(x, self.axis, self.group), self.bits, self.spec)  # codes (B, h, n, G)
        codes = pack(from_groups(q.codes, self.axis, self.group, x.shape), self.bits)
        meta_shape = (B, h, t, D // self.group) if self.axis == "channels" else (B, h, t // self.group, D)
        sdt = storage_dtype(self.spec.scale_dtype)
        scale = q.scale.reshape(meta_shape).to(sdt)
        if q.zero is None:
            zero = None
        elif self.spec.zero == "code":
            zero = q.zero.reshape(meta_shape).to(torch.uint8)
        else:
            zero = q.zero.reshape(meta_shape).to(sdt)
        return codes, scale, zero

    def append(self, x: torch.Tensor, start: int = 0) -> None:
        codes, scale, zero = self.encode(x)
        if self.codes is None:
            self.codes, self.scale = codes, scale
            if zero is not None and self.spec.zero == "code":
                self.zero = RowPackedCodes(self.bits)
                self.zero.append(zero)
            else:
                self.zero = zero
            return
        self.codes = torch.cat([self.codes, codes], dim=2)
        if scale is not None:
            self.scale = torch.cat([self.scale, scale], dim=2)
        if isinstance(self.zero, RowPackedCodes):
            self.zero.append(zero)
        elif zero is not None:
            self.zero = torch.cat([self.zero, zero], dim=2)

    # -- reading ----------------------------------------------------------------------------------------
    def decode_into(self, out: torch.Tensor) -> None:
        """Write this bucket's dequantized tokens into its heads of `out (B, H, T, D)` (any float dtype)."""
        if self.codes is None or self.codes.shape[2] == 0:
            return
        if not self.quantized:
            self._write(out, self.codes)
            return
        B, h, T, _ = self.codes.shape
        D, G = self.head_dim, self.group
        codes = unpack_codes(self.codes, self.bits, D)  # (B, h, T, D) uint8
        if self.axis == "channels":
            shape, meta = (B, h, T, D // G, G), (lambda m: m.unsqueeze(-1))  # scales (B, h, T, D/G, 1)
        else:
            shape, meta = (B, h, T // G, G, D), (lambda m: m.unsqueeze(-2))  # scales (B, h, T/G, 1, D)
        in_place = out.dtype == torch.float32 and (self.all_heads or self.head_slice is not None)
        if in_place:
            # Dequantize straight into the output's slice of heads: no temporary, no extra copy.
            dst = out if self.all_heads else out[:, self.head_slice]
            x = dst.view(shape)
            x.copy_(codes.view(shape))
        else:
            x = codes.view(shape).to(torch.float32)
        scale = meta(self.scale.to(torch.float32))
        # The arithmetic of `dequantize_groups`, op for op, in place: same fp32 roundings, same result.
        if self.spec.kind == "symmetric":
            x.sub_(((1 << self.bits) - 1) / 2.0).mul_(scale)
        elif self.spec.zero == "code":
            zero = self.zero.unpack() if isinstance(self.zero, RowPackedCodes) else self.zero
            x.sub_(meta(zero.to(torch.float32))).mul_(scale)
        else:
            x.mul_(scale).add_(meta(self.zero.to(torch.float32)))
        if not in_place:
            self._write(out, x.view(B, h, T, D))

    def _write(self, out: torch.Tensor, x: torch.Tensor) -> None:
        if self.all_heads:
            out.copy_(x)
        elif self.head_slice is not None:
            out[:, self.head_slice].copy_(x)
        else:
            out.index_copy_(1, self.heads(out.device), x.to(out.dtype))

    # -- housekeeping -----------------------------------------------------------------------------------
    def keep(self, start: int, stop: int) -> None:
        """Keep tokens `[start, stop)` of this bucket (copies, so the dropped tokens' memory is freed)."""
        if self.codes is None:
            return
        if self.quantized and self.axis == "tokens":
            # Keys are stored in whole blocks and the cache only ever cuts between blocks.
            if start % self.group or stop % self.group:
                raise RateQError(f"internal: cut at {start}:{stop} splits a {self.group}-token key group")
            mstart, mstop = start // self.group, stop // self.group
        else:
            mstart, mstop = start, stop
        self.codes = self.codes[:, :, start:stop].clone()
        if self.scale is None:
            return
        self.scale = self.scale[:, :, mstart:mstop].clone()
        if isinstance(self.zero, RowPackedCodes):
            self.zero.keep_rows(mstart, mstop)
        elif self.zero is not None:
            self.zero = self.zero[:, :, mstart:mstop].clone()

    @property
    def length(self) -> int:
        return 0 if self.codes is None else self.codes.shape[2]

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """Held tensors by kind: `codes` (packed codes, or fp16 tokens at 16 bits) and `metadata`."""
        meta = [] if self.scale is None else [self.scale]
        if isinstance(self.zero, RowPackedCodes):
            meta += self.zero.tensors()
        elif self.zero is not None:
            meta.append(self.zero)
        return {"codes": [] if self.codes is None else [self.codes], "metadata": meta}

    def map_batch(self, fn) -> None:
        if self.codes is None:
            return
        self.codes = fn(self.codes)
        if self.scale is not None:
            self.scale = fn(self.scale)
        if isinstance(self.zero, RowPackedCodes):
            self.zero.map_batch(fn)
        elif self.zero is not None:
            self.zero = fn(self.zero)

    def clear(self) -> None:
        self.codes = self.scale = self.zero = None


class CodecBucket(Bucket):
    """A bucket whose quantizer goes beyond a plain uniform grid (Hadamard rotation, Lloyd–Max codebook with
    per-group norms, QJL residual sketch): quantized by its `rateq.quant.codec` — the same arithmetic the
    one-pass evaluation uses — and stored part by part, every part with its rows along tokens (or key blocks),
    so appending is a concatenation and cropping a slice."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codec = codec_for(self.spec)
        self.base = self.spec.base_bits(self.bits)
        self.parts: dict[str, torch.Tensor | RowPackedCodes] = {}
        self.rows = 0
        self.prerope = self.spec.prerope and self.role == "k"
        self.rotary = None  # (like, start, length) -> (cos, sin) of those rows: set by the store for pre-RoPE keys
        self.pos0 = 0  # absolute position of the first stored row (pre-RoPE keys re-rotate by position)

    def _rope(self, like: torch.Tensor, start: int, length: int):
        if not self.prerope:
            return None
        if self.rotary is None:
            raise RateQError(f"{self.spec.id} stores keys before RoPE and needs the model's rotary embedding: "
                             "build the cache with RateQCache(plan, model)")
        return self.rotary(like, start, length)

    def _block_rows(self, name: str) -> bool:
        return self.axis == "tokens" and name in ("scale", "zero")

    def append(self, x: torch.Tensor, start: int = 0) -> None:
        B, h, t, D = x.shape
        if self.rows == 0:
            self.pos0 = start
        parts = self.codec.quantize_parts(x, self.bits, self.role, rope=self._rope(x, start, t))
        sdt = storage_dtype(self.spec.scale_dtype)
        new: dict[str, torch.Tensor] = {}
        if "codes" in parts:
            new["codes"] = pack(parts["codes"], self.base)
        for name in ("scale", "norm", "rnorm"):
            if name in parts:
                new[name] = parts[name].to(sdt)
        if "qjl" in parts:
            new["qjl"] = pack(parts["qjl"], 1)
        if "zero" in parts:
            if self.spec.zero == "code":
                zero = self.parts.setdefault("zero", RowPackedCodes(self.bits))
                zero.append(parts["zero"].to(torch.uint8))
            else:
                new["zero"] = parts["zero"].to(sdt)
        for name, t_ in new.items():
            old = self.parts.get(name)
            self.parts[name] = t_ if old is None else torch.cat([old, t_], dim=2)
        self.rows += t
        self.codes = self.parts.get("codes", self.parts.get("qjl"))  # for `length` and emptiness checks

    def decode_into(self, out: torch.Tensor) -> None:
        if self.rows == 0:
            return
        B, h = out.shape[0], len(self.head_list)
        D = self.head_dim
        parts: dict = {}
        if "codes" in self.parts:
            parts["codes"] = unpack_codes(self.parts["codes"], self.base, D)
        for name in ("scale", "norm", "rnorm"):
            if name in self.parts:
                parts[name] = self.parts[name].to(torch.float32)
        if "qjl" in self.parts:
            parts["qjl"] = unpack_codes(self.parts["qjl"], 1, D)
        zero = self.parts.get("zero")
        if isinstance(zero, RowPackedCodes):
            parts["zero"] = zero.unpack().to(torch.float32)
        elif zero is not None:
            parts["zero"] = zero.to(torch.float32)
        rope = self._rope(out, self.pos0, self.rows)
        x = self.codec.dequantize_parts(parts, self.bits, self.role, (B, h, self.rows, D), rope=rope)
        self._write(out, x.to(out.dtype))

    def keep(self, start: int, stop: int) -> None:
        if self.rows == 0:
            return
        if self.axis == "tokens" and (start % self.group or stop % self.group):
            raise RateQError(f"internal: cut at {start}:{stop} splits a {self.group}-token key group")
        for name, t_ in list(self.parts.items()):
            a, b = (start // self.group, stop // self.group) if self._block_rows(name) else (start, stop)
            if isinstance(t_, RowPackedCodes):
                t_.keep_rows(a, b)
            else:
                self.parts[name] = t_[:, :, a:b].clone()
        self.rows = max(0, min(stop, self.rows) - start)
        self.pos0 += start
        self.codes = self.parts.get("codes", self.parts.get("qjl"))

    @property
    def length(self) -> int:
        return self.rows

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        codes, meta = [], []
        for name, t_ in self.parts.items():
            ts = t_.tensors() if isinstance(t_, RowPackedCodes) else [t_]
            (codes if name in ("codes", "qjl") else meta).extend(ts)
        return {"codes": codes, "metadata": meta}

    def map_batch(self, fn) -> None:
        for name, t_ in list(self.parts.items()):
            if isinstance(t_, RowPackedCodes):
                t_.map_batch(fn)
            else:
                self.parts[name] = fn(t_)
        self.codes = self.parts.get("codes", self.parts.get("qjl"))

    def clear(self) -> None:
        self.parts, self.rows, self.codes = {}, 0, None


class RoleStore:
    """The quantized history of one role of one layer: a handful of buckets covering all KV heads.

    Positions are a row's own (0 = its first real token). `rotary(like, position_ids, layer)` gives the model's
    rotary tables (pre-RoPE keys only); `position_shift` `(B,)`, when set, is the model's position of each row's
    first real token (left-padded batches whose position ids start at the padding)."""

    def __init__(self, role: str, bits: torch.Tensor, qids: torch.Tensor, quantizers: list[QuantSpec],
                 head_dim: int, layer: int, rotary=None):
        self.role = role
        self.layer = layer
        self.rotary = rotary
        self.position_shift: torch.Tensor | None = None
        H = int(bits.numel())
        groups: dict[tuple[int, int], list[int]] = {}
        for hd, (b, q) in enumerate(zip(bits.tolist(), qids.tolist())):
            groups.setdefault((int(b), int(q)), []).append(hd)
        self.buckets: list[Bucket] = []
        for (b, q), heads in sorted(groups.items()):
            spec = quantizers[q]
            if b < FULL_PRECISION_BITS:
                _check_spec(spec, role, head_dim, layer)
            plain = b >= FULL_PRECISION_BITS or spec.is_uniform_plain
            self.buckets.append((Bucket if plain else CodecBucket)(b, spec, heads, role, H, head_dim))
            if not plain and rotary is not None:
                self.buckets[-1].rotary = self._rope
        self.length = 0

    def _rope(self, like: torch.Tensor, start: int, length: int):
        """The model's `(cos, sin)` for positions `[start, start + length)` of every row."""
        positions = torch.arange(start, start + length, device=like.device)[None]
        if self.position_shift is not None:
            positions = positions + self.position_shift.to(like.device)[:, None]
        return self.rotary(like, positions, self.layer)

    def roundtrip(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The stored form of `(B, H, t, D)` at positions `[start, start + t)` — what `append` then `decode_into`
        would give — without storing anything (same code path, so the same bits)."""
        out = torch.empty_like(x)
        for bucket in self.buckets:
            scratch = copy.copy(bucket)
            scratch.clear()
            scratch.append(bucket.select(x), start)
            scratch.decode_into(out)
        return out

    def append(self, x: torch.Tensor, start: int = 0) -> None:
        """Quantize and store `(B, H, t, D)` of positions `[start, start + t)` (keys: t a whole number of blocks)."""
        for bucket in self.buckets:
            bucket.append(bucket.select(x), start)
        self.length += x.shape[2]

    def decode_into(self, out: torch.Tensor) -> None:
        """Fill `out (B, H, length, D)` with the dequantized history."""
        for bucket in self.buckets:
            bucket.decode_into(out)

    def keep(self, start: int, stop: int) -> None:
        for bucket in self.buckets:
            bucket.keep(start, stop)
        self.length = max(0, min(stop, self.length) - start)

    def map_batch(self, fn) -> None:
        for bucket in self.buckets:
            bucket.map_batch(fn)
        if self.position_shift is not None:
            self.position_shift = fn(self.position_shift)

    def clear(self) -> None:
        for bucket in self.buckets:
            bucket.clear()
        self.length = 0
        self.position_shift = None

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"codes": [], "metadata": []}
        for bucket in self.buckets:
            for kind, ts in bucket.tensors().items():
                out[kind] += ts
        return out


def check_plan_specs(bits: torch.Tensor, qids: torch.Tensor, quantizers: list[QuantSpec], role: str,
                     head_dim: int, layer: int, block: int) -> None:
    """Refuse, before anything runs, a plan the runtime cannot hold exactly as the policy says."""
    for b, q in set(zip(bits.tolist(), qids.tolist())):
        if b >= FULL_PRECISION_BITS:
            continue
        spec = quantizers[q]
        _check_spec(spec, role, head_dim, layer)
        if role == "k" and spec.axis_for("k") == "tokens" and block % spec.group_size:
            raise RateQError(
                f"key block {block} is not a multiple of quantizer {spec.id}'s group of {spec.group_size} tokens; "
                f"use CachePolicy(block={spec.group_size}) or a multiple of it"
            )


def _check_spec(spec: QuantSpec, role: str, head_dim: int, layer: int) -> None:
    axis = spec.axis_for(role)
    if role == "v" and axis == "tokens":
        raise RateQError(
            f"layer {layer}: values are quantized per token as they leave the residual window, so their groups must "
            f"run along channels; quantizer {spec.id} groups them along tokens (use group_along='auto' or 'channels')"
        )
    if spec.outlier_frac:
        raise RateQError(
            f"layer {layer}: quantizer {spec.id} (sparse outliers) is available in calibration and the one-pass "
            "evaluation, not in RateQCache; solve with the other quantizers"
        )
    if axis == "channels" and head_dim % spec.group_size:
        raise RateQError(
            f"layer {layer}: quantizer {spec.id} groups {spec.group_size} channels but head_dim {head_dim} is not a "
            f"multiple of it; use a group size that divides {head_dim}"
        )
