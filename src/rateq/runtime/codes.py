"""Reading packed codes fast, and code arrays that grow by rows (the runtime's building blocks).

`unpack_codes` reads the exact format of `rateq.quant.pack` (code i of a row at bits `[i*bits, (i+1)*bits)` of
a little-endian bit stream) with a few whole-tensor integer operations and no per-code indexing: each packed
word is widened once and its codes are spread into separate bytes by shift-and-mask, so that viewing the
result as bytes gives the codes in order. The cache unpacks its whole quantized history at every decode step,
so this is the hot path; `rateq.quant.unpack` stays the reference it is tested against.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..quant.pack import pack, unpack


def _spread(w: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Move code m (bits `[m*bits, (m+1)*bits)` of `w`) to byte m of the result, for m < count."""
    mask = (1 << bits) - 1
    out = w & mask
    for m in range(1, count):
        out |= (w << (m * (8 - bits))) & (mask << (8 * m))
    return out


_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_TABLES: dict = {}


def _table(bits: int, per: int, device) -> torch.Tensor:
    """Lookup table: every `bits * per`-bit chunk → its `per` codes as the bytes of one int (built once)."""
    key = (bits, per, str(device))
    if key not in _TABLES:
        x = torch.arange(1 << (bits * per), dtype=torch.int64)
        codes = torch.stack([(x >> (bits * m)) & ((1 << bits) - 1) for m in range(per)], -1).to(torch.uint8)
        _TABLES[key] = codes.view(_WIDE[per]).reshape(-1).to(device)
    return _TABLES[key]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Same result as `rateq.quant.unpack`: uint8 `(..., packed_nbytes(n, bits))` → uint8 codes `(..., n)`.

    Measured fastest per width on CPU: a table lookup (one gather of whole code words) at 1, 2 and 3 bits,
    shift-and-mask spreading at 4, 5, 6 and 7.
    """
    if bits == 8:
        return packed[..., :n]
    if sys.byteorder != "little":  # the views below read words in the machine's byte order
        return unpack(packed, bits, n)
    packed = packed.contiguous()
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    if packed.numel() == 0:
        return packed.new_empty(*lead, n)
    if bits == 1:  # a byte → 8 codes, from a 256-entry table of int64
        codes = _table(1, 8, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    elif bits == 2 and nbytes % 2 == 0:  # 2 bytes → 8 codes, from a 65536-entry table of int64 (512 KiB)
        idx = packed.reshape(-1, nbytes).view(torch.int16).to(torch.int32) & 0xFFFF  # 2-D: strides all even
        codes = _table(2, 8, packed.device).index_select(0, idx.reshape(-1))
    elif bits == 2:
        codes = _spread(packed.to(torch.int32), 2, 4)
    elif bits == 3:  # 3 bytes → 8 codes: a 24-bit word, looked up as two 12-bit halves of 4 codes
        w = F.pad(packed.reshape(*lead, -1, 3), (0, 1)).view(torch.int32)  # (..., groups, 1)
        idx = torch.cat([w & 0xFFF, w >> 12], dim=-1)  # (..., groups, 2)
        codes = _table(3, 4, packed.device).index_select(0, idx.reshape(-1))
    elif bits == 4:  # a byte → two codes, spread within one int16
        codes = _spread(packed.to(torch.int16), 4, 2)
    else:  # 5, 6, 7 bits: `bits` bytes → 8 codes, one int64 word per group
        w = F.pad(packed.reshape(*lead, -1, bits), (0, 8 - bits)).view(torch.int64)  # (..., groups, 1)
        codes = _spread(w, bits, 8)
    codes = codes.view(torch.uint8).reshape(*lead, -1)
    return codes if codes.shape[-1] == n else codes[..., :n]


class RowPackedCodes:
    """Integer codes `(B, h, rows, X)` that grow by rows, packed along the rows.

    For metadata codes (integer zero-points) whose row is too short to pack without padding (a value's 2
    groups per token, say): every complete run of 8 rows is packed as `(B, h, X, 8 → bits bytes)`, and the at most
    7 newest rows wait unpacked in `stage`. Storage is thus `bits/8` bytes per code plus < 8 rows of staging.
    """

    def __init__(self, bits: int):
        self.bits = bits
        self.packed: torch.Tensor | None = None  # (B, h, X, (rows // 8) * bits) uint8
        self.stage: torch.Tensor | None = None  # (B, h, rows % 8, X) uint8

    @property
    def rows(self) -> int:
        if self.stage is None:
            return 0
        return (self.packed.shape[-1] // self.bits) * 8 + self.stage.shape[-2]

    def append(self, rows: torch.Tensor) -> None:
        """Add `(B, h, r, X)` codes."""
        rows = rows.to(torch.uint8)
        if self.stage is None:
            B, h, _, X = rows.shape
            self.packed = rows.new_empty(B, h, X, 0)
            self.stage = rows[:, :, :0].clone()
        stage = torch.cat([self.stage, rows], dim=2)
        full = (stage.shape[2] // 8) * 8
        if full:
            # 8-code groups are independent, so packing in runs of 8 rows and concatenating equals packing all
            new = pack(stage[:, :, :full].transpose(-1, -2), self.bits)  # (B, h, X, full / 8 * bits)
            self.packed = torch.cat([self.packed, new], dim=-1)
            stage = stage[:, :, full:].clone()  # a copy, so the consumed rows' storage is freed
        self.stage = stage

    def unpack(self) -> torch.Tensor:
        """All codes `(B, h, rows, X)` uint8."""
        n8 = (self.packed.shape[-1] // self.bits) * 8
        head = unpack_codes(self.packed, self.bits, n8).transpose(-1, -2)  # (B, h, n8, X)
        return torch.cat([head, self.stage], dim=2)

    def keep_rows(self, start: int, stop: int) -> None:
        """Keep rows `[start, stop)` only (crop, sliding windows). Rare, so it simply repacks."""
        if self.stage is None:
            return
        codes = self.unpack()[:, :, start:stop]
        self.packed, self.stage = None, None
        self.append(codes)

    def map_batch(self, fn) -> None:
        if self.stage is not None:
            self.packed, self.stage = fn(self.packed), fn(self.stage)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.stage is None else [self.packed, self.stage]
