"""Quantization core: specs, group quantize/dequantize, dense packing, and the codec every family goes through
(uniform grids, Walsh–Hadamard rotation, Lloyd–Max codebooks, QJL residual sketches, sparse outliers, pre-RoPE
keys). Pure math, no state."""

from .affine import QuantizedGroups, dequantize_groups, from_groups, quantize_groups, sqnr_db, storage_dtype, to_groups
from .codec import Codec, Part, codec_for, decode, encode, fake_quantize, fake_quantize_multi
from .pack import pack, packed_nbytes, unpack
from .rope import apply_rope, capture_rope, invert_rope, model_rotary
from .spec import FULL_PRECISION_BITS, KIVI, QuantSpec, check_bits, parse_spec

__all__ = [
    "Codec", "Part", "codec_for", "encode", "decode", "apply_rope", "capture_rope", "invert_rope", "model_rotary",
    "FULL_PRECISION_BITS", "KIVI", "QuantSpec", "QuantizedGroups", "check_bits", "dequantize_groups", "fake_quantize",
    "fake_quantize_multi", "from_groups", "pack", "packed_nbytes", "parse_spec", "quantize_groups", "sqnr_db",
    "storage_dtype", "to_groups", "unpack",
]
