import pytest
import torch

from rateq.quant import kmeans
from rateq.quant.kmeans import (
    assign, correlated_groups, learn_scalar_codebook, learn_vector_codebook, reconstruct, weighted_error,
    weighted_kmeans,
)

N = 4096


def gen(seed):
    return torch.Generator().manual_seed(seed)


def data(dist, shape, seed=0):
    if dist == "gauss":
        return torch.randn(shape, generator=gen(seed))
    # Student-t with 3 degrees of freedom: z / sqrt(χ²₃ / 3), heavy tails that stretch a min-max grid
    g = gen(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn(*shape, 3, generator=g).square().sum(-1)
    return z / (chi2 / 3).sqrt()


def fisher(shape, seed=1):
    """Stand-in Fisher weights: squared gradients, positive and uneven."""
    return torch.randn(shape, generator=gen(seed)).square() + 1e-3


def uniform_grid_error(x, bits, w):
    """Weighted error of the min-max grid of 2^bits levels per channel (round to nearest) on `x (n, c)`."""
    lo, hi = x.amin(0), x.amax(0)
    L = (1 << bits) - 1
    step = (hi - lo) / L
    q = torch.round((x - lo) / step).clamp(0, L) * step + lo
    return float(((x - q).square() * w).double().sum())


def brute_force(x, C, w=None):
    d = (x[:, None, :] - C[None]).square()
    return (d if w is None else d * w[:, None, :]).sum(-1)


@pytest.mark.parametrize("dist", ["gauss", "t3"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_scalar_codebook_beats_uniform_grid(dist, bits):
    x, w = data(dist, (N,)), fisher((N,))
    levels = learn_scalar_codebook(x, bits, w)
    assert levels.shape == (1 << bits,)
    assert torch.all(levels.diff() >= 0)
    err = weighted_error(x[:, None], levels[:, None], w)
    assert err < 0.9 * uniform_grid_error(x[:, None], bits, w[:, None])


@pytest.mark.parametrize("dist", ["gauss", "t3"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_coupled_codebook_beats_uniform_grid_per_channel(dist, bits):
    x, w = data(dist, (N, 2)), fisher((N, 2))
    C = learn_vector_codebook(x, bits, 2, w)  # same bits per channel: 2^(2·bits) centroids for the pair
    assert C.shape == (1, 1 << (2 * bits), 2)
    err = weighted_error(x[:, None, :], C, w[:, None, :])
    assert err < 0.9 * uniform_grid_error(x, bits, w)


@pytest.mark.parametrize("c", [1, 2])
def test_weighting_matters(c):
    x = data("gauss", (N, c))
    w = torch.where(x[:, 0] > 1.0, 100.0, 1.0)  # the upper tail (16% of the points) carries most of the weight
    weighted, r = weighted_kmeans(x, 4, weights=w)
    plain, _ = weighted_kmeans(x, 4)
    assert r.error == pytest.approx(weighted_error(x, weighted, w), rel=1e-6)
    assert weighted_error(x, weighted, w) < 0.95 * weighted_error(x, plain, w)
    # and the other way round: the unweighted codebook is the better one for plain squared error
    assert weighted_error(x, plain) < weighted_error(x, weighted)


def test_per_coordinate_weights():
    # A coordinate with (nearly) no weight is (nearly) ignored: the centroids spread along the weighted one.
    x = data("gauss", (N, 2))
    w = torch.tensor([[1.0, 1e-6]]).expand(N, 2)
    C, _ = weighted_kmeans(x, 4, weights=w)
    assert C[:, 0].unique().numel() == 4
    assert torch.allclose(C[:, 1], torch.zeros(4), atol=0.25)
    assert weighted_error(x, C, w) < 0.6 * weighted_error(x, weighted_kmeans(x, 4)[0], w)


def test_same_seed_bit_identical_and_other_seeds_close():
    x, w = data("t3", (N, 4)), fisher((N, 4))
    a = learn_vector_codebook(x, 2, 2, w, seed=3, sample=2048)
    b = learn_vector_codebook(x, 2, 2, w, seed=3, sample=2048)
    assert torch.equal(a, b)
    v = data("gauss", (20000,))
    assert torch.equal(learn_scalar_codebook(v, 3, seed=5, sample=1000),
                       learn_scalar_codebook(v, 3, seed=5, sample=1000))
    errs = [weighted_kmeans(x[:, :2], 64, weights=w[:, :2], seed=s)[1].error for s in range(3)]
    assert max(errs) < 1.05 * min(errs), errs


def test_sorted_output():
    C, _ = weighted_kmeans(data("gauss", (N, 2)), 16)
    keys = C[:, 0].tolist()
    assert keys == sorted(keys)
    for i in range(15):  # lexicographic: the second coordinate orders ties of the first
        assert (C[i, 0], C[i, 1]) <= (C[i + 1, 0], C[i + 1, 1])


def test_more_centroids_than_distinct_points():
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]]).repeat(50, 1)
    C, r = weighted_kmeans(x, 8)
    assert C.shape == (8, 2) and torch.isfinite(C).all()
    assert r.error == 0 and r.converged
    for p in x[:3]:  # every distinct point is a centroid
        assert (C == p).all(1).any()
    assert torch.equal(C, weighted_kmeans(x, 8)[0])
    levels = learn_scalar_codebook(torch.tensor([1.0, 2.0, 3.0]).repeat(40), 3)
    assert levels.shape == (8,) and set(levels.tolist()) == {1.0, 2.0, 3.0}
    assert torch.equal(levels, learn_scalar_codebook(torch.tensor([1.0, 2.0, 3.0]).repeat(40), 3))


def test_empty_clusters_are_reseeded():
    # four tight clusters, all centroids started on one far point: three are empty after the first assignment
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centers[:, None, :] + 0.01 * torch.randn(4, 100, 2, generator=gen(0))).reshape(-1, 2)
    C, r = weighted_kmeans(x, 4, init=torch.full((4, 2), 100.0))
    assert torch.cdist(centers, C).amin(1).max() < 0.01  # one centroid on each cluster
    assert r.error < 0.01 * 400
    C2, r2 = weighted_kmeans(x, 4, init=torch.full((4, 2), 100.0))
    assert torch.equal(C, C2) and r == r2


def test_constant_data():
    levels = learn_scalar_codebook(torch.full((1000,), 2.5), 2)
    assert torch.equal(levels, torch.full((4,), 2.5))
    x = torch.tensor([1.0, -3.0, 0.5, 7.0]).expand(500, 4)
    C = learn_vector_codebook(x, 2, 2, fisher((500, 4)))
    assert torch.equal(C, x[0].reshape(2, 1, 2).expand(2, 16, 2))
    assert weighted_error(x.reshape(500, 2, 2), C) == 0


def test_zero_weights_count_as_unweighted():
    x = data("gauss", (N, 1))
    assert torch.equal(weighted_kmeans(x, 4, weights=torch.zeros(N))[0], weighted_kmeans(x, 4)[0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans(x, 4, weights=-torch.ones(N))


def test_refuses_oversized_tables():
    x = data("gauss", (64, 16))
    with pytest.raises(ValueError, match=r"2\^24 centroids"):
        learn_vector_codebook(x, 3, 8)
    with pytest.raises(ValueError, match=r"2\^18 centroids"):
        learn_vector_codebook(x, 9, 2)
    with pytest.raises(ValueError, match="too large"):
        weighted_kmeans(x[:, :1], (1 << 16) + 1)
    with pytest.raises(ValueError, match="1..8 bits"):
        learn_scalar_codebook(x, 9)
    with pytest.raises(ValueError, match="groups of 3"):
        learn_vector_codebook(x, 1, 3)


def test_correlated_groups_pairs_correlated_channels():
    x = data("gauss", (2000, 8))
    x[:, 5] = 3.0 - 2.0 * x[:, 1]  # perfectly (anti-)correlated with channel 1
    x[:, 6] = 4.0  # constant: correlates with nothing
    for c in (2, 4):
        perm = correlated_groups(x, c)
        assert torch.equal(perm.sort().values, torch.arange(8))
        groups = perm.reshape(-1, c).tolist()
        assert any(1 in g and 5 in g for g in groups)
        assert torch.equal(perm, correlated_groups(x, c))
    assert torch.equal(correlated_groups(x, 1), torch.arange(8))


def test_groups_select_channels():
    x, w = data("gauss", (1000, 6)), fisher((1000, 6))
    perm = torch.tensor([4, 0, 2, 5, 3, 1])
    a = learn_vector_codebook(x, 2, 2, w, groups=perm)
    b = learn_vector_codebook(x[:, perm], 2, 2, w[:, perm])
    assert a.shape == (3, 16, 2) and torch.equal(a, b)
    with pytest.raises(ValueError, match="permutation"):
        learn_vector_codebook(x, 2, 2, groups=[0, 0, 1, 2, 3, 4])


def test_coupling_exploits_correlation():
    # Two strongly correlated channels: a joint codebook beats the best per-channel (product) codebook.
    z = data("gauss", (N, 2))
    x = torch.stack([z[:, 0], z[:, 0] + 0.1 * z[:, 1]], 1)
    joint = weighted_error(x[:, None, :], learn_vector_codebook(x, 2, 2))
    apart = weighted_error(x[:, :, None], learn_vector_codebook(x, 2, 1))
    assert joint < 0.5 * apart


@pytest.mark.parametrize("c", [1, 2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_assign_matches_brute_force(c, weighted):
    x = data("t3", (3000, c))
    C = data("gauss", (37, c), seed=9)
    w = fisher((3000, c)) if weighted else None
    codes = assign(x, C, w)
    d = brute_force(x, C, w)
    assert codes.dtype == torch.int64 and codes.shape == (3000,)
    chosen = d.gather(1, codes[:, None])[:, 0]
    assert torch.allclose(chosen, d.amin(1), rtol=1e-6, atol=0)
    assert (codes == d.argmin(1)).float().mean() > 0.999
    assert torch.equal(reconstruct(codes, C), C[codes])
    assert weighted_error(x, C, w) == pytest.approx(float(d.amin(1).double().sum()), rel=1e-5)


def test_assign_per_point_weights_do_not_move_codes():
    x, C = data("gauss", (500, 2)), data("gauss", (8, 2), seed=3)
    assert torch.equal(assign(x, C, fisher((500,))), assign(x, C))


def test_assign_grouped():
    x, w = data("gauss", (500, 3, 2)), fisher((500, 3, 2))
    C = data("gauss", (3, 16, 2), seed=4)
    codes = assign(x, C, w)
    assert codes.shape == (500, 3)
    for g in range(3):
        assert torch.equal(codes[:, g], assign(x[:, g], C[g], w[:, g]))
    assert torch.equal(reconstruct(codes, C)[:, 1], C[1][codes[:, 1]])


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_chunking_changes_nothing(monkeypatch, kernels):
    if kernels == "torch":
        monkeypatch.setenv("RATEQ_KERNELS", "torch")  # the torch paths, which form distances in chunks
    x, w = data("t3", (2000, 6)), fisher((2000, 6))
    C = data("gauss", (3, 50, 2), seed=5)
    xg, wg = x.reshape(2000, 3, 2), w.reshape(2000, 3, 2)
    whole = assign(xg, C, wg), weighted_kmeans(x, 16, weights=w), learn_vector_codebook(x, 2, 2, w)
    monkeypatch.setattr(kmeans, "_CHUNK", 97)  # far fewer pairs than one group's distances
    chunked = assign(xg, C, wg), weighted_kmeans(x, 16, weights=w), learn_vector_codebook(x, 2, 2, w)
    assert torch.equal(whole[0], chunked[0])
    assert torch.equal(whole[1][0], chunked[1][0]) and whole[1][1] == chunked[1][1]
    assert torch.equal(whole[2], chunked[2])


def test_sample_caps_the_points():
    v = data("gauss", (50000,))
    a = learn_scalar_codebook(v, 2, sample=2000, seed=1)
    assert a.shape == (4,)
    # learned on a subset, still close to the full-data optimum (±0.45, ±1.51 for a standard normal)
    assert torch.allclose(a.abs(), torch.tensor([1.51, 0.45, 0.45, 1.51]), atol=0.1)
    x = data("gauss", (50000, 2))
    C = learn_vector_codebook(x, 1, 2, sample=1000)
    assert C.shape == (1, 4, 2)


@pytest.mark.parametrize("dist", ["gauss", "t3"])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_grid_start_is_the_product_of_channel_quantiles_and_lloyd_improves_it(dist, bits):
    x, w = data(dist, (N, 2)), fisher((N, 2))
    m = 1 << bits
    start = kmeans._init_grid(x[None], w[None], m * m)[0]
    levels = [kmeans._init_quantiles(x[None, :, j:j + 1], w[None, :, j:j + 1], m)[0, :, 0] for j in range(2)]
    assert torch.equal(start, torch.cartesian_prod(*levels))
    C, got = weighted_kmeans(x, m * m, weights=w, init="grid", iters=30)
    assert got.error <= weighted_error(x, start, w) * (1 + 1e-6)
    assert got.error < uniform_grid_error(x, bits, w)
    with pytest.raises(ValueError, match="m\\^c"):
        weighted_kmeans(x, 8, weights=w, init="grid")


@pytest.mark.parametrize("form", ["_nearest_learning", "_nearest_matmul"])
def test_learning_distances_pick_the_nearest_centroid(form):
    # What learning uses — the native kernel, or where it does not run the matmul form — agrees with the exact
    # coordinate-by-coordinate distances (the matmul form but on near-ties).
    x, w = data("t3", (3000, 2)), fisher((3000, 2))
    C = data("gauss", (64, 2), seed=9)
    for wb in (None, w[None], w[None, :, :1]):
        codes, err = getattr(kmeans, form)(x[None], C[None], wb)
        exact, exact_err = kmeans._nearest_torch(x[None], C[None], wb)
        assert (codes == exact).float().mean() > 0.999
        torch.testing.assert_close(err, exact_err, rtol=1e-4, atol=1e-6)
