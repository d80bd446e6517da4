"""Codebook quantizers: codes of the nearest learned centroid per group of channels, no per-token metadata —
exact codes whatever the batch shape, bytes that match the bits, codebooks that beat uniform grids, and profiles
that keep them (and refuse damaged ones)."""

from __future__ import annotations

import pytest
import torch

from rateq import CachePolicy, ModelFingerprint, Plan, RateQError, load_profile, parse_spec, save_profile
from rateq.quant import codebook
from rateq.quant.codec import codec_for, fake_quantize
from rateq.quant.kmeans import learn_unit_codebooks
from rateq.quant.params import param_key


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_ids_widths_and_options():
    spec = parse_spec("codebook-g2-prerope")
    assert spec.id == "codebook-g2-prerope" and parse_spec(spec.to_json()) == spec and spec.learned
    assert parse_spec("codebook-g4-rhadamard").id == "codebook-g4-rhadamard"
    assert [b for b in range(1, 9) if spec.allows_bits(b)] == [1, 2, 3, 4]
    assert [b for b in range(1, 9) if parse_spec("codebook-g4").allows_bits(b)] == [1, 2]
    assert [b for b in range(1, 9) if parse_spec("codebook-g8").allows_bits(b)] == [1]
    assert spec.bits_per_element(2) == 2.0  # no per-token metadata
    for bad, msg in (("codebook-g3", "1, 2, 4 or 8"), ("codebook-g2-bf16", "scale_dtype"),
                     ("codebook-g2-o0.1", "outliers")):
        with pytest.raises(RateQError, match=msg):
            parse_spec(bad)


def test_codes_are_the_exact_nearest_centroid_whatever_the_batch_shape():
    g = torch.randn(2, 3, 40, 8, 2, generator=gen(0))
    C = torch.randn(3, 8, 16, 2, generator=gen(1))
    codes = codebook.encode(g, C)
    brute = ((g.unsqueeze(-2) - C.view(1, 3, 1, 8, 16, 2)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(codes, brute)
    one_by_one = torch.cat([codebook.encode(g[:, :, t:t + 1], C) for t in range(40)], 2)
    assert torch.equal(one_by_one, codes)  # the cache codes a token at a time, the evaluation a whole window
    got = codebook.decode(codes, C)
    assert torch.equal(got[1, 2, 5, 3], C[2, 3, codes[1, 2, 5, 3]])


def _ordered_nearest(g, C):
    """The definition: distances summed coordinate by coordinate in order, the first of equal minima."""
    d = (g.unsqueeze(-2)[..., 0] - C[None, :, None, :, :, 0]) ** 2
    for j in range(1, g.shape[-1]):
        d = d + (g.unsqueeze(-2)[..., j] - C[None, :, None, :, :, j]) ** 2
    return d.argmin(-1)


@pytest.fixture(params=["highest", "medium"])
def matmul_precision(request):
    """fp32 matmuls as fp32, or as torch may run them in bf16 ("medium"): the codes must not change."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("c, k", [(1, 8), (2, 256), (4, 256), (8, 256)])
def test_codes_are_exact_at_near_ties_and_exact_ties(c, k, matmul_precision):
    C = torch.randn(2, 64 // c, k, c, generator=gen(c))
    g = torch.randn(1, 2, 60, 64 // c, c, generator=gen(k))
    # Points on the bisector of two centroids (exact and rounded ties), and a hair off it on either side.
    mid = (C[:, :, 3] + C[:, :, k - 1]) / 2
    away = (C[:, :, 3] - C[:, :, k - 1]) * 1e-7
    for t, p in enumerate((mid, mid + away, mid - away, C[:, :, 5])):
        g[0, :, t] = p
    codes = codebook.encode(g, C)
    assert torch.equal(codes, _ordered_nearest(g, C))
    assert torch.equal(torch.cat([codebook.encode(g[:, :, t:t + 1], C) for t in range(60)], 2), codes)
    assert torch.equal(codes[0, :, 3], torch.full_like(codes[0, :, 3], 5))  # a centroid codes to itself


@pytest.mark.parametrize("name, bits", [("codebook-g1", 3), ("codebook-g2", 2), ("codebook-g4-hadamard", 1),
                                        ("codebook-g8", 1)])
def test_an_encoding_holds_the_bits_it_counts_and_decodes_as_it_simulates(name, bits):
    spec = parse_spec(name)
    x = torch.randn(2, 3, 24, 64, generator=gen(2))
    c = spec.group_size
    books = learn_unit_codebooks(codec_for(spec).rotate(x).transpose(0, 1).reshape(3, -1, 64), bits, c)
    codec = codec_for(spec).bind(books)
    enc = codec.encode(x, bits, "v")
    assert codec.nbytes(enc) == bits * x.numel() / 8
    assert torch.equal(codec.decode(enc, bits, "v", x.shape), fake_quantize(x, bits, spec, "v", param=books))
    with pytest.raises(RateQError, match="codebooks learned per unit: bind them first"):
        codec_for(spec).encode(x, bits, "v")
    with pytest.raises(RateQError, match="needs codebooks of shape"):
        codec.encode(x[:, :2], bits, "v")


def uniform_error(x, w, bits):
    """Weighted error of the best plain grid without per-token metadata: 2^bits levels spread evenly over each
    channel's calibrated range (per channel, like a codebook of c = 1)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    step = (hi - lo) / ((1 << bits) - 1)
    q = ((x - lo) / step).round().clamp(0, (1 << bits) - 1) * step + lo
    return float((w * (x - q) ** 2).sum())


def codebook_error(x, w, books):
    P, n, D = x.shape
    G, K, c = books.shape[1:]
    g = x.reshape(P, n, G, c).unsqueeze(0)  # (B=1, h=P, T=n, G, c)
    rec = codebook.decode(codebook.encode(g, books), books).reshape(P, n, D)
    return float((w * (x - rec) ** 2).sum())


@pytest.mark.parametrize("data", ["gaussian", "heavy"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weighted_kmeans_beats_uniform_grids_at_every_width(data, bits):
    n, D = 1024, 16
    x = torch.randn(2, n, D, generator=gen(bits))
    if data == "heavy":  # rare large values: a grid spread over the range wastes its levels on them
        x = x * (1 + torch.rand(2, n, D, generator=gen(9)) ** 6 * 8)
    w = torch.rand(2, n, D, generator=gen(5)) ** 2  # Fisher weights: uneven across elements
    books = learn_unit_codebooks(x, bits, 1, w)
    assert codebook_error(x, w, books) < uniform_error(x, w, bits)
    # and coupling channels at the same bits per element does not lose on correlated data
    if bits <= 2:
        y = torch.randn(2, n, D // 2, generator=gen(7)).repeat_interleave(2, -1) + 0.1 * x
        pair = learn_unit_codebooks(y, bits, 2)
        assert codebook_error(y, torch.ones_like(y), pair) < codebook_error(y, torch.ones_like(y), learn_unit_codebooks(y, bits, 1))


def test_the_same_seed_gives_the_same_codebooks():
    x = torch.randn(3, 512, 8, generator=gen(0))
    assert torch.equal(learn_unit_codebooks(x, 2, 2, seed=4), learn_unit_codebooks(x, 2, 2, seed=4))


def codebook_plan():
    spec = parse_spec("codebook-g2")
    fp = ModelFingerprint("tiny", "llama", 2, 3, 16)
    books = torch.randn(2, 3, 2, 8, 16, 2, generator=gen(3))
    return Plan.uniform(fp, 2, spec=spec, params={param_key(spec, 2): books}, policy=CachePolicy())


def test_profiles_keep_codebooks_in_fp16_and_refuse_foreign_or_truncated_ones(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rateq import plan_from_json, plan_to_json

    plan = codebook_plan()
    assert torch.equal(plan_from_json(plan_to_json(plan)).params["codebook-g2.codebook2"], plan.params["codebook-g2.codebook2"])
    path = save_profile(plan, tmp_path / "p.safetensors")
    back = load_profile(path)
    assert torch.equal(back.params["codebook-g2.codebook2"], plan.params["codebook-g2.codebook2"].half().float())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("param.codebook-g2.codebook2").dtype == torch.float16
    tensors = load_file(str(path))
    for change, msg in (
            (lambda t: t.update({"param.codebook-g2.codebook2": t["param.codebook-g2.codebook2"][..., :8, :].contiguous()}), "shape"),
            (lambda t: t.pop("param.codebook-g2.codebook2"), "lack the calibrated codebook-g2.codebook2"),
            (lambda t: t.update({"param.codebook-g2.codebook3": torch.ones(2, 3, 2, 8, 64, 2)}), "no quantizer"),
            (lambda t: t["param.codebook-g2.codebook2"].view(-1).__setitem__(0, float("nan")), "NaN")):
        t = {k: v.clone() for k, v in tensors.items()}
        change(t)
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(RateQError, match=f"damaged profile.*{msg}") as exc:
            load_profile(tmp_path / "bad.safetensors")
        assert "\n" not in str(exc.value)


def synthetic_curves(L=2, H=2, D=16):
    import rateq

    specs = [parse_spec("codebook-g2"), parse_spec("minmax-g16-fp16")]
    bits = (1, 2, 3, 4)
    d = torch.tensor([[0.5, 0.2, 0.1, 0.05], [2.0, 0.6, 0.2, 0.08]], dtype=torch.float64)
    dist = d.expand(L, H, 2, 2, 4).clone()
    fp = ModelFingerprint("tiny", "llama", L, H, D)
    params = {param_key(specs[0], b): torch.randn(L, H, 2, D // 2, 1 << (2 * b), 2, generator=gen(b)) for b in bits}
    return rateq.Curves(dist, bits, specs, torch.full((L, H, 2), 100.0), "mse", fp, {}, params=params)


def test_learned_parameters_can_be_charged_against_the_budget():
    import rateq

    curves = synthetic_curves()
    cost = curves.cost(learned_tokens=1024)
    assert cost[0].tolist() == pytest.approx([b + 16 * 4 ** b / 1024 for b in (1, 2, 3, 4)])
    assert torch.equal(curves.cost()[1], cost[1])  # per-token metadata only: nothing to charge
    free = rateq.solve(curves, 2.0)
    assert {q.id for q in free.quantizers} == {"codebook-g2"} and free.learned_nbytes() > 0
    charged = rateq.solve(curves, 2.0, learned_tokens=256)  # 2-bit codebooks cost 1 bit more at 256 tokens
    assert charged.solver["learned_tokens"] == 256
    assert charged.solver["predicted_distortion"] > free.solver["predicted_distortion"]
    assert charged.learned_nbytes() < free.learned_nbytes()
    with pytest.raises(RateQError, match="learned_tokens must be a positive whole number"):
        rateq.solve(curves, 2.0, learned_tokens=0)
