"""Quantization core: specs, group quantize/dequantize, dense packing. Pure math, no state."""

from .affine import (
    QuantizedGroups,
    dequantize_groups,
    fake_quantize,
    fake_quantize_multi,
    from_groups,
    quantize_groups,
    sqnr_db,
    storage_dtype,
    to_groups,
)
from .pack import pack, packed_nbytes, unpack
from .spec import FULL_PRECISION_BITS, KIVI, QuantSpec, parse_spec

__all__ = [
    "FULL_PRECISION_BITS", "KIVI", "QuantSpec", "QuantizedGroups", "dequantize_groups", "fake_quantize",
    "fake_quantize_multi", "from_groups", "pack", "packed_nbytes", "parse_spec", "quantize_groups", "sqnr_db",
    "storage_dtype", "to_groups", "unpack",
]
