"""The store holds exactly the codec's encoding of what it was given, grown in place: appends are O(1) amortized,
the spare capacity is bounded and reported apart from the bytes held."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from rateq import CachePolicy, ModelFingerprint, Plan, QuantSpec, RateQCache, parse_spec
from rateq.quant import Part, codec_for
from rateq.runtime.store import GROWTH, MIN_STEP, Rows

PARTS = [
    Part("codes", 64, 2),                         # packed along the row: 16 bytes per token
    Part("codes", 16, 3),
    Part("scale", 2, dtype=torch.float16),        # floats in their dtype
    Part("zero", 2, 2),                           # a stream: 2 codes per row, 4 bits
    Part("zero", 3, 5, tokens=32),                # a stream of per-block rows
    Part("zero", 4, 8),                           # 8-bit codes are stored as is
]


def values_of(part: Part, rows: int, g: torch.Generator) -> torch.Tensor:
    if part.width:
        return torch.randint(0, 1 << part.width, (2, 3, rows, part.cols), generator=g).to(torch.uint8)
    return torch.randn(2, 3, rows, part.cols, generator=g).to(part.dtype).to(torch.float32)


@pytest.mark.parametrize("part", PARTS, ids=lambda p: f"{p.name}-{p.cols}x{p.width or p.dtype}")
def test_rows_hold_the_packing_of_everything_appended(part):
    g = torch.Generator().manual_seed(part.cols * 10 + part.width)
    rows, seen = Rows(part), []
    for r in (1, 5, 9, 0, 3, 16, 2, 1, 1, 70, 1):  # crosses 8-code groups and growth steps in every way
        new = values_of(part, r, g)
        rows.append(new)
        seen.append(new)
        want = torch.cat(seen, dim=2)
        assert rows.rows == want.shape[2]
        assert torch.equal(rows.view(), part.pack(want))  # byte for byte the whole encoding
        assert torch.equal(rows.values(), part.unpack(part.pack(want), want.shape[2]))
        assert rows.nbytes() == 2 * 3 * part.nbytes(want.shape[2])
    rows.keep(3, 30)
    assert torch.equal(rows.values(), part.unpack(part.pack(want[:, :, 3:30]), 27))
    assert rows.slack_nbytes() == 0  # a cut copies exactly what is kept
    rows.map_batch(lambda t: t.index_select(0, torch.tensor([1, 1, 0])))
    assert torch.equal(rows.values()[:, :, :27], part.unpack(part.pack(want[:, :, 3:30]), 27)[[1, 1, 0]])


def test_appends_reallocate_geometrically_and_slack_stays_bounded():
    part = Part("codes", 64, 2)
    rows, g = Rows(part), torch.Generator().manual_seed(0)
    rows.append(values_of(part, 100, g))
    moves = 0
    for _ in range(8000):
        before = rows.buf.data_ptr()
        rows.append(values_of(part, 1, g))
        moves += rows.buf.data_ptr() != before
        cap = rows.buf.shape[2]
        assert cap - rows.rows <= max(cap // GROWTH, MIN_STEP)  # one row per token here
    # capacity grows by an eighth each time: log(8100 / 100) / log(9 / 8) ≈ 37 moves, not one per append
    assert moves <= 45


SPECS = [QuantSpec(group_size=8), QuantSpec(group_size=8, zero="code", scale_dtype="fp8"),
         QuantSpec(kind="symmetric", group_size=16), QuantSpec(group_size=16, outlier_frac=0.1),
         parse_spec("lloydmax-g16-hadamard-fp16")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
@pytest.mark.parametrize("bits", [1, 2, 3, 8, 16])
def test_a_cache_holds_the_codec_encoding_of_its_history(spec, bits):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=32)
    plan = Plan.uniform(ModelFingerprint("tiny", "llama", 1, 2, 16), bits, bits, spec=spec)
    policy = CachePolicy(residual=0, block=16)
    cache = RateQCache(plan, config, policy=policy)
    g = torch.Generator().manual_seed(bits)
    K, V = torch.randn(2, 2, 200, 16, generator=g), torch.randn(2, 2, 200, 16, generator=g)
    for a, b in [(0, 37)] + [(t, t + 1) for t in range(37, 200)]:
        cache.update(K[:, :, a:b], V[:, :, a:b], 0)
    for role, x in (("k", K), ("v", V)):
        (held,) = cache.stored(0, role)
        n = held.tokens
        assert n == (policy.quantized_keys(200) if role == "k" else policy.quantized_values(200))
        codec = codec_for(spec)
        whole = codec.encode(x[:, :, :n], bits, role)
        if spec.rotation == "none":  # row-count invariant arithmetic: the very bytes of one encoding of it all
            assert set(held.parts) == set(whole)
            for name, t in whole.items():
                assert torch.equal(held.parts[name], t), (role, name)
        else:  # rotations are matrix products, which may round differently for another number of rows
            got = codec.decode(held.parts, bits, role, x[:, :, :n].shape)
            torch.testing.assert_close(got, codec.decode(whole, bits, role, x[:, :, :n].shape), atol=1e-5, rtol=0)
        assert codec.nbytes(held.parts) == codec.nbytes(whole)
    assert cache.allocated_nbytes() == cache.nbytes() + cache.slack_nbytes()
    assert 0 <= cache.slack_nbytes()
