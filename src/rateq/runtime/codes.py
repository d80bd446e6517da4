"""Reading packed codes fast, and code arrays that grow by rows (the runtime's building blocks).

`unpack_codes` reads the exact format of `rateq.quant.pack` (little-endian 8-code groups) but never widens to
int64: at 1, 2, 4 and 8 bits no code crosses a byte, so one shift-and-mask on uint8 does; at 3, 5, 6 and 7 bits
a code spans at most two bytes, so it is read from a 16-bit pair. The cache unpacks its whole quantized history
at every decode step, so this is the hot path.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..quant.pack import pack, packed_nbytes


@lru_cache(maxsize=None)
def _layout(bits: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """For each of the 8 codes of a group: (byte holding its low bits, next byte, shift within the low byte)."""
    lo, hi, shift = [], [], []
    for i in range(8):
        bit = i * bits
        lo.append(bit // 8)
        hi.append(min(bit // 8 + 1, bits - 1))  # past the group's last byte only when unused (masked off)
        shift.append(bit % 8)
    return tuple(lo), tuple(hi), tuple(shift)


_CONSTS: dict = {}


def _const(key, make):
    """Small index/shift tensors, built once per (kind, bits, device)."""
    if key not in _CONSTS:
        _CONSTS[key] = make()
    return _CONSTS[key]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Same result as `rateq.quant.unpack`: uint8 `(..., packed_nbytes(n, bits))` → uint8 codes `(..., n)`."""
    if bits == 8:
        return packed[..., :n]
    mask = (1 << bits) - 1
    lead = packed.shape[:-1]
    dev = packed.device
    if 8 % bits == 0:
        per = 8 // bits
        shifts = _const(("s", bits, dev), lambda: torch.arange(0, 8, bits, dtype=torch.uint8, device=dev))
        codes = (packed.unsqueeze(-1) >> shifts) & mask  # (..., nbytes, 8 / bits)
        codes = codes.reshape(*lead, packed.shape[-1] * per)
        return codes if codes.shape[-1] == n else codes[..., :n]
    lo, hi, shift = _layout(bits)
    idx_lo = _const(("lo", bits, dev), lambda: torch.tensor(lo, device=dev))
    idx_hi = _const(("hi", bits, dev), lambda: torch.tensor(hi, device=dev))
    sh = _const(("sh", bits, dev), lambda: torch.tensor(shift, dtype=torch.int16, device=dev))
    g = packed.reshape(*lead, -1, bits).to(torch.int16)  # (..., groups, bits)
    # int16 holds lo | hi << 8 with the sign bit possibly set; the arithmetic shift right keeps the low
    # 16 - shift bits intact, and the mask keeps only `bits` ≤ 16 - shift of them.
    word = g[..., idx_lo] | (g[..., idx_hi] << 8)  # (..., groups, 8)
    codes = ((word >> sh) & mask).to(torch.uint8).reshape(*lead, -1)
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


def packed_row_nbytes(n: int, bits: int) -> int:
    """Bytes of one row of `n` codes packed with `rateq.quant.pack` (re-exported for the store's accounting)."""
    return packed_nbytes(n, bits)
