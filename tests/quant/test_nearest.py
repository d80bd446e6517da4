"""The native nearest-centroid kernel gives bit for bit the torch definition (`kmeans._nearest_torch`): codes and
errors for every group width, codebook size and weighting, odd point counts, non-contiguous inputs, exact ties
(the lowest index) and near-ties; values it does not take, and a machine without it, use the torch paths; learned
codebooks and codebook encodings are the same through it as through the definition."""

from __future__ import annotations

import pytest
import torch

from rateq import native
from rateq.quant import codebook, kmeans, nearest

needs_native = pytest.mark.skipif(nearest.library() is None,
                                  reason=f"no native kernel here ({nearest.build_error() or 'no C compiler'})")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def problem(G, n, c, k, weights, seed=0):
    g = gen(seed)
    x = torch.randn(G, n, c, generator=g) * torch.linspace(0.5, 3.0, c)
    C = torch.randn(G, k, c, generator=g) * torch.linspace(0.5, 3.0, c)
    w = None
    if weights == "point":
        w = torch.rand(G, n, 1, generator=g) + 0.01
    elif weights == "coord":
        w = torch.randn(G, n, c, generator=g).square()  # some weights near zero
    return x, C, w


def assert_same(got, want):
    assert got is not None
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]), f"{int((got[0] != want[0]).sum())} codes differ"
    assert torch.equal(got[1], want[1]), f"{int((got[1] != want[1]).sum())} errors differ"


@needs_native
@pytest.mark.parametrize("c", [1, 2, 4, 8])
@pytest.mark.parametrize("k", [2, 16, 256, 300])
@pytest.mark.parametrize("weights", [None, "point", "coord"])
def test_native_equals_the_definition(c, k, weights):
    for G, n in ((3, 301), (2, 7), (1, 1)):  # odd counts: whole blocks of points, a partial one, a single point
        x, C, w = problem(G, n, c, k, weights, seed=c * 1000 + k)
        assert_same(nearest.nearest(x, C, w), kmeans._nearest_torch(x, C, w))


@needs_native
@pytest.mark.parametrize("c", [3, 6, 16])
def test_other_widths_equal_the_definition(c):
    for weights in (None, "point", "coord"):
        x, C, w = problem(2, 133, c, 37, weights, seed=c)
        assert_same(nearest.nearest(x, C, w), kmeans._nearest_torch(x, C, w))


@needs_native
def test_a_large_codebook_equals_the_definition():
    x, C, w = problem(2, 45, 2, 1 << 12, "coord", seed=3)
    assert_same(nearest.nearest(x, C, w), kmeans._nearest_torch(x, C, w))


@needs_native
def test_non_contiguous_inputs():
    x, C, w = problem(3, 101, 4, 16, "coord", seed=4)
    want = nearest.nearest(x, C, w)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # (G, n, c) view with the points' axis outermost
    Ct = torch.zeros(3, 16, 8)[..., ::2].copy_(C)  # a view with a stride between coordinates
    assert not xt.is_contiguous() and not Ct.is_contiguous()
    assert_same(nearest.nearest(xt, Ct, w.transpose(0, 1).contiguous().transpose(0, 1)), want)
    # weights broadcast along points (stride 0), as the learners and `assign` pass them
    wp = torch.rand(3, 1, 4, generator=gen(5)) + 0.1
    assert_same(nearest.nearest(x, C, wp.expand(3, 101, 4)), kmeans._nearest_torch(x, C, wp.expand(3, 101, 4)))
    assert_same(nearest.nearest(x, C, wp[..., :1].expand(3, 101, 1)),
                kmeans._nearest_torch(x, C, wp[..., :1].expand(3, 101, 1)))


@needs_native
@pytest.mark.parametrize("c", [1, 2, 4, 8])
@pytest.mark.parametrize("weights", [None, "point", "coord"])
def test_exact_ties_go_to_the_lowest_index(c, weights):
    k, n = 64, 40
    C = torch.randint(-4, 5, (2, k, c), generator=gen(c)).float()
    C[:, 9] = C[:, 3]  # duplicates, within one vector of lanes and far apart
    C[:, 50] = C[:, 3]
    C[:, 63] = C[:, 20]
    x = torch.randint(-4, 5, (2, n, c), generator=gen(c + 1)).float()
    x[:, 0], x[:, 1] = C[:, 3], C[:, 20]  # on a duplicated centroid
    x[:, 2] = (C[:, 3] + C[:, 20]) / 2  # halfway between two (an exact tie on integer coordinates)
    x[:, 3] = 0.5  # integers around it at ±0.5 in every coordinate: many exact ties
    w = None if weights is None else torch.ones(2, n, 1 if weights == "point" else c) * 0.75
    got = nearest.nearest(x, C, w)
    assert_same(got, kmeans._nearest_torch(x, C, w))
    for p, i in ((0, 3), (1, 20)):  # the first centroid equal to the one the point sits on
        assert torch.equal(got[0][:, p], (C == C[:, i:i + 1]).all(-1).int().argmax(-1))
    d = ((x.unsqueeze(2) - C.unsqueeze(1)) ** 2).sum(-1)  # exact here: small integers and halves
    first = (d == d.amin(-1, keepdim=True)).int().argmax(-1)  # the first of equal minima
    assert torch.equal(got[0], first)
    same = torch.zeros(2, 5, c)  # every centroid the same: code 0
    assert bool((nearest.nearest(x, same, w)[0] == 0).all())


@needs_native
@pytest.mark.parametrize("c, k", [(1, 8), (2, 256), (4, 256), (8, 256)])
def test_near_ties_equal_the_definition(c, k):
    x, C, w = problem(2, 60, c, k, "coord", seed=k + c)
    mid = (C[:, 3] + C[:, k - 1]) / 2
    away = (C[:, 3] - C[:, k - 1]) * 1e-7
    for t, p in enumerate((mid, mid + away, mid - away, C[:, 5], mid + 2 * away, mid - 2 * away)):
        x[:, t] = p
    for wb in (None, w, w[..., :1]):
        assert_same(nearest.nearest(x, C, wb), kmeans._nearest_torch(x, C, wb))


@needs_native
def test_the_definition_is_the_same_whatever_the_threads():
    x, C, w = problem(4, 999, 2, 256, "coord", seed=8)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nearest.nearest(x, C, w)
        torch.set_num_threads(max(2, saved))
        assert_same(nearest.nearest(x, C, w), one)
    finally:
        torch.set_num_threads(saved)


@needs_native
def test_what_the_kernel_does_not_take_goes_to_torch():
    x, C, w = problem(2, 50, 2, 16, "coord", seed=9)
    assert nearest.nearest(x.double(), C.double(), None) is None
    assert nearest.nearest(x, C, -w) is None  # negative weights
    for bad in (float("nan"), float("inf"), 2.0 ** 62):
        y = x.clone()
        y[1, 7, 1] = bad
        assert nearest.nearest(y, C, w) is None
        D = C.clone()
        D[0, 3, 0] = bad
        assert nearest.nearest(x, D, None) is None
    wn = w.clone()
    wn[0, 0, 0] = float("nan")
    assert nearest.nearest(x, C, wn) is None
    assert nearest.nearest(torch.randn(1, 4, 17), torch.randn(1, 3, 17), None) is None  # c > MAX_C
    # the dispatchers fall back to the definition there and still agree with it
    y = x.clone()
    y[0, 0, 0] = float("inf")
    assert_same(kmeans._nearest(y, C, w), kmeans._nearest_torch(y, C, w))


def test_the_torch_paths_serve_without_the_kernel(monkeypatch, tmp_path):
    x, C, w = problem(3, 200, 2, 16, "coord", seed=10)
    want = kmeans._nearest_torch(x, C, w)
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    assert nearest.library() is None and nearest.nearest(x, C, w) is None
    assert_same(kmeans._nearest(x, C, w), want)
    codes, err = kmeans._nearest_learning(x, C, w)
    matmul = kmeans._nearest_matmul(x, C, w)
    assert torch.equal(codes, matmul[0]) and torch.equal(err, matmul[1])
    assert (codes == want[0]).float().mean() > 0.99
    books = kmeans.learn_unit_codebooks(torch.randn(2, 300, 8, generator=gen(1)), 2, 2, seed=1, iters=5)
    assert books.shape == (2, 4, 16, 2) and bool(torch.isfinite(books).all())
    g = torch.randn(1, 2, 9, 4, 2, generator=gen(2))
    assert torch.equal(codebook.encode(g, books), codebook.encode(g, books))
    monkeypatch.delenv("RATEQ_KERNELS")
    # no compiler: the build gives None and the torch paths serve
    monkeypatch.setattr(nearest, "_state", {})
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path))
    assert nearest.library() is None and nearest.nearest(x, C, w) is None
    assert_same(kmeans._nearest(x, C, w), want)


@needs_native
@pytest.mark.parametrize("c, bits", [(1, 3), (2, 2), (4, 1), (8, 1)])
def test_learning_through_the_kernel_equals_learning_by_the_definition(monkeypatch, c, bits):
    P, n, D = 2, 700, 16
    x = torch.randn(P, n, D, generator=gen(c)) * torch.linspace(0.2, 2.0, D)
    w = torch.randn(P, n, D, generator=gen(c + 1)).square()
    native_books = kmeans.learn_unit_codebooks(x, bits, c, w, seed=3, iters=8)
    assert torch.equal(kmeans.learn_unit_codebooks(x, bits, c, w, seed=3, iters=8), native_books)  # deterministic
    monkeypatch.setattr(kmeans, "_nearest_learning", kmeans._nearest_torch)
    monkeypatch.setattr(nearest, "seeding", lambda x, w: None)  # k-means++ seeding in torch too
    assert torch.equal(kmeans.learn_unit_codebooks(x, bits, c, w, seed=3, iters=8), native_books)


@needs_native
@pytest.mark.parametrize("c", [1, 2, 4, 8])
@pytest.mark.parametrize("weights", [None, "point", "coord"])
def test_kmeanspp_seeding_through_the_kernel_equals_the_torch_draws(monkeypatch, c, weights):
    x, _, w = problem(4, 333, c, 1, weights, seed=c)
    x[0, 100:140] = x[0, 99]  # repeated points: distances of exactly zero, never drawn again
    x[1] = x[1, 0]  # one point 333 times: every distance zero after the first draw, then drawn uniformly
    assert nearest.seeding(x, w) is not None
    native_C = kmeans._init_kmeanspp(x, w, 64, gen(7))
    monkeypatch.setattr(nearest, "seeding", lambda x, w: None)
    torch_C = kmeans._init_kmeanspp(x, w, 64, gen(7))
    assert torch.equal(native_C, torch_C)
    assert len({tuple(r) for r in native_C[0].tolist()}) == 64  # distinct centroids where the points allow


@needs_native
def test_learned_codebooks_do_not_depend_on_the_threads():
    x = torch.randn(2, 600, 16, generator=gen(11))
    w = torch.randn(2, 600, 16, generator=gen(12)).square()
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans.learn_unit_codebooks(x, 2, 2, w, seed=0, iters=6)
        torch.set_num_threads(max(2, saved))
        assert torch.equal(kmeans.learn_unit_codebooks(x, 2, 2, w, seed=0, iters=6), one)
    finally:
        torch.set_num_threads(saved)


@needs_native
@pytest.mark.parametrize("c, k", [(1, 16), (2, 256), (4, 256), (8, 256)])
def test_encoding_through_the_kernel_equals_the_torch_path(monkeypatch, c, k):
    C = torch.randn(2, 32 // c, k, c, generator=gen(c))
    g = torch.randn(2, 2, 37, 32 // c, c, generator=gen(k))
    mid = (C[:, :, 3] + C[:, :, k - 1]) / 2
    away = (C[:, :, 3] - C[:, :, k - 1]) * 1e-7
    for t, p in enumerate((mid, mid + away, mid - away, C[:, :, 5])):
        g[0, :, t] = p
    C[:, :, 11] = C[:, :, 5]  # an exact tie with a duplicate: index 5
    native_codes = codebook.encode(g, C)
    assert bool((native_codes[0, :, 3] == 5).all())
    one_by_one = torch.cat([codebook.encode(g[:, :, t:t + 1], C) for t in range(37)], 2)
    assert torch.equal(one_by_one, native_codes)
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    assert torch.equal(codebook.encode(g, C), native_codes)
