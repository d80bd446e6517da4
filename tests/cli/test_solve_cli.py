"""`rateq solve`, `show`, `export` and `calibrate` from the command line: outputs, files, and exit code 2 errors."""

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rateq
from rateq.calibrate import DEFAULT_QUANTIZERS
from cli.main import app, main
from rateq.curves import Curves
from rateq.models import ModelFingerprint
from rateq.quant.spec import KIVI, QuantSpec

runner = CliRunner()


@pytest.fixture
def curves_file(tmp_path):
    rng = np.random.default_rng(0)
    L, H, bits, qs = 4, 3, (1, 2, 3, 4, 6, 8), [KIVI, QuantSpec(group_size=64)]
    d = np.sort(rng.lognormal(0, 1, (L, H, 2, len(qs), len(bits))), -1)[..., ::-1].copy()
    curves = Curves(torch.tensor(d), bits, qs, torch.full((L, H, 2), 1024.0), "output",
                    ModelFingerprint("tiny-llama", "llama", L, H, 16),
                    {"data": "synthetic", "policy": {"residual": 32, "block": 32, "sinks": 4}})
    path = tmp_path / "m.curves.safetensors"
    curves.save(path)
    return path


def run_main(monkeypatch, capsys, *args):
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rateq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_solve_writes_a_profile(tmp_path, curves_file):
    out = tmp_path / "p.safetensors"
    res = runner.invoke(app, ["solve", str(curves_file), "--budget", "3", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    plan = rateq.load_profile(out)
    assert doc["profile"] == str(out) and doc["effective_bits"] == plan.effective_bits <= 3.0
    assert plan.solver["method"] == "exact"
    assert plan.policy == rateq.CachePolicy(residual=32, block=32, sinks=4)  # from the curves' calibration
    res = runner.invoke(app, ["solve", str(curves_file), "-b", "2.5", "-o", str(out), "--method", "greedy",
                              "--keys-at-least-values", "--min-bits", "2"])
    assert res.exit_code == 0, res.output
    plan = rateq.load_profile(out)
    assert plan.solver["method"] == "greedy" and (plan.k_bits >= plan.v_bits).all() and plan.v_bits.min() >= 2
    assert "effective" in res.stdout and "K " in res.stdout


@pytest.mark.parametrize("recorded", [{"residual": 16, "block": 128, "sinks": 2}, None],
                         ids=["recorded", "not-recorded"])
def test_the_command_and_the_library_give_a_plan_the_same_policy(tmp_path, recorded):
    """Both rebuild the policy from the curves in one way (`rateq.solve.problem.calibration_policy`): the one
    they were measured under, or, for curves that record none, a key block holding every key group (64 here)."""
    from rateq.solve.problem import calibration_policy

    rng = np.random.default_rng(1)
    L, H, bits, qs = 2, 2, (1, 2, 4), [KIVI, QuantSpec(group_size=64)]
    d = np.sort(rng.lognormal(0, 1, (L, H, 2, len(qs), len(bits))), -1)[..., ::-1].copy()
    calibration = {"data": "synthetic"} if recorded is None else {"data": "synthetic", "policy": recorded}
    Curves(torch.tensor(d), bits, qs, torch.full((L, H, 2), 512.0), "output",
           ModelFingerprint("tiny-llama", "llama", L, H, 64), calibration).save(tmp_path / "c.curves.safetensors")
    res = runner.invoke(app, ["solve", str(tmp_path / "c.curves.safetensors"), "--budget", "3", "--out",
                              str(tmp_path / "p.safetensors")])
    assert res.exit_code == 0, res.output
    from_cli = rateq.load_profile(tmp_path / "p.safetensors")
    curves = rateq.Curves.load(tmp_path / "c.curves.safetensors")
    from_library = rateq.solve(curves, 3)
    expected = rateq.CachePolicy(**recorded) if recorded else rateq.CachePolicy(block=64)
    assert from_cli.policy == from_library.policy == calibration_policy(curves) == expected
    assert torch.equal(from_cli.k_bits, from_library.k_bits) and torch.equal(from_cli.v_bits, from_library.v_bits)


def test_solve_sweep(curves_file):
    res = runner.invoke(app, ["solve", str(curves_file), "--sweep", "1.5:9.5:0.5", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["frontier"]
    assert [r["budget"] for r in rows] == [1.5 + 0.5 * i for i in range(17)]
    assert rows[-1]["feasible"] is False and rows[-1]["range"] == [1.5, 9.0]
    d = [r["distortion"] for r in rows if r["feasible"]]
    assert all(b <= a for a, b in zip(d, d[1:]))
    res = runner.invoke(app, ["solve", str(curves_file), "--sweep", "2:4:1"])
    assert res.exit_code == 0 and "frontier" in res.stdout and "outside" not in res.stdout


@pytest.mark.parametrize("args, match", [
    (["--budget", "1.0", "--out", "{tmp}/p.safetensors"], "outside the feasible range [1.5000, 9.0000]"),
    (["--budget", "3"], "--budget needs --out"),
    ([], "give --budget"),
    (["--sweep", "1:x:2"], "START:STOP:STEP"),
    (["--sweep", "4:2:1"], "START ≤ STOP"),
    (["--budget", "3", "--out", "{tmp}/p.safetensors", "--method", "simplex"], "unknown --method"),
    (["--budget", "3", "--out", "{tmp}"], "is a folder"),
])
def test_solve_errors_exit_2_with_one_line(monkeypatch, capsys, tmp_path, curves_file, args, match):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_main(monkeypatch, capsys, "solve", curves_file, *args)
    assert code == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "p.safetensors").exists()


def test_missing_or_wrong_curves_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "solve", tmp_path / "none.safetensors", "--sweep", "2:3:1")
    assert code == 2 and "does not exist" in err
    from rateq.io import write_safetensors

    bad = write_safetensors(tmp_path / "bad.safetensors", {"x": torch.zeros(2)}, {"format": "something"})
    code, _, err = run_main(monkeypatch, capsys, "solve", bad, "--sweep", "2:3:1")
    assert code == 2 and "not a rateq curves file" in err


@pytest.fixture
def profile_file(tmp_path, curves_file):
    out = tmp_path / "p.safetensors"
    res = runner.invoke(app, ["solve", str(curves_file), "--budget", "3.2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_show(tmp_path, profile_file):
    png = tmp_path / "map.png"
    res = runner.invoke(app, ["show", str(profile_file), "--png", str(png)])
    assert res.exit_code == 0, res.output
    plan = rateq.load_profile(profile_file)
    assert f"{plan.effective_bits:.4f} effective" in res.stdout and f"{plan.nominal_bits:.4f} nominal" in res.stdout
    assert f"K {plan.mean_bits('k'):.2f} / V {plan.mean_bits('v'):.2f}" in res.stdout
    first = f"{int(plan.k_bits[0, 0])}"
    assert "code bits per KV head" in res.stdout and first in res.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["show", str(profile_file), "--json"])
    doc = json.loads(res.stdout)
    assert doc["budget_bits"] == 3.2 and len(doc["layers"]) == 4


def test_export(tmp_path, profile_file):
    res = runner.invoke(app, ["export", str(profile_file)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["format"] == "rateq.plan" and len(doc["layers"]) == 4 and len(doc["layers"][0]["k_bits"]) == 3
    plan = rateq.plan_from_json(doc)
    assert torch.equal(plan.k_bits, rateq.load_profile(profile_file).k_bits)
    out = tmp_path / "plan.json"
    res = runner.invoke(app, ["export", str(profile_file), "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text()) == doc


def test_show_and_export_errors(monkeypatch, capsys, tmp_path, profile_file):
    from rateq.io import read_safetensors, write_safetensors

    code, _, err = run_main(monkeypatch, capsys, "export", profile_file, "--format", "yaml")
    assert code == 2 and "unknown export format" in err
    tensors, meta = read_safetensors(profile_file, "profile")
    old = tmp_path / "old.safetensors"
    write_safetensors(old, tensors, {**meta, "version": "0"})
    code, _, err = run_main(monkeypatch, capsys, "show", old)
    assert code == 2 and "profile version '0'" in err and err.count("\n") == 1
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(profile_file.read_bytes()[:100])
    code, _, err = run_main(monkeypatch, capsys, "export", cut)
    assert code == 2 and "truncated" in err


@pytest.mark.parametrize("args, match", [
    (["--budget", "0.9"], "outside the feasible range [1.0000, 9.0000]"),  # below 2.5: codebooks at 1 bit
    (["--budget", "1.0", "--quantizers", ",".join(DEFAULT_QUANTIZERS)], "outside the feasible range [1.2500, 9.0000]"),
    (["--budget", "2.5", "--metric", "psnr"], "unknown --metric"),
    (["--budget", "2.5", "--bits", "2,x"], "comma-separated integers"),
    (["--budget", "2.5", "--quantizers", "minmax-q7"], "cannot parse quantizer"),
    (["--budget", "2.5", "--n-samples", "0"], "--n-samples must be at least 1"),
    (["--budget", "2.5", "--query-stride", "0"], "--query-stride must be at least 1"),
    (["--budget", "2.5", "--quantizers", "default,minmax-q7"], "cannot parse quantizer"),
    (["--budget", "0.9", "--quantizers", "default,codebook-g2-prerope"], "outside the feasible range [1.0000,"),
    (["--budget", "2.5", "--method", "magic"], "unknown --method"),
    (["--budget", "5", "--engine", "tgi"], "unknown engine 'tgi'"),
    (["--budget", "5", "--engine", "vllm", "--residual", "8"], "vllm quantizes every cached token"),
    (["--budget", "3", "--engine", "modelopt"], "outside the feasible range [4.5000, 8.0000]"),
])
def test_calibrate_checks_inputs_before_loading_the_model(monkeypatch, capsys, tmp_path, args, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rateq, "load_model", lambda *a, **k: pytest.fail("model loaded before inputs were checked"))
    code, _, err = run_main(monkeypatch, capsys, "calibrate", *args)
    assert code == 2 and match in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_calibrate_end_to_end_on_the_default_model(tmp_path, smol):
    out = tmp_path / "smol.safetensors"
    res = runner.invoke(app, ["calibrate", "--budget", "3.0", "--n-samples", "1", "--seq-len", "128",
                              "--metric", "output", "--bits", "2,3,4", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    plan = rateq.load_profile(out, model=smol[0])  # the fingerprint matches the model it was made from
    assert doc["curves"] == str(tmp_path / "smol.curves.safetensors")
    curves = rateq.Curves.load(doc["curves"])
    assert curves.shape == (30, 3, 2, 5, 3) and curves.calibration["tokens"] == 128  # the default quantizers
    assert plan.policy.block == 128  # a key block that holds the 128-token key groups
    assert plan.effective_bits <= 3.0 and plan.model.name == "smollm2-135m"
    assert plan.calibration["data"] == "mix" and plan.calibration["metric"] == "output"


@pytest.mark.slow
def test_calibrate_for_an_engine_writes_a_plan_it_runs(tmp_path, smol):
    out = tmp_path / "smol-modelopt.safetensors"
    res = runner.invoke(app, ["calibrate", "--budget", "6", "--engine", "modelopt", "--n-samples", "1", "--seq-len",
                              "128", "--metric", "output", "--bits", "2", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    curves = rateq.Curves.load(json.loads(res.stdout)["curves"])
    assert {"fp8", "nvfp4"} <= {q.id for q in curves.quantizers} and set(curves.bits) == {2, 4, 8}
    plan = rateq.load_profile(out)
    assert plan.solver["engine"] == "modelopt" and plan.effective_bits <= 6 + 1e-9
    assert {q.id for q in plan.quantizers} <= {"fp8", "fp8_tensor", "nvfp4"}
    assert "fp8_tensor.scale" in curves.params  # calibrated on windows held out from the priced ones
    for role in ("k", "v"):  # one format per layer, keys at least values
        assert (plan.bits(role) == plan.bits(role)[:, :1]).all()
    assert (plan.k_bits >= plan.v_bits).all()
    scales = ["--scales", str(tmp_path / "kv_scales.safetensors")] if plan.params else []
    res = runner.invoke(app, ["export", str(out), "--format", "modelopt", *scales])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)["quantization"]
    assert doc["kv_cache_schema_version"] == 1 and len(doc["kv_cache_quantized_layers"]) == 30


def test_solve_ties_layers_and_caps_devices(curves_file, tmp_path):
    out = tmp_path / "tied.safetensors"
    res = runner.invoke(app, ["solve", str(curves_file), "--budget", "3", "--out", str(out), "--tie", "layer",
                              "--devices", "0-1:3.5,2-3:2.5", "--method", "convex", "--json"])
    assert res.exit_code == 0, res.output
    plan = rateq.load_profile(out)
    for role in ("k", "v"):  # every KV head of a layer at one (quantizer, bits)
        bits, qid = plan.bits(role), plan.quantizer_ids(role)
        assert (bits == bits[:, :1]).all() and (qid == qid[:, :1]).all()
    assert plan.solver["tie"] == "layer" and plan.solver["devices"] == [[0, 1, 3.5], [2, 3, 2.5]]
    bpe = plan.unit_bits_per_element()  # (L, H, 2); the curves weigh every unit alike
    assert float(bpe[:2].mean()) <= 3.5 + 1e-9 and float(bpe[2:].mean()) <= 2.5 + 1e-9
    assert plan.effective_bits <= 3 + 1e-9


@pytest.mark.parametrize("args,message", [
    (["--tie", "heads"], "unknown --tie 'heads'"),
    (["--devices", "0-1"], "--devices takes FIRST-LAST:BITS items"),
    (["--devices", "0-9:3"], "devices"),
])
def test_solve_refuses_bad_ties_and_devices_in_one_line(curves_file, tmp_path, args, message, monkeypatch, capsys):
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_main(monkeypatch, capsys, "solve", curves_file, "--budget", "3", "--out", out, *args)
    assert code == 2 and not stdout
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_solve_and_show_report_learned_bytes_as_a_share_of_the_models_fp16_weights(tmp_path, tiny):
    from rateq.plan import learned_text
    from rateq.quant.params import param_key

    model = tiny("llama")  # curves fingerprinted from the model, as calibration makes them: with its parameters
    fp = rateq.fingerprint(model)
    n = sum(p.numel() for p in model.parameters())
    assert fp.num_parameters == n
    specs, bits = [rateq.parse_spec("codebook-g2"), QuantSpec(group_size=16)], (1, 2, 3, 4)
    g = torch.Generator().manual_seed(0)
    d = torch.tensor([[0.5, 0.2, 0.1, 0.05], [2.0, 0.6, 0.2, 0.08]], dtype=torch.float64).expand(3, 2, 2, 2, 4)
    params = {param_key(specs[0], b): torch.randn(3, 2, 2, 8, 4 ** b, 2, generator=g) for b in bits}
    Curves(d.clone(), bits, specs, torch.full((3, 2, 2), 100.0), "mse", fp, {}, params=params).save(
        tmp_path / "c.curves.safetensors")
    out = tmp_path / "p.safetensors"
    res = runner.invoke(app, ["solve", str(tmp_path / "c.curves.safetensors"), "--budget", "2", "--out", str(out),
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    plan = rateq.load_profile(out)
    assert plan.model.num_parameters == n and doc["model"]["num_parameters"] == n
    assert doc["learned_bytes"] == plan.learned_nbytes() > 0 and doc["fp16_weight_bytes"] == 2 * n
    assert doc["learned_share"] == pytest.approx(doc["learned_bytes"] / (2 * n))
    shown = runner.invoke(app, ["show", str(out), "--json"])
    assert {k: json.loads(shown.stdout)[k] for k in ("learned_bytes", "learned_share")} == \
        {k: doc[k] for k in ("learned_bytes", "learned_share")}
    text = runner.invoke(app, ["show", str(out)]).stdout
    line = f"learned parameters (codebooks, static scales): {learned_text(doc['learned_bytes'], doc['learned_share'])}"
    assert line in text and "% of the model's fp16 weights; a fixed cost per model" in text
