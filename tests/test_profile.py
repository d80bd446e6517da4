"""Profiles on disk and plan JSON: bit-exact round trips, and one clear error for every kind of bad file."""

import json
import os

import numpy as np
import pytest
import torch

import rateq
from rateq.curves import Curves
from rateq.io import read_safetensors, write_safetensors
from rateq.models import ModelFingerprint, fingerprint
from rateq.plots import plot_plan
from rateq.profile import load_profile_curves, plan_to_json, write_plan_json
from rateq.quant.spec import KIVI, QuantSpec


def _curves(fp: ModelFingerprint, seed=0, quantizers=(KIVI, QuantSpec(group_size=64))) -> Curves:
    rng = np.random.default_rng(seed)
    L, H = fp.num_layers, fp.num_kv_heads
    bits = (1, 2, 3, 4, 6, 8)
    d = np.sort(rng.lognormal(0, 1, (L, H, 2, len(quantizers), len(bits))), -1)[..., ::-1].copy()
    counts = rng.integers(100, 2000, (L, H, 2)).astype(np.float64)
    return Curves(torch.tensor(d), bits, list(quantizers), torch.tensor(counts), "fisher", fp,
                  {"data": "austen-emma", "tokens": 2048, "seed": 0, "policy": {"residual": 0, "block": 32, "sinks": 0}})


@pytest.fixture
def plan_and_curves():
    fp = ModelFingerprint("tiny-llama", "llama", 3, 2, 16)
    curves = _curves(fp)
    plan = rateq.solve(curves, 3.1, method="exact", policy=rateq.CachePolicy(residual=32, sinks=4))
    return plan, curves


def _assert_same_plan(a, b, weights=True):
    for name in ("k_bits", "v_bits", "k_quantizer", "v_quantizer"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.quantizers == b.quantizers and a.model == b.model and a.policy == b.policy
    assert a.budget_bits == b.budget_bits and a.calibration == b.calibration and a.solver == b.solver
    if weights:
        assert torch.equal(a.weights, b.weights) and a.weights.dtype == b.weights.dtype
        assert a.effective_bits == b.effective_bits and a.nominal_bits == b.nominal_bits


def test_profile_round_trip_is_bit_exact(tmp_path, plan_and_curves):
    plan, curves = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors", curves=curves)
    back = rateq.load_profile(path)
    _assert_same_plan(plan, back)
    stored = load_profile_curves(path)
    assert torch.equal(stored.distortion, curves.distortion) and torch.equal(stored.counts, curves.counts)
    assert stored.bits == curves.bits and stored.quantizers == curves.quantizers and stored.metric == "fisher"
    # Saving what was loaded stores the same tensors and metadata: nothing is lost or reformatted on the way.
    again = rateq.save_profile(back, tmp_path / "q.safetensors", curves=stored)
    (t1, m1), (t2, m2) = read_safetensors(path, "profile"), read_safetensors(again, "profile")
    assert m1 == m2 and t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    _, meta = read_safetensors(path, "profile")
    assert meta["format"] == "rateq.profile" and meta["rateq_version"] == rateq.__version__
    assert float(meta["effective_bits"]) == plan.effective_bits and "nominal_bits" in meta


def test_profile_without_curves(tmp_path, plan_and_curves):
    plan, _ = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    assert load_profile_curves(path) is None
    _assert_same_plan(plan, rateq.load_profile(path))


def test_profile_for_another_model_names_the_differences(tmp_path, plan_and_curves, tiny):
    plan, _ = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    other = tiny("qwen3", kv_heads=4)  # 3 layers, 4 KV heads (the plan has 2), head_dim 16
    with pytest.raises(rateq.RateQError) as err:
        rateq.load_profile(path, model=other)
    msg = str(err.value)
    assert "architecture llama vs qwen3" in msg and "num_kv_heads 2 vs 4" in msg
    assert "num_layers" not in msg and "head_dim" not in msg  # only what differs
    same = tiny("llama", kv_heads=2)
    assert rateq.load_profile(path, model=same).model == plan.model
    assert rateq.load_profile(path, model=fingerprint(same)).num_layers == 3


def test_truncated_profile(tmp_path, plan_and_curves):
    plan, _ = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(rateq.RateQError, match="truncated"):
        rateq.load_profile(path)


def test_wrong_version_and_wrong_kind_of_file(tmp_path, plan_and_curves):
    plan, curves = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    tensors, meta = read_safetensors(path, "profile")
    write_safetensors(path, tensors, {**meta, "version": "99"})
    with pytest.raises(rateq.RateQError, match="profile version '99'; .* reads version 1"):
        rateq.load_profile(path)
    curves.save(tmp_path / "c.safetensors")
    with pytest.raises(rateq.RateQError, match="curves file"):
        rateq.load_profile(tmp_path / "c.safetensors")
    with pytest.raises(rateq.RateQError, match="does not exist"):
        rateq.load_profile(tmp_path / "missing.safetensors")


def test_damaged_profile(tmp_path, plan_and_curves):
    plan, _ = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    tensors, meta = read_safetensors(path, "profile")
    write_safetensors(path, {**tensors, "k_bits": tensors["k_bits"] + 1}, meta)  # bits no longer match the figures
    with pytest.raises(rateq.RateQError, match="damaged profile"):
        rateq.load_profile(path)
    write_safetensors(path, {k: v for k, v in tensors.items() if k != "v_bits"}, meta)
    with pytest.raises(rateq.RateQError, match="damaged profile"):
        rateq.load_profile(path)


def test_failed_save_leaves_previous_profile_intact(tmp_path, plan_and_curves, monkeypatch):
    plan, _ = plan_and_curves
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("rateq.io.save_file", broken)
    with pytest.raises(rateq.RateQError, match="cannot write .*p.safetensors: disk full"):
        rateq.save_profile(plan, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left behind
    with pytest.raises(rateq.RateQError, match="disk full"):
        rateq.save_profile(plan, tmp_path / "new" / "deeper" / "q.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # nor the folders made for it


def test_written_files_get_the_usual_mode(tmp_path, plan_and_curves):
    plan, curves = plan_and_curves
    mask = os.umask(0o022)
    try:
        paths = [rateq.save_profile(plan, tmp_path / "p.safetensors"), write_plan_json(plan, tmp_path / "p.json"),
                 plot_plan(plan, tmp_path / "p.png")]
        curves.save(tmp_path / "c.safetensors")
        paths.append(tmp_path / "c.safetensors")
    finally:
        os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o644)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "p.json", "p.png", "p.safetensors"]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, where no file can be created")
def test_unwritable_targets_are_one_clear_error(tmp_path, plan_and_curves):
    from rateq.io import check_writable

    plan, _ = plan_and_curves
    for target, match in ((tmp_path, "is a folder"), (tmp_path / "file" / "p.safetensors", "is a file"),
                          ("/proc/p.safetensors", "cannot be written")):
        if target == tmp_path / "file" / "p.safetensors":
            (tmp_path / "file").write_text("x")
        with pytest.raises(rateq.RateQError, match=match):
            check_writable(target)
    check_writable(tmp_path / "missing" / "p.safetensors")  # a missing folder is made when writing
    assert not (tmp_path / "missing").exists()
    with pytest.raises(rateq.RateQError, match="cannot write"):
        rateq.save_profile(plan, "/proc/p.safetensors")
    with pytest.raises(rateq.RateQError, match="cannot write"):
        write_plan_json(plan, "/proc/p.json")
    with pytest.raises(rateq.RateQError, match="cannot write"):
        plot_plan(plan, "/proc/p.png")
    with pytest.raises(rateq.RateQError, match="image"):
        plot_plan(plan, tmp_path / "p.nosuchformat")


def test_plan_json_schema_and_round_trip(tmp_path, plan_and_curves):
    plan, _ = plan_and_curves
    doc = plan_to_json(plan)
    assert set(doc) >= {"format", "version", "model", "budget_bits", "effective_bits", "nominal_bits", "quantizers",
                        "layers", "calibration"}
    assert doc["format"] == "rateq.plan" and doc["version"] == "1"
    assert doc["model"] == {"name": "tiny-llama", "architecture": "llama", "num_layers": 3, "num_kv_heads": 2,
                            "head_dim": 16}
    assert doc["budget_bits"] == 3.1 and doc["effective_bits"] == plan.effective_bits
    assert list(doc["quantizers"]) == [q.id for q in plan.quantizers]
    assert [r["layer"] for r in doc["layers"]] == [0, 1, 2]
    for r in doc["layers"]:
        assert r["k_bits"] == plan.k_bits[r["layer"]].tolist() and len(r["v_bits"]) == 2
        assert all(q in doc["quantizers"] for q in r["k_quantizer"] + r["v_quantizer"])
    text = json.dumps(doc)
    back = rateq.plan_from_json(text)
    _assert_same_plan(plan, back, weights=False)
    path = write_plan_json(plan, tmp_path / "plan.json")
    assert json.loads(path.read_text()) == json.loads(text)
    with pytest.raises(rateq.RateQError, match="not a rateq plan"):
        rateq.plan_from_json({"format": "something else"})
    with pytest.raises(rateq.RateQError, match="version"):
        rateq.plan_from_json({**doc, "version": "0"})


def test_summary_and_heatmap(tmp_path, plan_and_curves, png_size):
    plan, _ = plan_and_curves
    s = rateq.plan_summary(plan)
    assert s["k_bits"] == pytest.approx(float(plan.k_bits.double().mean()))
    assert [r["layer"] for r in s["layers"]] == [0, 1, 2]
    assert s["layers"][1]["v_bits"] == pytest.approx(float(plan.v_bits[1].double().mean()))
    assert sum(n["k"] for n in s["quantizers"].values()) == 3 * 2
    png = plot_plan(plan, tmp_path / "map.png")
    assert png_size(png) == (840, 360)  # 3 layers × 2 heads: the bit map's least size, 7 × 3 inches at 120 dpi


def _codebook_plan(model) -> rateq.Plan:
    """2-bit codebooks of two channels for every unit of `model`, fingerprinted from the model itself."""
    from rateq.quant.params import param_key

    spec = rateq.parse_spec("codebook-g2")
    fp = fingerprint(model)
    books = torch.randn(fp.num_layers, fp.num_kv_heads, 2, fp.head_dim // 2, 16, 2,
                        generator=torch.Generator().manual_seed(0))
    return rateq.Plan.uniform(fp, 2, spec=spec, params={param_key(spec, 2): books})


def test_learned_bytes_are_a_share_of_the_models_fp16_weights_and_the_count_round_trips(tmp_path, tiny):
    model = tiny("llama")  # 3 layers, 2 KV heads of 16 channels
    n = sum(p.numel() for p in model.parameters())
    plan = _codebook_plan(model)
    s = rateq.plan_summary(plan)
    assert s["learned_bytes"] == plan.learned_nbytes() == 3 * 2 * 2 * 8 * 16 * 2 * 2  # units × groups × 16 × c, fp16
    assert s["fp16_weight_bytes"] == 2 * n and s["model"]["num_parameters"] == n
    assert s["learned_share"] == pytest.approx(s["learned_bytes"] / (2 * n)) == plan.learned_share()
    assert json.loads(json.dumps(s))["learned_share"] == s["learned_share"]
    back = rateq.load_profile(rateq.save_profile(plan, tmp_path / "p.safetensors"), model=model)
    assert back.model == plan.model and back.model.num_parameters == n
    assert rateq.plan_summary(back)["learned_share"] == s["learned_share"]
    doc = plan_to_json(plan)
    assert doc["model"]["num_parameters"] == n and rateq.plan_from_json(json.dumps(doc)).model == plan.model
    assert rateq.plan_summary(rateq.Plan.uniform(plan.model, 4))["learned_bytes"] == 0  # nothing learned


def test_profiles_without_the_parameter_count_load_and_omit_the_share(tmp_path, tiny):
    model = tiny("llama")
    plan = _codebook_plan(model)
    path = rateq.save_profile(plan, tmp_path / "p.safetensors")
    tensors, meta = read_safetensors(path, "profile")
    shape = {k: v for k, v in json.loads(meta["model"]).items() if k != "num_parameters"}
    write_safetensors(path, tensors, {**meta, "model": json.dumps(shape)})  # as profiles were written before
    old = rateq.load_profile(path, model=model)
    assert old.model.num_parameters is None and old.learned_share() is None
    s = rateq.plan_summary(old)
    assert s["learned_bytes"] == plan.learned_nbytes() and s["fp16_weight_bytes"] is None and s["learned_share"] is None
    assert old.learned_share(num_parameters=plan.model.num_parameters) == plan.learned_share()
    assert "num_parameters" not in plan_to_json(old)["model"]
    shipped = rateq.load_profile(os.path.join(os.path.dirname(__file__), "..", "profiles",
                                              "smollm2-135m-b2.5.safetensors"))
    # the shipped profile records the model's size and learns nothing: a share of 0 of the weights
    assert shipped.model.num_parameters > 100_000_000 and rateq.plan_summary(shipped)["learned_share"] == 0
    for bad in (-5, "135M", 2.5):  # a damaged count is refused like any other damaged field
        write_safetensors(path, tensors, {**meta, "model": json.dumps({**shape, "num_parameters": bad})})
        with pytest.raises(rateq.RateQError, match="damaged profile.*num_parameters must be a positive whole"):
            rateq.load_profile(path)
