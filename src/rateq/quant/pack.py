"""Dense bit packing of 1–8-bit codes into bytes.

Eight codes of `bits` bits fill exactly `bits` bytes, so a row of `n` codes (n a multiple of 8) packs into
`n * bits / 8` bytes with no padding anywhere; otherwise only the tail of the row is padded, to the next
multiple of 8 codes. Codes are little-endian within each 8-code group: code i occupies bits
[i*bits, (i+1)*bits) of the group's 64-bit word, whose bytes are stored low byte first.
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits occupy once packed along one row (8-bit codes are stored as is)."""
    return n if bits == 8 else -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim: `(..., n)` → uint8 `(..., packed_nbytes(n, bits))`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = codes.shape[-1]
    if bits == 8:
        return codes.to(torch.uint8)
    lead = codes.shape[:-1]
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)  # (..., groups, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (..., groups, 1): 8*bits ≤ 56 bits, no overflow
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF  # (..., groups, bits)
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 `(..., packed_nbytes(n, bits))` → uint8 codes `(..., n)`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return packed[..., :n]
    lead = packed.shape[:-1]
    b = packed.to(torch.int64).reshape(*lead, -1, bits)  # (..., groups, bits)
    byte_shifts = torch.arange(bits, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # (..., groups, 1)
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)  # (..., groups, 8)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)
