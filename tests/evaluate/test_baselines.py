"""Baselines: the package by job, matched effective bits, the weight-norm allocator, PCA rank reduction,
rotations, names."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

import rateq
from rateq import Curves, QuantSpec
from rateq.evaluate import baselines as bl
from rateq.evaluate import evaluate
from rateq.evaluate.transforms import hadamard, kv_bases, random_orthogonal, rank_transform, rotations

HD = 64  # head_dim of the tiny models here, so KIVI's groups of 32 channels fit


@pytest.fixture
def model(tiny):
    return tiny("llama", kv_heads=2, head_dim=HD)


def _ids(n=2, t=128, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget, bits, group", [(2.5, 2, 64), (3.0, 2, 32), (4.0, 3, 32), (3.5, 3, 64),
                                                 (2.25, 2, 128)])
def test_matched_uniform_hits_budget(budget, bits, group):
    b, spec = bl.matched_uniform(budget)
    assert (b, spec.group_size) == (bits, group)
    assert spec.bits_per_element(b) == pytest.approx(budget)


def test_matched_uniform_falls_below_when_inexact():
    b, spec = bl.matched_uniform(2.6)
    assert spec.bits_per_element(b) <= 2.6
    assert spec.bits_per_element(b) == pytest.approx(2.5)


@pytest.mark.parametrize("budget", [2.5, 3.0])
def test_splits_hit_budget_exactly(model, budget):
    methods = bl.splits(rateq.fingerprint(model), budget)
    assert len(methods) >= 2
    for m in methods:
        assert m.effective_bits == pytest.approx(budget)
        k, v = m.plan.k_bits[0, 0], m.plan.v_bits[0, 0]
        assert k != v and abs(int(k) - int(v)) <= 2


# -- the package ----------------------------------------------------------------------------------------------
PUBLIC = ("GROUP_SIZES", "ROTATIONS", "REFERENCE_SPLITS", "REFERENCE_SPEC", "DEFAULT_BASELINES", "BaselineContext",
          "matched_uniform", "matched_splits", "full_precision", "fixed_split", "kivi", "splits", "projection_norms",
          "weight_norm", "waterfill", "rateq_plan", "engine_plan", "profile", "rank", "hybrid", "rotated", "reference",
          "reference_rank", "check_budget", "BaselineName", "is_profile_name", "parse_name", "check_name", "build")
JOBS = {"context": ("BaselineContext",), "matched": ("matched_uniform", "matched_splits", "check_budget"),
        "families": ("full_precision", "fixed_split", "kivi", "splits", "waterfill", "rateq_plan", "engine_plan",
                     "profile", "rank", "hybrid", "rotated", "reference"),
        "weight_norm": ("projection_norms", "weight_norm", "weight_norm_curves"),
        "names": ("BaselineName", "parse_name", "check_name", "build", "DEFAULT_BASELINES")}


def test_package_split_by_job_reexports_every_name():
    for job, names in JOBS.items():
        module = importlib.import_module(f"rateq.evaluate.baselines.{job}")
        for name in names:
            assert getattr(bl, name) is getattr(module, name), (job, name)
    for name in PUBLIC + tuple(bl.__all__):
        assert hasattr(bl, name), name
    assert set(PUBLIC) <= set(bl.__all__)


# -- the weight-norm allocator ---------------------------------------------------------------------------------
def _layer_pairs(plan):
    return [(int(k), int(v)) for k, v in zip(plan.k_bits[:, 0], plan.v_bits[:, 0])]


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5])
def test_weight_norm_is_per_layer_key_favoured_and_spends_the_budget(model, budget):
    m = bl.weight_norm(model, budget)
    plan, L = m.plan, rateq.fingerprint(model).num_layers
    for bits, quantizer in ((plan.k_bits, plan.k_quantizer), (plan.v_bits, plan.v_quantizer)):
        assert (bits == bits[:, :1]).all() and (quantizer == quantizer[:, :1]).all()  # one width per layer
    assert (plan.k_bits >= plan.v_bits).all()
    assert int(torch.cat([plan.k_bits, plan.v_bits]).min()) >= 2
    assert m.effective_bits <= budget + 1e-9
    assert m.effective_bits >= budget - 1.0 / L  # within a layer's step of the budget
    assert m.budget == budget and m.family == "wnorm" and m.name == f"wnorm@{budget:g}"
    # KIVI's min-max grid over groups of 64 (fp16 scales, integer zero-points): the widest that fits 64-dim heads.
    assert {(q.kind, q.group_size, q.scale_dtype, q.zero) for q in plan.quantizers} == {("minmax", 64, "fp16", "code")}


def test_weight_norm_is_the_solvers_greedy_on_its_curves(model):
    fp = rateq.fingerprint(model)
    curves = bl.weight_norm_curves(fp, bl.projection_norms(model))
    assert curves.shape[:3] == (fp.num_layers, 1, 2) and min(curves.bits) == 2
    for budget in (2.5, 3.0):
        want = rateq.solve(curves, budget, method="greedy", keys_at_least_values=True)
        got = bl.weight_norm(model, budget).plan
        assert _layer_pairs(got) == [(int(k), int(v)) for k, v in zip(want.k_bits[:, 0], want.v_bits[:, 0])]
        assert [got.quantizers[int(q)] for q in got.k_quantizer[:, 0]] == \
            [want.quantizers[int(q)] for q in want.k_quantizer[:, 0]]
        assert [got.quantizers[int(q)] for q in got.v_quantizer[:, 0]] == \
            [want.quantizers[int(q)] for q in want.v_quantizer[:, 0]]
        assert got.solver["method"] == "greedy"


def test_weight_norm_is_near_optimal_for_its_distortion_model(model):
    """Against every per-layer (K ≥ V) choice under D = ‖W‖²·2^(−2b): the greedy is within its reported bound."""
    fp = rateq.fingerprint(model)
    norms = bl.projection_norms(model).sum(1)  # (L, 2)
    key_spec = value_spec = bl.WNORM_QUANTIZERS[0]  # groups of 64 hold both roles of 64-dim heads
    pairs = [(k, v) for k in bl.WNORM_BITS for v in bl.WNORM_BITS if k >= v]
    for budget in (2.5, 3.0):
        m = bl.weight_norm(model, budget)
        best = None
        for combo in itertools.product(pairs, repeat=fp.num_layers):
            cost = sum(key_spec.bits_per_element(k) + value_spec.bits_per_element(v) for k, v in combo)
            if cost / (2 * fp.num_layers) > budget + 1e-9:
                continue
            d = sum(float(n[0]) * 4.0 ** -k + float(n[1]) * 4.0 ** -v for n, (k, v) in zip(norms, combo))
            best = d if best is None or d < best else best
        got = sum(float(n[0]) * 4.0 ** -k + float(n[1]) * 4.0 ** -v for n, (k, v) in zip(norms, _layer_pairs(m.plan)))
        assert got == pytest.approx(m.plan.solver["predicted_distortion"])
        assert best * (1 - 1e-9) <= got <= best + m.plan.solver["bound"] * (1 + 1e-9)


def test_weight_norm_gives_keys_more_bits_when_their_norms_are_larger(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(8.0)
    m = bl.weight_norm(model, 3.0)
    assert m.plan.mean_bits("k") > m.plan.mean_bits("v")


def test_weight_norm_budget_outside_its_range(model):
    with pytest.raises(rateq.RateQError, match="feasible range"):
        bl.weight_norm(model, 2.25)  # K2V2 already costs 2 + 18/64 = 2.28
    with pytest.raises(rateq.RateQError, match="wnorm@2.25.*feasible range"):
        bl.check_name("wnorm@2.25", config=model.config)
    with pytest.raises(rateq.RateQError, match="outside the range"):
        bl.check_name("wnorm@2")  # no config: below what any head size allows
    odd = type(model.config)(**{**model.config.to_dict(), "head_dim": 48})
    bl.check_name("wnorm@3", config=odd)  # values in groups of 16 channels: K2V2 costs 2.70
    with pytest.raises(rateq.RateQError, match="feasible range"):
        bl.check_name("wnorm@2.5", config=odd)


def test_projection_norms_match_weights(model):
    norms = bl.projection_norms(model)
    w = model.model.layers[1].self_attn.v_proj.weight
    assert norms[1, 1, 1] == pytest.approx(float(w.detach()[HD:2 * HD].pow(2).sum()), rel=1e-6)


def test_rotations_are_orthogonal():
    for mat in (hadamard(64), random_orthogonal(64, seed=3)):
        assert torch.allclose(mat @ mat.T, torch.eye(64), atol=1e-5)
    with pytest.raises(rateq.RateQError, match="power of two"):
        hadamard(48)
    r = rotations("random", 2, 2, 8)
    assert not torch.allclose(r[0, 0, 0], r[1, 0, 0])  # a fresh draw per unit


def test_pca_rank_reduction(model):
    ids = _ids()
    bases = kv_bases(model, ids)
    assert bases.vectors.shape == (3, 2, 2, HD, HD)
    v = bases.vectors[0, 0, 0]
    assert torch.allclose(v.T @ v, torch.eye(HD), atol=1e-4)
    assert (bases.variance[..., :-1] >= bases.variance[..., 1:] - 1e-4).all()  # sorted
    x = torch.randn(1, 2, 16, HD)
    full = rank_transform(bases, HD)(0, "k", x)
    assert torch.allclose(full, x, atol=1e-2)  # rank D keeps everything but fp16 rounding
    # A PCA basis keeps more of the calibration data's energy than a random basis of the same rank.
    from rateq.evaluate.transforms import KVBases

    rnd = KVBases(torch.stack([random_orthogonal(HD, i) for i in range(3 * 2 * 2)]).view(3, 2, 2, HD, HD),
                  bases.mean, bases.variance, bases.tokens)
    keys = {}

    def grab(module, query, key, value, attention_mask, **kw):
        keys.setdefault(module.layer_idx, key)
        return rateq.hooks.plain_attention(module, query, key, value, attention_mask, **kw)

    with torch.no_grad(), rateq.hooks.attention_hook(model, grab):
        model(ids)
    k = keys[1]
    err_pca = (rank_transform(bases, 8)(1, "k", k) - k).pow(2).sum()
    err_rnd = (rank_transform(rnd, 8)(1, "k", k) - k).pow(2).sum()
    assert err_pca < err_rnd


@pytest.mark.parametrize("budget", [2.5, 3.0])
def test_every_baseline_hits_its_budget(model, budget):
    """Each budgeted baseline stores at most its budget, and those defined to match it exactly do."""
    ids = _ids(n=1)
    names = ["fp", "kivi", "splits", "wnorm", "rank", "hybrid", "rotations"]
    res = evaluate(model, ids, names, budgets=[budget], calibration=_ids(n=2, seed=1))
    for row in res:
        if row["family"] == "fp":
            continue
        assert row["effective_bits"] <= budget + 1e-9, row["name"]
        if row["family"] in ("uniform", "split", "rank", "rotation"):
            assert row["effective_bits"] == pytest.approx(budget), row["name"]
        assert row["ppl"] > 0 and row["kl"] >= 0
    # The identity rotation is exactly KIVI at the same budget.
    assert res[f"rot-identity@{budget:g}"]["ppl"] == pytest.approx(res[f"kivi@{budget:g}"]["ppl"], rel=1e-6)
    assert res[f"hybrid@{budget:g}"]["effective_bits"] == pytest.approx(budget)


def test_names(model):
    fp = rateq.fingerprint(model)
    ctx = bl.BaselineContext(model, calibration=_ids(n=1))
    (m,) = bl.build("k4v2", model, context=ctx)
    assert (int(m.plan.k_bits[0, 0]), int(m.plan.v_bits[0, 0])) == (4, 2) and m.effective_bits == 4.0
    (m,) = bl.build("K3V3:minmax-g64-fp32", model, context=ctx)
    assert m.effective_bits == pytest.approx(3 + 64 / 64)
    assert [x.name for x in bl.build("kivi", model, budgets=[2.5, 3.0], context=ctx)] == ["kivi@2.5", "kivi@3"]
    (m,) = bl.build("rank16", model, context=ctx)
    assert m.effective_bits == pytest.approx(16 * 16 / HD)
    ref = bl.build("reference", model, context=ctx)
    assert [x.name for x in ref][:3] == ["fp", "K8V8:minmax-g32-fp32", "K4V4:minmax-g32-fp32"]
    assert len(ref) == 1 + 10 + 2
    with pytest.raises(rateq.RateQError, match="budget"):
        bl.build("kivi", model, context=ctx)
    with pytest.raises(rateq.RateQError, match="unknown baseline"):
        bl.build("kivvi@2", model, context=ctx)
    assert fp.head_dim == HD


def test_waterfill_row_from_curves(model):
    """With curves at hand, `waterfill@B` solves RateQuant-style and stays within budget."""
    fp = rateq.fingerprint(model)
    L, H = fp.num_layers, fp.num_kv_heads
    bits = (1, 2, 3, 4, 5, 6, 8)
    spec = QuantSpec(group_size=64)
    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(L, H, 2, 1, 1, generator=gen, dtype=torch.float64) + 0.1
    d = alpha * 4.0 ** (-torch.tensor(bits, dtype=torch.float64))
    curves = Curves(d, bits, [spec], torch.full((L, H, 2), 1024.0), "mse", fp)
    ctx = bl.BaselineContext(model, curves=curves)
    (m,) = bl.build("waterfill@2.5", model, context=ctx)
    assert m.family == "waterfill" and m.effective_bits <= 2.5 + 1e-6
    (r,) = bl.build("rateq@3", model, context=ctx)
    assert r.effective_bits <= 3.0 + 1e-6


def test_engine_rows_solve_under_each_engines_rules_from_the_same_curves(model):
    fp = rateq.fingerprint(model)
    L, H = fp.num_layers, fp.num_kv_heads
    bits = (2, 4, 5, 8)
    specs = [QuantSpec(group_size=64), rateq.parse_spec("fp8"), rateq.parse_spec("nvfp4"), rateq.parse_spec("q4_0"),
             rateq.parse_spec("q8_0")]
    gen = torch.Generator().manual_seed(1)
    d = (torch.rand(L, H, 2, len(specs), 1, generator=gen, dtype=torch.float64) + 0.1) * 4.0 ** (
        -torch.tensor(bits, dtype=torch.float64))
    for q, spec in enumerate(specs):  # engine formats exist at their own width only
        for i, b in enumerate(bits):
            if not spec.allows_bits(b):
                d[:, :, :, q, i] = float("inf")
    curves = Curves(d, bits, specs, torch.full((L, H, 2), 1024.0), "mse", fp)
    ctx = bl.BaselineContext(model, curves=curves)
    (free,) = bl.build("rateq@6", model, context=ctx)
    for engine in ("modelopt", "vllm", "sglang", "trtllm", "llamacpp"):
        assert bl.check_name(f"{engine}@6", curves=curves).kind == engine
        (m,) = bl.build(f"{engine}@6", model, context=ctx)
        assert m.family == "engine" and m.name == f"{engine}@6" and m.effective_bits <= 6 + 1e-9
        assert m.plan.solver["engine"] == engine and "predicted mse" in m.notes
        assert m.plan.solver["predicted_distortion"] >= free.plan.solver["predicted_distortion"] * (1 - 1e-9)
        rateq.engines.get_engine(engine).write(m.plan)  # the engine represents it
    without = Curves(d[..., :1, :], bits, specs[:1], torch.full((L, H, 2), 1024.0), "mse", fp)
    with pytest.raises(rateq.RateQError, match="calibrate --engine modelopt|rateq calibrate"):
        bl.check_name("modelopt@6", curves=without)
    with pytest.raises(rateq.RateQError, match="outside the range"):
        bl.check_name("modelopt@3", curves=curves)


def test_names_parse_without_a_model(tmp_path):
    assert bl.parse_name("kivi", [2.5, 3.0]).budgets == (2.5, 3.0)
    assert bl.parse_name("KIVI@2.5").kind == "kivi"
    assert bl.parse_name("k3v2:minmax-g64-fp16").split[:2] == (3, 2)
    assert bl.parse_name("rank16").rank == 16
    assert bl.parse_name("rot-hadamard@3").budgets == (3.0,)
    assert bl.parse_name("rank@2.5").needs_calibration and not bl.parse_name("K2V2").needs_calibration
    for bad, match in [("kivvi", "unknown baseline"), ("rot-foo@2", "unknown baseline"), ("", "empty"),
                       ("kivi", "needs an effective-bits budget"), ("kivi@x", "NAME@BITS"),
                       ("kivi@nan", "positive, finite"), ("kivi@inf", "positive, finite"),
                       ("kivi@0", "positive, finite"), ("kivi@-1", "positive, finite"),
                       ("K3V2@2.5", "no @BITS"), ("fp@2", "no @BITS"), ("K9V2", "1..8"),
                       ("K2V2:minmax-g33-nonsense", "cannot parse quantizer"), ("rank0", "at least 1"),
                       (str(tmp_path / "none.safetensors"), "does not exist")]:
        with pytest.raises(rateq.RateQError, match=match):
            bl.parse_name(bad)
    with pytest.raises(rateq.RateQError, match="--budget"):
        bl.parse_name("kivi", [float("nan")])


def test_names_check_against_a_config_without_weights(model):
    config = model.config  # the shape is all these checks read
    assert bl.check_name("kivi", [2.5], config=config).kind == "kivi"
    bl.check_name("reference", config=config)
    bl.check_name("rotations@3", config=config)
    for name, budgets, match in [("kivi", [0.5], "no uniform quantizer fits"),
                                 ("splits", [2.7], "no fixed K/V split"), ("rank", [0.1], "outside"),
                                 (f"rank{HD + 1}", [], "outside"), ("wnorm", [1.2], "feasible range")]:
        with pytest.raises(rateq.RateQError, match=match):
            bl.check_name(name, budgets, config=config)
    odd = type(config)(**{**config.to_dict(), "head_dim": 48})
    with pytest.raises(rateq.RateQError, match="power of two"):
        bl.check_name("rot-hadamard@3", config=odd)


def test_profile_name_runs_under_its_policy(model, tmp_path):
    fp = rateq.fingerprint(model)
    plan = rateq.Plan.uniform(fp, 3, 2, spec=QuantSpec(group_size=64), policy=rateq.CachePolicy(block=128))
    path = tmp_path / "mine.safetensors"
    rateq.save_profile(plan, path)
    assert bl.is_profile_name(str(path)) and not bl.is_profile_name("kivi")
    (m,) = bl.build(str(path), model)
    assert m.name == "mine" and m.policy == rateq.CachePolicy(block=128)
    assert m.policy_for(rateq.CachePolicy()).block == 128
    m = bl.profile(str(path), model, overrides={"residual": 8})
    assert m.policy == rateq.CachePolicy(residual=8, block=128)
    assert bl.profile(str(path), model, own_policy=False).policy is None
