"""Dense bit packing of 1–8-bit codes into bytes.

Eight codes of `bits` bits fill exactly `bits` bytes, so a row of `n` codes (n a multiple of 8) packs into
`n * bits / 8` bytes with no padding anywhere; otherwise only the tail of the row is padded, to the next
multiple of 8 codes. Codes are little-endian within each 8-code group: code i occupies bits
[i*bits, (i+1)*bits) of the group's 64-bit word, whose bytes are stored low byte first.

`unpack` is on every decode step's path, so it reads the format with a few whole-tensor integer operations and
no per-code indexing: a table lookup of whole code words at 1, 2 and 3 bits, shift-and-mask spreading at 4–7
(measured fastest per width on CPU). `unpack_reference` is the plain definition it is tested against.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits occupy once packed along one row (8-bit codes are stored as is)."""
    return n if bits == 8 else -(-n // 8) * bits


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


_SHIFTS: dict = {}


def _shifts(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(code shifts (8,), byte shifts (bits,))` int64 on `device`, made once per (bits, device): a decode step packs
    each new token, and on a GPU every tensor made is a kernel launch."""
    key = (bits, str(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = (torch.arange(8, device=device, dtype=torch.int64) * bits,
                        torch.arange(bits, device=device, dtype=torch.int64) * 8)
    return _SHIFTS[key]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim: `(..., n)` → uint8 `(..., packed_nbytes(n, bits))`."""
    _check(bits)
    n = codes.shape[-1]
    if bits == 8:
        return codes.to(torch.uint8)
    lead = codes.shape[:-1]
    if codes.numel() == 0:
        return torch.empty(*lead, packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = F.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)  # (..., groups, 8)
    shifts, byte_shifts = _shifts(bits, c.device)
    word = (c << shifts).sum(-1, keepdim=True)  # (..., groups, 1): 8*bits ≤ 56 bits, no overflow
    out = (word >> byte_shifts) & 0xFF  # (..., groups, bits)
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The definition of the format: uint8 `(..., packed_nbytes(n, bits))` → uint8 codes `(..., n)`."""
    _check(bits)
    if bits == 8:
        return packed[..., :n]
    lead = packed.shape[:-1]
    b = packed.to(torch.int64).reshape(*lead, -1, bits)  # (..., groups, bits)
    byte_shifts = torch.arange(bits, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # (..., groups, 1)
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)  # (..., groups, 8)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)


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


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 `(..., packed_nbytes(n, bits))` → uint8 codes `(..., n)`."""
    _check(bits)
    if bits == 8:
        return packed[..., :n]
    if sys.byteorder != "little":  # the views below read words in the machine's byte order
        return unpack_reference(packed, bits, n)
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


_IDENTITY: dict = {}


def identity_levels(bits: int, device=None) -> torch.Tensor:
    """`[0, 1, …, 2**bits − 1]` in fp32: the levels of a uniform grid's integer codes (one per (bits, device))."""
    key = (bits, str(device))
    if key not in _IDENTITY:
        _IDENTITY[key] = torch.arange(1 << bits, dtype=torch.float32, device=device)
    return _IDENTITY[key]


def unpack_levels(packed: torch.Tensor, bits: int, n: int, levels: torch.Tensor) -> torch.Tensor:
    """`levels[unpack(packed, bits, n)]` in fp32, `(..., n)`: codes read into the values they stand for
    (`identity_levels` for a uniform grid's integer codes, a codebook's levels)."""
    return lookup(unpack(packed, bits, n), levels)


def lookup(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`levels[codes]` in fp32 (a gather, 3× faster than indexing; the identity levels just convert)."""
    if any(levels is lv for lv in _IDENTITY.values()):
        return codes.to(torch.float32)
    return levels.to(torch.float32).index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
