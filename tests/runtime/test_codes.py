"""The runtime's fast unpacking reads exactly `rateq.quant.pack`'s format; row-packed codes round-trip."""

from __future__ import annotations

import pytest
import torch

from rateq.quant.pack import pack, unpack
from rateq.runtime.codes import RowPackedCodes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [3, 8, 13, 16, 64, 128])
def test_unpack_codes_matches_reference(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(unpack_codes(packed, bits, n), unpack(packed, bits, n))
    # a non-contiguous slice (as a bucket's heads can be) reads the same
    assert torch.equal(unpack_codes(packed[:, 1:], bits, n), codes[:, 1:])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8])
def test_row_packed_codes_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    store, rows = RowPackedCodes(bits), []
    for r in (1, 5, 9, 0, 3, 16, 2):  # crosses the 8-row packing boundary in every way
        new = torch.randint(0, 1 << bits, (2, 3, r, 5), generator=g, dtype=torch.uint8)
        store.append(new)
        rows.append(new)
        want = torch.cat(rows, dim=2)
        assert store.rows == want.shape[2]
        assert torch.equal(store.unpack(), want)
    total = want.shape[2]
    # packed at `bits` bits per code, plus fewer than 8 unpacked staging rows
    held = sum(t.numel() * t.element_size() for t in store.tensors())
    assert held == 2 * 3 * 5 * ((total // 8) * bits + total % 8)
    store.keep_rows(3, 30)
    assert torch.equal(store.unpack(), want[:, :, 3:30])
    store.map_batch(lambda t: t.index_select(0, torch.tensor([1, 1, 0])))
    assert torch.equal(store.unpack(), want[:, :, 3:30].index_select(0, torch.tensor([1, 1, 0])))
