import pytest
import torch

from rateq.quant import (
    QuantSpec, dequantize_groups, fake_quantize, fake_quantize_multi, from_groups, pack, quantize_groups, sqnr_db,
    storage_dtype, to_groups,
)

SPECS = [
    QuantSpec(),
    QuantSpec(kind="symmetric"),
    QuantSpec(zero="code", group_size=64),
    QuantSpec(scale_dtype="fp32", group_size=16),
    QuantSpec(scale_dtype="bf16"),
]


def kv(seed=0, shape=(2, 3, 64, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_groups_round_trip(axis):
    x = kv()
    assert torch.equal(from_groups(to_groups(x, axis, 16), axis, 16, x.shape), x)


def test_token_groups_are_per_channel():
    x = kv()
    g = to_groups(x, "tokens", 16)  # (B, H, n, 16): group = 16 tokens of one channel
    assert torch.equal(g[0, 0, 0], x[0, 0, :16, 0])
    assert torch.equal(g[0, 0, 1], x[0, 0, :16, 1])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
@pytest.mark.parametrize("bits", range(1, 9))
def test_error_within_half_step(spec, bits):
    g = to_groups(kv(bits), "channels", spec.group_size if spec.group_size <= 32 else 32)
    spec = QuantSpec(**{**spec.to_dict(), "group_size": g.shape[-1]})
    q = quantize_groups(g, bits, spec)
    err = (dequantize_groups(q, bits, spec) - g).abs()
    # half a step, plus the rounding of the stored zero to its format (exactly 0 for fp32 and code zeros)
    slack = 1e-5
    if spec.kind == "minmax" and spec.zero == "float" and spec.scale_dtype != "fp32":
        slack += (g.amin(-1, keepdim=True) - q.zero).abs()
    assert torch.all(err <= q.scale / 2 + slack)
    assert int(q.codes.max()) < (1 << bits)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(kind="symmetric")], ids=lambda s: s.id)
def test_sqnr_grows_about_6db_per_bit(spec):
    x = torch.randn(1, 4, 1024, 64, generator=torch.Generator().manual_seed(0))
    sq = [sqnr_db(x, fake_quantize(x, b, spec, "v")) for b in range(2, 9)]
    steps = torch.tensor(sq).diff()
    # 20·log10(2) = 6.02 dB per bit; the step from 2 to 3 bits is larger on Gaussian data (clipping-free min-max)
    assert steps.min() > 5.5 and steps.max() < 8.0, sq
    assert abs(float(steps.mean()) - 6.02) < 0.5, sq


def test_fake_quantize_multi_matches_single():
    x = kv(3)
    multi = fake_quantize_multi(x, [1, 3, 8, 16], QuantSpec(), "k")
    for i, b in enumerate([1, 3, 8, 16]):
        assert torch.equal(multi[i], fake_quantize(x, b, QuantSpec(), "k"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("role", ["k", "v"])
def test_accounting_matches_packed_bytes(spec, bits, role):
    x = kv(bits, shape=(1, 2, 128, 64))
    axis = spec.axis_for(role)
    q = quantize_groups(to_groups(x, axis, spec.group_size), bits, spec)
    nbytes = pack(q.codes.flatten(-2), bits).numel()  # codes of each head packed densely
    sdt = storage_dtype(spec.scale_dtype)
    nbytes += q.scale.to(sdt).numel() * sdt.itemsize
    if spec.kind == "minmax":
        if spec.zero == "float":
            nbytes += q.zero.to(sdt).numel() * sdt.itemsize
        else:  # integer zero-points are codes of the same width, packed the same way
            nbytes += pack(q.zero.to(torch.uint8).flatten(-2), bits).numel()
    assert nbytes * 8 == pytest.approx(x.numel() * spec.bits_per_element(bits), rel=1e-12)


def test_sixteen_bits_is_fp16_passthrough():
    x = kv()
    assert torch.equal(fake_quantize(x, 16, QuantSpec(), "k"), x.half().float())


def test_constants_reach_a_device_once():
    # Tables a quantizer reads on every call (the Hadamard signs, the widths' levels) are made once per device: a
    # copy from the host on each call would wait for the device's queued work (a GPU's launches would stall).
    from rateq.quant import hadamard
    from rateq.quant.affine import _levels

    assert hadamard.signs(64, 3, "cpu") is hadamard.signs(64, 3, "cpu")
    assert _levels((1, 2, 8), "cpu") is _levels((1, 2, 8), "cpu")
    assert _levels((1, 2, 8), "cpu").tolist() == [1.0, 3.0, 255.0]
