"""Each quantizer family's error behaves as its theory says: orthogonal rotations, Lloyd–Max optimality and
TurboQuant's distortion bounds, unbiased QJL inner products, exact sparse outliers, exact pre-RoPE round trips."""

import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard as sylvester

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQError, parse_spec
from rateq.hooks import attention_hook, plain_attention
from rateq.quant import fake_quantize, hadamard, lloydmax, qjl
from rateq.quant.rope import apply_rope, capture_rope, invert_rope, model_rotary


def gauss(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rel_mse(x, y):
    return float((x - y).pow(2).sum() / x.pow(2).sum())


@pytest.fixture
def one_thread():
    """Loops over thousands of tiny tensors: on a busy machine a thread pool's hand-offs cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- Walsh–Hadamard --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 8, 16, 64, 128])
def test_fwht_is_the_sylvester_matrix_and_orthonormal(d):
    H = hadamard.rotate(torch.eye(d), random_signs=False)  # rows: H·e_i
    torch.testing.assert_close(H, torch.tensor(sylvester(d), dtype=torch.float32) / math.sqrt(d))
    torch.testing.assert_close(H @ H.T, torch.eye(d), atol=1e-6, rtol=0)


@pytest.mark.parametrize("d", [64, 512])
def test_dense_and_butterfly_paths_are_the_same_rotation(d):
    x = gauss((3, 7, d))
    s = hadamard.signs(d, 3)
    torch.testing.assert_close(hadamard.rotate(x, seed=3), hadamard.fwht(x * s) / math.sqrt(d), atol=2e-6, rtol=0)


@pytest.mark.parametrize("random_signs", [False, True])
def test_rotation_inverse_is_exact_and_keeps_norms(random_signs):
    x = gauss((3, 5, 64))
    y = hadamard.rotate(x, random_signs=random_signs, seed=7)
    torch.testing.assert_close(hadamard.unrotate(y, random_signs=random_signs, seed=7), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-6)
    if random_signs:  # the seed matters: another one is another rotation
        assert not torch.allclose(hadamard.rotate(x, seed=8), y)


def test_rotation_spreads_an_outlier_channel():
    x = torch.zeros(64)
    x[5] = 1.0
    assert float(hadamard.rotate(x, seed=0).abs().max()) == pytest.approx(1 / 8)


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(RateQError, match="power-of-two"):
        fake_quantize(gauss((1, 1, 32, 48)), 4, QuantSpec(rotation="hadamard"), "k")


def test_rotated_uniform_quantizer_is_the_plain_one_in_rotated_coordinates():
    # Rotation is orthogonal and data independent: the error it leaves is the plain grid's error on H·x, mapped
    # back — so the per-coordinate half-step bound of the grid holds in the rotated basis.
    x = gauss((2, 3, 64, 64), 1)
    for role in "kv":
        got = fake_quantize(x, 3, QuantSpec(rotation="rhadamard", seed=2), role)
        ref = hadamard.unrotate(fake_quantize(hadamard.rotate(x, seed=2), 3, QuantSpec(), role), seed=2)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_rotation_helps_a_uniform_grid_on_channel_outliers():
    x = gauss((1, 2, 256, 64), 2)
    x[..., 3] *= 30  # one loud channel, as in real keys
    plain = rel_mse(x, fake_quantize(x, 3, QuantSpec(group_along="channels", group_size=64), "k"))
    rotated = rel_mse(x, fake_quantize(x, 3, QuantSpec(group_along="channels", group_size=64, rotation="rhadamard"), "k"))
    assert rotated < 0.5 * plain


# -- Lloyd–Max ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [16, 64, 128])
def test_codebook_is_a_lloyd_max_fixed_point_within_turboquant_bounds(d):
    for b in range(1, 9):
        levels, bounds, mse = lloydmax.codebook(b, d)
        assert len(levels) == 2**b and np.all(np.diff(levels) > 0)
        np.testing.assert_allclose(levels, -levels[::-1], atol=1e-15)
        np.testing.assert_allclose(lloydmax._lloyd_step(np.array(levels), d), levels, atol=1e-10)
        # TurboQuant: 4^-b (Shannon lower bound) ≤ D_mse ≤ (√3·π/2)·4^-b for unit vectors
        assert 4.0**-b <= d * mse <= math.sqrt(3) * math.pi / 2 * 4.0**-b
    # the published values for 1–4 bits (≈ 0.36, 0.117, 0.03, 0.009), at head_dim 128
    if d == 128:
        got = [d * lloydmax.codebook(b, d)[2] for b in range(1, 5)]
        np.testing.assert_allclose(got, [0.36, 0.117, 0.034, 0.0093], rtol=0.03)


@pytest.mark.parametrize("d", [16, 64])
def test_lloyd_max_beats_every_uniform_grid_on_its_density(d):
    # Exact expectations by quadrature over the density of one coordinate of a random unit vector.
    t = np.linspace(-1, 1, 40001)[1:-1]
    w = np.power(1 - t * t, (d - 3) / 2)
    w /= w.sum()
    for bits in range(1, 9):
        levels, bounds, mse = lloydmax.codebook(bits, d)
        lm = float(np.sum(w * (t - levels[np.searchsorted(bounds, t)]) ** 2))
        assert lm == pytest.approx(mse, rel=1e-3)
        n = 2**bits
        steps = np.linspace(0.05, 2.0, 400)[:, None] * 6 / math.sqrt(d) / n  # every mid-rise grid, clipping included
        grids = (np.clip(np.floor(t / steps), -n // 2, n // 2 - 1) + 0.5) * steps
        best_uniform = float(np.min(np.sum(w * (t - grids) ** 2, axis=1)))
        # strictly better from 2 levels per sign on (≈1% at 2 bits, more above); at 1 bit both are ±E|t|
        assert lm <= best_uniform * (1 + 1e-6 if bits == 1 else 0.999), bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_beats_uniform_quantizers_on_gaussian_data(bits):
    # Against per-vector grids with the same metadata (one fp16 number per 64 channels) and, up to 3 bits, with
    # twice as much (min-max: scale + zero). From 5 bits on, a per-vector absmax grid catches up: its range
    # adapts to each vector's largest coordinate (≈ 2.5σ for 64 Gaussians), while the fixed codebook covers the
    # whole distribution (high-resolution MSE (2·2.5)²/12 ≈ 2.1 vs √3π/2 ≈ 2.7, in units of σ²·4^-b).
    x = gauss((1, 4, 256, 64), bits)
    lm = rel_mse(x, fake_quantize(x, bits, parse_spec("lloydmax-g64-rhadamard-fp16"), "k"))
    rivals = ["symmetric-g64-channels-rhadamard-fp16", "symmetric-g64-channels-fp16"]
    if bits <= 3:
        rivals += ["minmax-g64-channels-rhadamard-fp16", "minmax-g64-channels-fp16"]
    for uniform in rivals:
        assert lm < rel_mse(x, fake_quantize(x, bits, parse_spec(uniform), "k")), uniform


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_error_is_the_codebook_distortion(bits):
    x = gauss((1, 2, 2048, 64), 10 + bits)
    got = rel_mse(x, fake_quantize(x, bits, parse_spec("lloydmax-g64-rhadamard-fp16"), "v"))
    assert got == pytest.approx(64 * lloydmax.codebook(bits, 64)[2], rel=0.04)


# -- QJL ------------------------------------------------------------------------------------------------------
def test_qjl_estimator_is_unbiased_with_bounded_variance(one_thread):
    d, n = 64, 3000
    r, q = gauss((d,), 1), gauss((d,), 2)
    est = torch.stack([qjl.estimate(q, qjl.encode(r, s), r.norm().reshape(1), s) for s in range(n)])
    true = float(q @ r)
    se = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - true) < 4 * se
    assert float(est.var()) <= math.pi / (2 * d) * float(q.norm() ** 2 * r.norm() ** 2) * 1.1
    # the reconstruction's inner product is the estimator
    bits = qjl.encode(r, 5)
    torch.testing.assert_close(q @ qjl.decode(bits, r.norm().reshape(1), d, 5), qjl.estimate(q, bits, r.norm().reshape(1), 5))


@pytest.mark.parametrize("bits", [2, 3])
def test_turboquant_prod_inner_products_are_unbiased_over_seeds(bits, one_thread):
    # k̂ = k̂_mse(b−1) + QJL(residual): E_seed[⟨q, k̂⟩] = ⟨q, k⟩; the MSE quantizer alone is biased (shrinks).
    n = 600
    k = gauss((1, 1, 8, 64), 3)
    q = gauss((8, 64), 4)
    true = (q * k[0, 0]).sum(-1)  # (8,)
    prod, mse = [], []
    for s in range(n):
        prod.append((q * fake_quantize(k, bits, QuantSpec("lloydmax", 64, rotation="rhadamard", qjl=True, seed=s), "k")[0, 0]).sum(-1))
        mse.append((q * fake_quantize(k, bits - 1, QuantSpec("lloydmax", 64, rotation="rhadamard", seed=s), "k")[0, 0]).sum(-1))
    prod, mse = torch.stack(prod), torch.stack(mse)  # (n, 8)
    z = (prod.mean(0) - true) / (prod.std(0) / math.sqrt(n))
    assert z.abs().max() < 4.5, z  # 8 tests at once: |z| < 4.5 fails by chance with p ≈ 5e-5
    z_mse = (mse.mean(0) - true) / (mse.std(0).clamp_min(1e-6) / math.sqrt(n))
    assert z_mse.abs().max() > 8, z_mse  # the test can see a bias where there is one


# -- outliers -------------------------------------------------------------------------------------------------
def test_outliers_are_kept_exactly_and_tighten_the_grid():
    g = torch.Generator().manual_seed(6)
    x = gauss((1, 2, 64, 64), 6) / (torch.rand((1, 2, 64, 64), generator=g) + 0.02)  # heavy tails
    spec = QuantSpec(group_size=32, outlier_frac=0.05)  # 2 per group of 32
    for role in "kv":
        y = fake_quantize(x, 3, spec, role)
        axis = spec.axis_for(role)
        gx = rateq.quant.to_groups(x, axis, 32)
        gy = rateq.quant.to_groups(y, axis, 32)
        idx = gx.abs().topk(2, dim=-1).indices
        assert torch.equal(gy.gather(-1, idx), gx.gather(-1, idx).half().float())  # kept in fp16, exactly
        # everything else is within half a step of the range that remains
        rest = torch.ones_like(gx, dtype=torch.bool).scatter(-1, idx, False)
        lo = torch.where(rest, gx, torch.inf).amin(-1, keepdim=True)
        hi = torch.where(rest, gx, -torch.inf).amax(-1, keepdim=True)
        step = (hi - lo) / 7 * (1 + 2**-9)  # the scale is stored rounded up to fp16
        err = (gy - gx).abs()[rest]
        assert torch.all(err <= (step / 2 + (lo - lo.half().float()).abs() + 1e-5).expand_as(gx)[rest])
        assert rel_mse(x, y) < 0.6 * rel_mse(x, fake_quantize(x, 3, QuantSpec(group_size=32), role))


def test_outliers_are_counted_in_the_budget():
    spec = QuantSpec(group_size=32, outlier_frac=0.05)  # ceil(1.6) = 2 fp16 values + 5-bit positions per group
    assert spec.outliers_per_group() == 2
    assert spec.bits_per_element(2) == 2 + (32 + 2 * (16 + 5)) / 32
    assert QuantSpec(group_size=64, outlier_frac=0.01).bits_per_element(4) == 4 + (32 + 22) / 64
    with pytest.raises(RateQError):
        QuantSpec(group_size=4, outlier_frac=0.9)


# -- pre-RoPE keys ---------------------------------------------------------------------------------------------
def test_rope_inverse_is_exact_with_attention_scaling():
    x = gauss((2, 3, 10, 16))
    ang = torch.arange(10)[:, None] * (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)).repeat(2)[None]
    rope = (1.3 * ang.cos()[None].expand(2, -1, -1), 1.3 * ang.sin()[None].expand(2, -1, -1))  # (B, T, D), scaled
    torch.testing.assert_close(invert_rope(apply_rope(x, rope), rope), x, atol=1e-6, rtol=1e-6)
    with pytest.raises(RateQError, match="rope"):
        fake_quantize(x, 4, QuantSpec(group_size=16, prerope=True), "k")  # no tables given


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_captured_tables_recover_the_pre_rope_keys(tiny, arch):
    # The keys the attention function sees, un-rotated with the captured tables, are the projection's output
    # (after k_norm where the architecture has one): positions and conventions are right.
    model = tiny(arch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    pre, post = {}, {}
    handles = []
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "k_proj"):
            src = getattr(m, "k_norm", None) or m.k_proj
            handles.append(src.register_forward_hook(lambda mod, a, out, i=m.layer_idx: pre.__setitem__(i, out)))

    def attn(module, query, key, value, attention_mask, **kw):
        post[module.layer_idx] = key
        return plain_attention(module, query, key, value, attention_mask, **kw)

    try:
        with torch.no_grad(), capture_rope(model) as tables, attention_hook(model, attn):
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(post) == model.config.num_hidden_layers
    for layer, key in post.items():
        B, H, T, D = key.shape
        p = pre[layer]  # (B, T, H·D) from k_proj, (B, T, H, D) from Qwen3's k_norm, (B, H, T, D) from Gemma3's
        if p.shape != key.shape:
            p = p.reshape(B, T, H, D).transpose(1, 2)
        torch.testing.assert_close(invert_rope(key, tables.for_layer(layer)), p, atol=2e-5, rtol=1e-5)
        assert not torch.allclose(key, p, atol=1e-3)  # RoPE really rotated them
        # a runtime recomputes the same tables for any positions from the model's rotary module
        cos, sin = model_rotary(model)(key, torch.arange(8, 24)[None], layer)
        torch.testing.assert_close(cos, tables[layer][0][:1, 8:24])
        torch.testing.assert_close(sin, tables[layer][1][:1, 8:24])


def test_pre_rope_round_trip_through_the_simulate_path(tiny):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    policy = CachePolicy(block=16)

    def run(spec, bits):
        plan = Plan.uniform(fp, bits, spec=spec, policy=policy)
        with torch.no_grad(), rateq.simulate_plan(model, plan):
            return model(ids, use_cache=False).logits

    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    prerope = QuantSpec(group_size=16, prerope=True)
    # 16 bits: keys stored pre-RoPE in fp16 and re-rotated — the model, up to fp16 rounding of K and V
    torch.testing.assert_close(run(prerope, 16), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(run(prerope, 16), run(QuantSpec(group_size=16), 16), atol=1e-4, rtol=1e-4)
    # at 4 bits the option really changes what is stored (per-channel groups in the pre-RoPE basis)
    assert not torch.allclose(run(prerope, 4), run(QuantSpec(group_size=16), 4), atol=1e-4)
    torch.testing.assert_close(run(prerope, 8), ref, atol=2e-2, rtol=0)
