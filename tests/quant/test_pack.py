import pytest
import torch

from rateq.quant import pack, packed_nbytes, unpack
from rateq.quant.pack import unpack_reference


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 13), (2, 4, 64), (1, 3, 1000)])
def test_pack_unpack_identity(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + sum(shape))
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_nbytes(shape[-1], bits)
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_dense(bits):
    # A row whose length is a multiple of 8 holds exactly n*bits bits: no padding anywhere.
    codes = torch.full((4, 64), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() * 8 == codes.numel() * bits
    assert torch.all(packed == 0xFF)  # every stored bit is a code bit


def test_bit_layout_is_little_endian():
    codes = torch.tensor([1, 2, 3, 0, 0, 0, 0, 0], dtype=torch.uint8)
    # 3-bit codes 1, 2, 3 → bits 001 010 011 from the low end: 0b011_010_001 = 0xD1, then 0b0 = 0x00
    assert pack(codes, 3).tolist() == [0xD1, 0x00, 0x00]


def test_bad_bits():
    with pytest.raises(ValueError):
        pack(torch.zeros(8, dtype=torch.uint8), 9)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [3, 8, 13, 16, 64, 128])
def test_fast_unpack_reads_the_reference_format(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack_reference(packed, bits, n), codes)
    assert torch.equal(unpack(packed, bits, n), codes)
    # a non-contiguous slice (as a bucket's heads or a growing buffer's rows are) reads the same
    assert torch.equal(unpack(packed[:, 1:], bits, n), codes[:, 1:])
    assert torch.equal(unpack(packed[:, :, 1:4], bits, n), codes[:, :, 1:4])
