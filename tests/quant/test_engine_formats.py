"""Engine KV formats store what the engines store: llama.cpp's blocks against a line-by-line transcription of
ggml's reference quantizers, NVFP4's e2m1 codes and e4m3 block scales, FP8 e4m3 bytes; bytes held equal the
effective bits; each format only at its own width."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from rateq import RateQError, parse_spec
from rateq.quant import engine_formats
from rateq.quant.codec import codec_for, fake_quantize
from rateq.quant.spec import ENGINE_FORMATS, QuantSpec

FORMATS = sorted(ENGINE_FORMATS)


def fp16(x: float) -> float:
    return struct.unpack("<e", struct.pack("<e", x))[0]


def ggml_block(kind: str, x: list[float]) -> tuple[list[int], list[float]]:
    """One block as ggml-quants.c's `quantize_row_<kind>_ref` computes it (float32 arithmetic): codes (unsigned,
    q8_0 offset by 128) and the stored fp16 metadata."""
    f = np.float32
    x = [f(v) for v in x]
    if kind == "q8_0":
        amax = max(abs(v) for v in x)
        d = f(amax / f(127))
        iden = f(1) / d if d else f(0)
        return [int(math.copysign(math.floor(abs(f(v * iden)) + 0.5), v * iden)) + 128 for v in x], [fp16(d)]
    if kind in ("q4_0", "q5_0"):
        half, top = (8, 15) if kind == "q4_0" else (16, 31)
        mx = max(x, key=abs)
        d = f(mx / f(-half))
        iden = f(1) / d if d else f(0)
        return [min(top, int(f(f(v * iden) + f(half + 0.5)))) for v in x], [fp16(d)]
    if kind == "q4_1":
        lo, hi = min(x), max(x)
        d = f((hi - lo) / f(15))
        iden = f(1) / d if d else f(0)
        return [min(15, int(f(f((v - lo) * iden) + f(0.5)))) for v in x], [fp16(d), fp16(lo)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_0", "q4_1"])
def test_llamacpp_blocks_are_ggml_reference_blocks(kind):
    g = torch.Generator().manual_seed(1)
    blocks = torch.randn(40, 32, generator=g) * torch.rand(40, 1, generator=g) * 4
    blocks[0] = 0  # an all-zero block: scale 0, codes at the zero point
    got = engine_formats.quantize(kind, blocks)
    for i, row in enumerate(blocks.tolist()):
        codes, meta = ggml_block(kind, row)
        assert got["codes"][i].tolist() == codes, (kind, i)
        assert got["scale"][i, 0].item() == meta[0]
        if kind == "q4_1":
            assert got["zero"][i, 0].item() == meta[1]


def test_nvfp4_codes_are_nearest_e2m1_levels_of_an_e4m3_block_scale():
    g = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 3
    q = engine_formats.quantize("nvfp4", g)
    scale = q["scale"]
    assert torch.equal(scale, scale.to(torch.float8_e4m3fn).to(torch.float32))  # representable in e4m3
    assert torch.equal(scale, (g.abs().amax(-1, keepdim=True) / 6).to(torch.float8_e4m3fn).to(torch.float32))
    y = engine_formats.dequantize("nvfp4", q)
    levels = torch.tensor(engine_formats.E2M1)
    assert set((y / scale).abs().flatten().tolist()) <= set(levels.tolist())
    # no other e2m1 value of the block's scale is nearer
    cand = torch.cat([levels, -levels]) * scale.unsqueeze(-1)  # (64, 1, 16)
    best = (g.unsqueeze(-1) - cand).abs().amin(-1)
    torch.testing.assert_close((g - y).abs(), best, atol=1e-6, rtol=0)


def test_fp8_is_the_saturated_e4m3_byte():
    x = torch.tensor([[0.0, 1e-4, -0.3, 1.0, 447.0, 500.0, -1e6, 3.14159]])
    q = engine_formats.quantize("fp8", x)
    y = engine_formats.dequantize("fp8", q)
    assert torch.equal(y, x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32))
    assert y[0, 5] == 448 and y[0, 6] == -448


def test_iq4nl_levels_are_the_ggml_table_and_beat_q4_0_at_the_same_bytes():
    g = torch.randn(512, 32, generator=torch.Generator().manual_seed(3))
    q = engine_formats.quantize("iq4_nl", g)
    assert q["codes"].max() <= 15 and torch.equal(q["scale"], q["scale"].half().float())
    err = lambda kind: (engine_formats.dequantize(kind, engine_formats.quantize(kind, g)) - g).pow(2).mean()  # noqa: E731
    assert err("iq4_nl") < err("q4_0")  # a non-linear grid fits Gaussian-like values better at 4.5 bits


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_holds_the_bytes_it_counts_and_decodes_as_it_simulates(kind):
    spec = parse_spec(kind)
    assert spec.id == kind and parse_spec(spec.to_json()) == spec
    x = torch.randn(2, 3, 20, 64, generator=torch.Generator().manual_seed(4)) * 2
    codec, b = codec_for(spec), spec.fixed_bits
    scale = None
    if spec.static_scale:  # one calibrated scale per head (or per layer: equal across heads)
        scale = torch.tensor([0.05, 0.05, 0.05] if spec.static_scale == "tensor" else [0.01, 0.05, 0.2])
        codec = codec.bind(scale)
    enc = codec.encode(x, b, "k")
    assert codec.nbytes(enc) == spec.bits_per_element(b) * x.numel() / 8
    assert torch.equal(codec.decode(enc, b, "k", x.shape), fake_quantize(x, b, spec, "v", param=scale))
    others = [w for w in (1, 2, 3, 4, 5, 6, 8) if w != b]
    assert not any(spec.allows_bits(w) for w in others) and spec.allows_bits(16)
    with pytest.raises(RateQError, match=f"{kind} is stored at {b} bits only"):
        codec.encode(x, others[0], "k")


def test_engine_formats_take_no_options():
    with pytest.raises(RateQError, match="takes no group_size"):
        QuantSpec(kind="q4_0", group_size=64)
    with pytest.raises(RateQError, match="takes no rotation, prerope"):
        QuantSpec(kind="nvfp4", group_size=16, rotation="hadamard", prerope=True)


def test_a_plan_of_a_format_at_another_width_is_refused():
    from rateq import ModelFingerprint, Plan

    with pytest.raises(RateQError, match="nvfp4 at 8 bits; that format is stored at 4 bits only"):
        Plan.uniform(ModelFingerprint("tiny", "llama", 2, 2, 32), 8, spec=parse_spec("nvfp4"))
