"""Packed storage of the quantized history of one role (K or V) of one layer.

KV heads are grouped into buckets by (bits, quantizer): one bucket holds all its heads in one set of tensors,
so quantizing, dequantizing, reordering and cropping cost one tensor operation per bucket, never one per head
or per token. A bucket holds the parts of its quantizer's codec (`rateq.quant.codec`: packed codes, scales,
zero-points, norms, QJL signs, sparse outliers, or fp16 tokens at 16 bits), each exactly as `Codec.encode`
lays it out, with rows along tokens (or key blocks). It quantizes with `Codec.quantize` and dequantizes with
`Codec.dequantize`, so what the cache returns is bit for bit what the one-pass evaluation computes from the
same inputs, and the bytes it holds are the encoding's.

Each part grows in place (`Rows`): its buffer's capacity grows geometrically, by an eighth at least, so
appending a token costs O(1) amortized instead of a copy of the history. Bytes *held* are the encoding's
bytes; the capacity beyond them is *slack*, reported apart (`RoleStore.slack_nbytes`): at most an eighth of
what is held, or 64 tokens' worth of rows when that is more.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch

from ..errors import RateQError
from ..quant import attend
from ..quant.codec import Part, bound_codec, codec_for
from ..quant.pack import unpack
from ..quant.params import param_nbytes, unit_param
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec, role_problem
from . import kernels
from .kernels import triton_decode

# Tokens read at a time when attending from the codes: at least CHUNK, and a twentieth of the history beyond that,
# so that a step's temporaries stay below a tenth of the layer's dense history with few chunks.
CHUNK = 512
CHUNK_SHARE = 20
GROWTH = 8  # a full buffer grows by 1/GROWTH of its capacity,
MIN_STEP = 64  # and by at least this many tokens' worth of rows
CODE_PARTS = ("codes", "qjl", "fp16")  # what `tensors` counts as codes; every other part is metadata


@dataclass(frozen=True)
class Stored:
    """What one bucket holds: its heads, bits, quantizer, tokens, and the parts of its encoding exactly as
    `rateq.quant.codec_for(spec).encode` lays them out for those tokens (views of the store's buffers)."""

    heads: list[int]
    bits: int
    spec: QuantSpec
    role: str
    tokens: int
    head_dim: int
    parts: dict[str, torch.Tensor]

    def values(self) -> dict[str, torch.Tensor]:
        """The parts unpacked `(B, h, rows, cols)`, as `Codec.quantize` gave them."""
        return {p.name: p.unpack(self.parts[p.name], p.rows(self.tokens))
                for p in codec_for(self.spec).layout(self.bits, self.role, self.head_dim) if p.name in self.parts}


class Rows:
    """One part of an encoding for a growing number of rows, stored as `Part.pack` lays it out."""

    def __init__(self, part: Part):
        self.part = part
        self.buf: torch.Tensor | None = None  # (B, h, capacity, row bytes or cols), or (B, h, capacity bytes)
        self.rows = 0
        step = max(1, MIN_STEP // part.tokens)
        self.min_step = part.nbytes(step) if part.stream else step  # in the growing dim's units

    @property
    def _used(self) -> int:
        """Filled length of the buffer's growing dim: rows, or bytes of a stream."""
        return self.part.nbytes(self.rows) if self.part.stream else self.rows

    def _reserve(self, like: torch.Tensor, need: int) -> None:
        """Room for `need` along the growing dim (the last for streams, rows otherwise)."""
        dim = -1 if self.part.stream else 2
        cap = 0 if self.buf is None else self.buf.shape[dim]
        if need <= cap:
            return
        new_cap = max(need, cap + max(cap // GROWTH, self.min_step)) if cap else need
        shape = list(like.shape)
        shape[dim] = new_cap
        buf = like.new_empty(shape)
        if self.buf is not None:
            used = self._used
            (buf[..., :used] if self.part.stream else buf[:, :, :used]).copy_(self.view())
        self.buf = buf

    def append(self, values: torch.Tensor) -> None:
        """Add `(B, h, r, cols)` values (as `Codec.quantize` gives them)."""
        part = self.part
        r = values.shape[2]
        if r == 0 and self.buf is not None:
            return
        if not part.stream:
            stored = part.pack(values)
            self._reserve(stored, self.rows + r)
            self.buf[:, :, self.rows:self.rows + r].copy_(stored)
            self.rows += r
            return
        # A stream: the last 8-code group may be partly filled; it is repacked with the new codes.
        n0 = self.rows * part.cols
        at = (n0 // 8) * part.width  # byte where the first not-full group starts
        flat = values.reshape(*values.shape[:2], -1).to(torch.uint8)
        if n0 % 8:
            flat = torch.cat([unpack(self.buf[..., at:at + part.width], part.width, n0 % 8), flat], dim=-1)
        stored = part.pack(flat.reshape(*flat.shape[:2], 1, -1))  # one row: the flat codes
        self._reserve(stored, at + stored.shape[-1])
        self.buf[..., at:at + stored.shape[-1]].copy_(stored)
        self.rows += r

    def view(self) -> torch.Tensor | None:
        """The held rows, as `Codec.encode` would give them (a view of the buffer)."""
        if self.buf is None:
            return None
        return self.buf[..., :self._used] if self.part.stream else self.buf[:, :, :self.rows]

    def values(self) -> torch.Tensor:
        return self.part.unpack(self.view(), self.rows)

    def stored_of(self, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` in stored form (a view; streams cut at multiples of 8 rows)."""
        return self.part.slice(self.view(), start, min(stop, self.rows))

    def keep(self, start: int, stop: int) -> None:
        """Keep rows `[start, stop)` (a copy of exactly those: the rest is given back)."""
        if self.buf is None:
            return
        stop = min(stop, self.rows)
        if not self.part.stream:
            self.buf, self.rows = self.buf[:, :, start:stop].clone(), max(0, stop - start)
            return
        kept = self.values()[:, :, start:stop]
        self.buf, self.rows = None, 0
        self.append(kept)

    def map_batch(self, fn) -> None:
        if self.buf is not None:
            self.buf = fn(self.buf)

    def nbytes(self) -> int:
        v = self.view()
        return 0 if v is None else v.numel() * v.element_size()

    def slack_nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size() - self.nbytes()


class Bucket:
    """The heads of one role of one layer that share (bits, quantizer)."""

    def __init__(self, bits: int, spec: QuantSpec, heads: list[int], role: str, num_heads: int, head_dim: int,
                 param: torch.Tensor | None = None):
        self.bits, self.spec, self.role = int(bits), spec, role
        self.head_list = heads
        self.head_dim = head_dim
        self.codec = bound_codec(spec, param)
        self.learned_nbytes = param_nbytes(spec, param)  # codebooks or static scales: fixed, not per token
        self.parts = {p.name: Rows(p) for p in self.codec.layout(self.bits, role, head_dim)}
        # A run of consecutive heads is written into the output through a slice view (no gather, no copy).
        contiguous = heads == list(range(heads[0], heads[0] + len(heads)))
        self.head_slice = slice(heads[0], heads[0] + len(heads)) if contiguous else None
        self.all_heads = contiguous and len(heads) == num_heads
        self._heads: torch.Tensor | None = None  # index tensor on the cache's device, made on first use
        self.prerope = spec.prerope and role == "k"
        self.rotary = None  # (like, start, length) -> (cos, sin) of those rows: set by the store for pre-RoPE keys
        self.span = None  # (like, start, length) -> shared (cos, sin) views or None: set by the store likewise
        self.native = None  # state of the native kernels for this bucket (`rateq.runtime.kernels`)
        self.length = 0
        self.pos0 = 0  # own position of the first stored row (pre-RoPE keys re-rotate by position)

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

    def _rope(self, like: torch.Tensor, start: int, length: int):
        if not self.prerope:
            return None
        if self.rotary is None:
            raise RateQError(f"{self.spec.id} stores keys before RoPE and needs the model's rotary embedding: "
                             "build the cache with RateQCache(plan, model)")
        return self.rotary(like, start, length)

    def append(self, x: torch.Tensor, start: int = 0) -> None:
        """Quantize and store `(B, h, t, D)` of positions `[start, start + t)`."""
        t = x.shape[2]
        if self.length == 0:
            self.pos0 = start
        param = self.codec.param
        if param is not None and param.device != x.device:  # the learned parameter moves where the cache is, once
            self.codec = replace(self.codec, param=param.to(x.device))
        parts = self.codec.quantize(x, self.bits, self.role, rope=self._rope(x, start, t))
        for name, rows in self.parts.items():
            rows.append(parts[name])
        self.length += t

    def decode_into(self, out: torch.Tensor) -> None:
        """Write this bucket's dequantized tokens into its heads of `out (B, H, length, D)` (any float dtype)."""
        if self.length == 0:
            return
        shape = (out.shape[0], len(self.head_list), self.length, self.head_dim)
        parts = {name: rows.values() for name, rows in self.parts.items()}
        rope = self._rope(out, self.pos0, self.length)
        if out.dtype == torch.float32 and (self.all_heads or self.head_slice is not None):
            # Dequantized straight into the output's slice of heads.
            dst = out if self.all_heads else out[:, self.head_slice]
            self.codec.dequantize(parts, self.bits, self.role, shape, rope=rope, out=dst)
            return
        x = self.codec.dequantize(parts, self.bits, self.role, shape, rope=rope)
        if self.all_heads:
            out.copy_(x)
        elif self.head_slice is not None:
            out[:, self.head_slice].copy_(x)
        else:
            out.index_copy_(1, self.heads(out.device), x.to(out.dtype))

    def chunks(self):
        """`(start, stop, encoding)` over the stored tokens in stored form, `CHUNK` tokens at a time (whole rows
        of every part, and a multiple of 8 rows of a stream, so that streams cut between bytes)."""
        unit = 1
        for rows in self.parts.values():
            unit = math.lcm(unit, rows.part.tokens * (8 if rows.part.stream else 1))
        step = max(unit, max(CHUNK, self.length // CHUNK_SHARE) // unit * unit)
        for a in range(0, self.length, step):
            b = min(self.length, a + step)
            yield a, b, {name: rows.stored_of(a // rows.part.tokens, -(-b // rows.part.tokens))
                         for name, rows in self.parts.items()}

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """`q (B, h, r, D)` fp32 (this bucket's heads) · every stored key → `(B, h, r, length)`, from the codes."""
        B, h, r, D = q.shape
        out = q.new_empty(B, h, r, self.length)
        for a, b, enc in self.chunks():
            out[..., a:b] = attend.scores(self.codec, enc, self.bits, (B, h, b - a, D), q,
                                          rope=self._rope(q, self.pos0 + a, b - a))
        return out

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """Weights `p (B, h, r, length)` fp32 × every stored value → `(B, h, r, D)`, from the codes."""
        B, h, r, _ = p.shape
        out = None
        for a, b, enc in self.chunks():
            o = attend.mix(self.codec, enc, self.bits, (B, h, b - a, self.head_dim), p[..., a:b])
            out = o if out is None else out.add_(o)
        return out

    def keep(self, start: int, stop: int) -> None:
        """Keep tokens `[start, stop)` (copies, so the dropped tokens' memory is freed)."""
        if self.length == 0:
            return
        for rows in self.parts.values():
            per = rows.part.tokens
            if start % per or stop % per:
                raise RateQError(f"internal: cut at {start}:{stop} splits a {per}-token key group")
            rows.keep(start // per, stop // per)
        self.length = max(0, min(stop, self.length) - start)
        self.pos0 += start

    def stored(self) -> Stored:
        parts = {name: rows.view() for name, rows in self.parts.items() if rows.buf is not None}
        return Stored(self.head_list, self.bits, self.spec, self.role, self.length, self.head_dim, parts)

    def nbytes_by_kind(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0}
        for name, rows in self.parts.items():
            out["codes" if name in CODE_PARTS else "metadata"] += rows.nbytes()
        return out

    def slack_nbytes(self) -> int:
        return sum(rows.slack_nbytes() for rows in self.parts.values())

    def buffers(self) -> list[torch.Tensor]:
        return [rows.buf for rows in self.parts.values() if rows.buf is not None]

    def map_batch(self, fn) -> None:
        for rows in self.parts.values():
            rows.map_batch(fn)

    def clear(self) -> None:
        self.parts = {name: Rows(rows.part) for name, rows in self.parts.items()}
        self.length = 0
        self.native = None


class RoleStore:
    """The quantized history of one role of one layer: a handful of buckets covering all KV heads.

    Positions are a row's own (0 = its first real token). `rotary(like, position_ids, layer)` gives the model's
    rotary tables (pre-RoPE keys only); `position_shift` `(B,)`, when set, is the model's position of each row's
    first real token (left-padded batches whose position ids start at the padding)."""

    def __init__(self, role: str, bits: torch.Tensor, qids: torch.Tensor, quantizers: list[QuantSpec],
                 head_dim: int, layer: int, rotary=None, params: dict | None = None):
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
            bucket = Bucket(b, spec, heads, role, H, head_dim, unit_param(params or {}, spec, b, layer, role, heads))
            if bucket.prerope and rotary is not None:
                bucket.rotary, bucket.span = self._rope, self.span
            self.buckets.append(bucket)
        self.length = 0

    def span(self, like: torch.Tensor, start: int, length: int):
        """`(cos, sin)` `(length, D)` of the consecutive positions `[start, start + length)` shared by every row
        (static RoPE, no position shift), or None where the tables differ by row or need computing."""
        span = getattr(self.rotary, "span", None)
        if span is None or self.position_shift is not None:
            return None
        return span(like, start, start + length, self.layer)

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

    @staticmethod
    def _into(bucket: Bucket, out: torch.Tensor, y: torch.Tensor) -> None:
        """`out[:, heads] = y` for the bucket's heads."""
        if bucket.head_slice is not None:
            out[:, bucket.head_slice] = y
        else:
            out.index_copy_(1, bucket.heads(out.device), y)

    @staticmethod
    def _kernel(bucket: Bucket, fn: str, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Attend `bucket` through a fused kernel where one takes it — the native CPU kernels
        (`rateq.runtime.kernels`), Triton on CUDA (`rateq.runtime.kernels.triton_decode`) — writing into `out`;
        False where none does (the torch path then serves)."""
        if bucket.length == 0 or x.stride(-1) != 1 or out.stride(-1) != 1:
            return False
        if x.device.type == "cuda":
            if not triton_decode.runs(bucket, x.device):
                return False
            getattr(triton_decode, fn)(bucket, x, out)
            return True
        return kernels.runs(bucket, x.device) and getattr(kernels, fn)(bucket, x, out)

    def scores(self, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`q (B, H, r, D)` fp32 (r query heads per KV head) · the stored keys → `(B, H, r, length)` (into `out`)."""
        out = q.new_empty(*q.shape[:3], self.length) if out is None else out
        for bucket in self.buckets:
            if not self._kernel(bucket, "scores", q, out):
                self._into(bucket, out, bucket.scores(bucket.select(q)))
        return out

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """Weights `p (B, H, r, length)` fp32 × the stored values → `(B, H, r, D)`."""
        out = p.new_empty(*p.shape[:3], self.buckets[0].head_dim)
        for bucket in self.buckets:
            if not self._kernel(bucket, "mix", p, out):
                self._into(bucket, out, bucket.mix(bucket.select(p)))
        return out

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

    def stored(self) -> list[Stored]:
        """What each bucket holds (`Stored`)."""
        return [b.stored() for b in self.buckets]

    def nbytes_by_kind(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0}
        for bucket in self.buckets:
            for kind, n in bucket.nbytes_by_kind().items():
                out[kind] += n
        return out

    def slack_nbytes(self) -> int:
        return sum(b.slack_nbytes() for b in self.buckets)

    def learned_nbytes(self) -> int:
        return sum(b.learned_nbytes for b in self.buckets)

    def buffers(self) -> list[torch.Tensor]:
        return [t for b in self.buckets for t in b.buffers()]


def check_plan(plan, head_dim: int, policy) -> None:
    """Refuse, before anything runs or loads, a plan the runtime cannot hold exactly as `policy` says."""
    for role in ("k", "v"):
        used = set(zip(plan.bits(role).flatten().tolist(), plan.quantizer_ids(role).flatten().tolist()))
        for b, q in sorted(used):
            if b >= FULL_PRECISION_BITS:
                continue
            for layer in range(plan.num_layers):
                held = zip(plan.bits(role)[layer].tolist(), plan.quantizer_ids(role)[layer].tolist())
                if (b, q) in set(held):
                    _check_spec(plan.quantizers[q], role, head_dim, layer)
                    break
            if role == "k":
                policy.check_key_group(plan.quantizers[q])


def _check_spec(spec: QuantSpec, role: str, head_dim: int, layer: int) -> None:
    problem = role_problem(spec, role, head_dim)
    if problem:
        raise RateQError(f"layer {layer}: {problem}")
