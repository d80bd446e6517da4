"""The codec every family goes through: decode(encode(x)) is fake_quantize bit for bit, the existing uniform
specs are unchanged, the packed bytes are the accounted bits, and specs of every family round-trip as text."""

import pytest
import torch

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQError, parse_spec
from rateq.quant import codec_for, dequantize_groups, fake_quantize, fake_quantize_multi, from_groups, quantize_groups, to_groups
from rateq.quant.spec import FULL_PRECISION_BITS

SPECS = [
    # the uniform grids that existed before the families (their results must not change)
    QuantSpec(),
    QuantSpec(kind="symmetric"),
    QuantSpec(zero="code", group_size=64),
    QuantSpec(scale_dtype="fp32", group_size=16),
    QuantSpec(scale_dtype="bf16", group_along="tokens"),
    # the families
    QuantSpec(rotation="hadamard"),
    QuantSpec(kind="symmetric", group_size=64, group_along="channels", rotation="rhadamard", seed=3),
    QuantSpec(zero="code", group_size=64, rotation="rhadamard"),
    QuantSpec(kind="lloydmax", group_size=64, rotation="rhadamard"),
    QuantSpec(kind="lloydmax", group_size=32, rotation="hadamard", scale_dtype="bf16"),
    QuantSpec(kind="lloydmax", group_size=64, rotation="rhadamard", qjl=True),
    QuantSpec(kind="lloydmax", group_size=16, rotation="rhadamard", qjl=True, seed=9),
    QuantSpec(outlier_frac=0.05),
    QuantSpec(kind="symmetric", group_size=64, outlier_frac=0.02, rotation="rhadamard"),
    QuantSpec(kind="lloydmax", group_size=64, rotation="rhadamard", qjl=True, outlier_frac=0.02),
    QuantSpec(group_size=256, group_along="tokens", outlier_frac=0.01),  # 9-bit positions
]
BITS = [1, 2, 3, 4, 5, 6, 7, 8, FULL_PRECISION_BITS]


def kv(seed=0, shape=(2, 3, 256, 64)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 5] *= 8  # an outlier channel, as real keys have
    return x


def old_fake_quantize(x, bits, spec, role):
    """The uniform fake quantizer as it was before the codec existed."""
    if bits >= FULL_PRECISION_BITS:
        return x.to(torch.float16).to(x.dtype)
    axis = spec.axis_for(role)
    q = quantize_groups(to_groups(x, axis, spec.group_size), bits, spec)
    return from_groups(dequantize_groups(q, bits, spec), axis, spec.group_size, x.shape).to(x.dtype)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
@pytest.mark.parametrize("role", ["k", "v"])
def test_decode_of_encode_is_fake_quantize_and_bytes_are_the_accounted_bits(spec, role):
    x = kv(len(spec.id), (1, 2, 256, 64))
    codec = codec_for(spec)
    for bits in BITS:
        enc = codec.encode(x, bits, role)
        got = codec.decode(enc, bits, role, x.shape)
        assert torch.equal(got, fake_quantize(x, bits, spec, role)), bits
        if spec.is_uniform_plain:
            assert torch.equal(got, old_fake_quantize(x, bits, spec, role)), bits
            assert torch.equal(got, codec.fake_quantize(x, bits, role)), bits
        assert codec.nbytes(enc) * 8 == spec.bits_per_element(bits) * x.numel(), (bits, {k: (v.dtype, tuple(v.shape)) for k, v in enc.items()})


def test_encodings_hold_packed_codes_and_metadata_in_storage_dtypes():
    x = kv()
    enc = codec_for(QuantSpec(scale_dtype="bf16")).encode(x, 3, "k")
    assert enc["codes"].dtype == torch.uint8 and enc["codes"].shape == (2, 3, 256, 64 * 3 // 8)
    assert enc["scale"].dtype == torch.bfloat16 and enc["scale"].shape == (2, 3, 256 // 32, 64)  # per channel per block
    enc = codec_for(QuantSpec()).encode(x, 2, "v")
    assert enc["scale"].dtype == torch.float16 and enc["scale"].shape == (2, 3, 256, 2)  # per token, 2 groups
    enc = codec_for(parse_spec("lloydmax-qjl-g64-rhadamard-fp16")).encode(x, 3, "k")
    assert set(enc) == {"codes", "norm", "qjl", "rnorm"}
    assert enc["codes"].shape == (2, 3, 256, 64 * 2 // 8) and enc["qjl"].shape == (2, 3, 256, 64 // 8)
    assert enc["norm"].shape == enc["rnorm"].shape == (2, 3, 256, 1)
    assert set(codec_for(parse_spec("lloydmax-qjl-g64-rhadamard-fp16")).encode(x, 1, "k")) == {"qjl", "rnorm"}


@pytest.mark.parametrize("spec", [QuantSpec(), parse_spec("lloydmax-qjl-g64-rhadamard-fp16"),
                                  parse_spec("symmetric-g32-rhadamard-fp16-o0.05")], ids=lambda s: s.id)
def test_chunks_encode_independently(spec):
    # A runtime encodes each chunk as it is stored and never re-encodes: chunks of whole key blocks (or any
    # tokens, for values) decode to the same values as the whole.
    x = kv(1)
    codec = codec_for(spec)
    for role in "kv":
        whole = codec.fake_quantize(x, 3, role)
        parts = [codec.decode(codec.encode(c, 3, role), 3, role, c.shape) for c in x.split([64, 32, 160], dim=2)]
        assert torch.equal(torch.cat(parts, 2), whole)


def test_keys_along_tokens_quantize_whole_blocks_only():
    with pytest.raises(ValueError, match="groups of 32"):
        codec_for(QuantSpec(rotation="hadamard")).encode(kv(shape=(1, 1, 40, 64)), 2, "k")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    x = kv().to(dtype)
    for spec in SPECS[5:]:
        assert fake_quantize(x, 3, spec, "v").dtype == dtype
        assert codec_for(spec).decode(codec_for(spec).encode(x, 3, "v"), 3, "v", x.shape, dtype).dtype == dtype


def test_multi_matches_single_for_every_family():
    x = kv(2, (1, 2, 256, 64))
    for spec in SPECS:
        for role in "kv":
            multi = fake_quantize_multi(x, [1, 3, 8, 16], spec, role)
            for i, b in enumerate([1, 3, 8, 16]):
                assert torch.equal(multi[i], fake_quantize(x, b, spec, role)), (spec.id, role, b)


@pytest.mark.parametrize("spec_id", ["minmax-g32-fp16-prerope", "minmax-g128-rhadamard-fp16-prerope",
                                     "symmetric-g64-hadamard-fp16", "minmax-g16-rhadamard-bf16-prerope",
                                     "lloydmax-g64-rhadamard-fp16-prerope", "minmax-g32-fp16-zcode-prerope"])
def test_multi_matches_single_for_rotated_and_pre_rope_grids(spec_id):
    spec = rateq.parse_spec(spec_id)
    x = kv(4, (1, 2, 256, 64))
    ang = torch.arange(256)[:, None] * (1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)).repeat(2)[None]
    rope = (ang.cos(), ang.sin())
    for role in [r for r in "kv" if rateq.quant.spec.holds_role(spec, r, 64)]:
        multi = fake_quantize_multi(x, [1, 2, 5, 8, 16], spec, role, rope=rope)
        for i, b in enumerate([1, 2, 5, 8, 16]):
            assert torch.equal(multi[i], fake_quantize(x, b, spec, role, rope=rope)), (spec.id, role, b)



@pytest.mark.parametrize("spec_id,per_width", [
    ("minmax-g32-fp16-prerope", 0), ("minmax-g32-fp16", 0),  # every width in the same ops
    ("minmax-g128-rhadamard-fp16-prerope", 3), ("symmetric-g64-hadamard-fp16", 2),  # + the rotation undone per width
    ("lloydmax-g64-rhadamard-fp16", 8),  # + each width's codes, levels and rotation
])
def test_multi_shares_its_work_across_widths(spec_id, per_width):
    # Calibration quantizes every unit at every width: on a GPU each tensor operation is a kernel launch, so the
    # widths share the groups, statistics and RoPE (views, which launch nothing, are not counted).
    from dispatch_count import Dispatched  # tests/dispatch_count.py

    spec, x = rateq.parse_spec(spec_id), kv(5, (1, 2, 256, 64))
    ang = torch.arange(256)[:, None] * (1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)).repeat(2)[None]
    ops = []
    for bits in ([2], [1, 2, 3, 4, 5, 6, 8]):
        fake_quantize_multi(x, bits, spec, "k", rope=(ang.cos(), ang.sin()))  # tables made on first use
        with Dispatched() as d:
            fake_quantize_multi(x, bits, spec, "k", rope=(ang.cos(), ang.sin()))
        ops.append(d.ops)
    assert ops[1] - ops[0] <= 6 * per_width, ops

def test_pre_rope_codec_stores_pre_rope_keys():
    x = kv(3, (1, 2, 8, 64))
    ang = torch.arange(8)[:, None] * (1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)).repeat(2)[None]
    rope = (ang.cos(), ang.sin())  # (T, D)
    spec = QuantSpec(group_size=8, prerope=True)
    codec = codec_for(spec)
    enc = codec.encode(x, 16, "k", rope=rope)
    torch.testing.assert_close(enc["fp16"].float(), rateq.quant.invert_rope(x, rope), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(codec.decode(enc, 16, "k", x.shape, rope=rope), x, atol=4e-3, rtol=1e-3)
    # values are not rotated by RoPE: the option leaves them alone
    assert torch.equal(fake_quantize(x, 4, spec, "v"), fake_quantize(x, 4, QuantSpec(group_size=8), "v"))


def test_kv_kqv_qkqv_are_plans(tiny):
    # K and V choose their quantizers independently: KQV = Lloyd–Max keys, Lloyd–Max + QJL values.
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    mse, prod = parse_spec("lloydmax-g16-rhadamard-fp16"), parse_spec("lloydmax-qjl-g16-rhadamard-fp16")
    L, H = fp.num_layers, fp.num_kv_heads
    full = lambda v: torch.full((L, H), v)  # noqa: E731
    plan = Plan(full(3), full(3), full(0), full(1), [mse, prod], fp, policy=CachePolicy(block=16))
    assert plan.effective_bits == pytest.approx(3 + (16 / 16 + 32 / 16) / 2)
    t = rateq.plan_transform(plan, plan.policy)
    x = kv(4, (1, H, 32, 16))
    assert torch.equal(t(0, "k", x), fake_quantize(x, 3, mse, "k"))
    assert torch.equal(t(0, "v", x), fake_quantize(x, 3, prod, "v"))
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with rateq.simulate_plan(model, plan):
            got = model(ids, use_cache=False).logits
    assert torch.isfinite(got).all() and not torch.equal(got, ref)


# -- specs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS + [QuantSpec(prerope=True, rotation="hadamard")], ids=lambda s: s.id)
def test_every_family_round_trips_as_text(spec):
    assert parse_spec(spec.id) == spec
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert parse_spec(spec.to_json()) == spec


def test_existing_specs_keep_their_ids_and_json():
    assert QuantSpec().id == "minmax-g32-fp16"
    assert QuantSpec().to_dict() == {"kind": "minmax", "group_size": 32, "group_along": "auto", "scale_dtype": "fp16",
                                     "zero": "float"}
    assert parse_spec("lloydmax-qjl-g64-rhadamard-fp16-o0.02-prerope-s4") == QuantSpec(
        "lloydmax", 64, rotation="rhadamard", qjl=True, outlier_frac=0.02, prerope=True, seed=4)


def test_family_accounting():
    lm = parse_spec("lloydmax-g64-rhadamard-fp16")
    prod = parse_spec("lloydmax-qjl-g64-rhadamard-fp16")
    assert lm.bits_per_element(3) == 3 + 16 / 64  # one fp16 norm per vector
    assert prod.bits_per_element(3) == 3 + 32 / 64  # 2-bit codes + 1 sign per channel, norm + residual norm
    assert prod.bits_per_element(1) == 1 + 16 / 64  # the sketch alone: signs + residual norm
    assert QuantSpec(rotation="rhadamard").bits_per_element(2) == QuantSpec().bits_per_element(2)  # rotation is free
    assert lm.axis_for("k") == "channels"


@pytest.mark.parametrize("kw", [dict(kind="lloydmax"), dict(kind="lloydmax", rotation="hadamard", group_along="tokens"),
                                dict(qjl=True), dict(rotation="dct"), dict(outlier_frac=1.0), dict(seed=-1),
                                dict(kind="lloydmax", rotation="hadamard", zero="code")])
def test_invalid_family_specs(kw):
    with pytest.raises(RateQError):
        QuantSpec(**kw)
