"""`rateq eval` end to end: defaults, policies, the fp row, matched budgets, flags and early errors.

Most tests run a tiny random Llama through the CLI: `rateq.load_model` is replaced by a loader returning it with
a byte-level tokenizer, and `--model` names a folder holding only its config.json, which is all rateq reads
before the weights load. The last two tests use the bundled real model (slow).
"""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import rateq
from cli.main import app, main
from rateq import CachePolicy, Curves, Plan, QuantSpec, RateQError

SHORT = ["--n-windows", "1", "--seq-len", "64"]
TINY_SHAPE = dict(head_dim=64)  # KIVI's groups of 32 and 64 channels fit a 64-dim head


class ByteTokenizer:
    """Each UTF-8 byte is a token: ids < 256, the tiny models' vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt", verbose=False):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)}


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture
def tiny_model(tiny, tmp_path, monkeypatch):
    """`--model` folder of a tiny Llama (config only), with `rateq.load_model` returning that model; the
    fixture's `loads` counts the loads."""
    model = tiny("llama", **TINY_SHAPE)
    folder = tmp_path / "tiny-llama"
    model.config.save_pretrained(folder)
    loads = []

    def load(name, **kw):
        loads.append(name)
        return model, ByteTokenizer()

    monkeypatch.setattr(rateq, "load_model", load)
    monkeypatch.setattr(rateq.models, "load_tokenizer", lambda name: ByteTokenizer())  # no tokenizer files
    return {"name": str(folder), "model": model, "loads": loads}


@pytest.fixture
def no_load(monkeypatch):
    """The model's weights must not load: the loader fails the test if called."""

    def load(*a, **kw):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr(rateq, "load_model", load)


def _profile(model, path, *, bits=(2, 2), group=64, budget=None, block=128, curves=False) -> Plan:
    """A uniform KxVy profile of `model` saved at `path` under key block `block`; with `curves`, synthetic
    curves kept beside it (P.curves.safetensors), as `rateq calibrate` leaves them."""
    fp = rateq.fingerprint(model)
    spec = QuantSpec(group_size=group)
    plan = Plan.uniform(fp, bits[0], bits[1], spec=spec, policy=CachePolicy(block=block))
    plan.budget_bits = plan.effective_bits if budget is None else budget
    rateq.save_profile(plan, path)
    if curves:
        L, H = fp.num_layers, fp.num_kv_heads
        widths = (1, 2, 3, 4, 5, 6, 8)
        alpha = torch.rand(L, H, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
        d = alpha * 4.0 ** (-torch.tensor(widths, dtype=torch.float64))
        Curves(d, widths, [spec], torch.full((L, H, 2), 1024.0), "mse", fp).save(
            path.with_name(path.name.replace(".safetensors", ".curves.safetensors")))
    return plan


def _json(runner, args):
    res = runner.invoke(app, ["eval", *args, "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    return json.loads(res.stdout)


def _main(monkeypatch, capsys, args):
    """Run the installed entry point; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rateq", "eval", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


# -- 1. the evaluation text starts where `rateq apply` and the README start ------------------------------------
def test_default_char_start_is_the_readmes(runner, tiny_model):
    doc = _json(runner, ["--model", tiny_model["name"], "--baseline", "K4V4:minmax-g64-fp16", *SHORT])
    assert doc["settings"]["char_start"] == 100_000
    assert inspect.signature(rateq.evaluate).parameters["char_start"].default == 100_000
    from cli.apply import apply_command

    assert inspect.signature(apply_command).parameters["char_start"].default == 100_000


# -- 2. a profile runs under its own policy unless the user overrides it ---------------------------------------
def test_profile_runs_under_its_own_policy(runner, tiny_model, tmp_path):
    path = tmp_path / "p.safetensors"
    _profile(tiny_model["model"], path, block=128)
    doc = _json(runner, ["--model", tiny_model["name"], "--profile", str(path), "--baseline", "kivi", *SHORT])
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["p"]["policy"] == {"residual": 0, "block": 128, "sinks": 0}
    assert rows["kivi@2.5"]["policy"] == {"residual": 0, "block": 64, "sinks": 0}  # 32 raised to its g64 keys
    assert rows["fp"]["policy"] is None

    over = _json(runner, ["--model", tiny_model["name"], "--profile", str(path), "--baseline", "kivi",
                          "--block", "256", "--residual", "16", *SHORT])
    rows = {r["name"]: r for r in over["rows"]}
    assert rows["p"]["policy"] == {"residual": 16, "block": 256, "sinks": 0}
    assert rows["kivi@2.5"]["policy"] == {"residual": 16, "block": 256, "sinks": 0}

    # The table says which policy each row ran under when they differ.
    res = runner.invoke(app, ["eval", "--model", tiny_model["name"], "--profile", str(path), "--baseline", "kivi",
                              *SHORT])
    assert res.exit_code == 0, res.output
    assert "| policy |" in res.stdout and "R 0, block 128, sinks 0" in res.stdout


def test_profile_row_equals_the_library_under_the_profiles_policy(runner, tiny_model, tmp_path):
    path = tmp_path / "p.safetensors"
    plan = _profile(tiny_model["model"], path, bits=(2, 2), group=16, block=64)
    # 96 tokens: a key block of 64 leaves the last 32 keys exact, one of 32 quantizes them all.
    doc = _json(runner, ["--model", tiny_model["name"], "--profile", str(path), "--baseline", "fp",
                         "--n-windows", "1", "--seq-len", "96", "--no-flips"])
    ids = rateq.text_windows(ByteTokenizer(), "austen-pp", 1, 96, seed=None, char_start=100_000)
    lib = rateq.evaluate(tiny_model["model"], ids, [plan], flips=False)  # no policy: the plan's own
    assert doc["rows"][1]["ppl"] == pytest.approx(lib.rows[1]["ppl"], rel=1e-6)
    under32 = rateq.evaluate(tiny_model["model"], ids, [plan], policy=CachePolicy(), flips=False)
    assert under32.rows[1]["ppl"] != pytest.approx(lib.rows[1]["ppl"], rel=1e-6)


# -- 3. full precision is always evaluated, once, first --------------------------------------------------------
@pytest.mark.parametrize("baselines", [["kivi"], ["fp", "kivi"], ["kivi", "fp"]])
def test_fp_row_always_first_with_baselines(runner, tiny_model, baselines):
    args = ["--model", tiny_model["name"], "-b", "2.5", *SHORT]
    for b in baselines:
        args += ["--baseline", b]
    doc = _json(runner, args)
    names = [r["name"] for r in doc["rows"]]
    assert names == ["fp", "kivi@2.5"]
    assert doc["rows"][1]["delta_ppl"] == pytest.approx(doc["rows"][1]["ppl"] - doc["rows"][0]["ppl"])
    res = runner.invoke(app, ["eval", *args])
    cells = next(line for line in res.stdout.splitlines() if line.startswith("| kivi@2.5 |")).split("|")
    delta, removed = cells[7].strip(), cells[11].strip()
    assert delta == f"{doc['rows'][1]['delta_ppl']:+.2f}"  # ΔPPL is printed: the fp row is there
    # KIVI excess removed is defined wherever KIVI is worse than full precision (0% for KIVI itself).
    assert removed == ("0%" if doc["rows"][1]["delta_ppl"] > 0 else "–")


# -- 4. only rows at a compared budget are called matched ------------------------------------------------------
def test_unmatched_rows_are_listed_apart(runner, tiny_model, tmp_path):
    path = tmp_path / "p.safetensors"
    _profile(tiny_model["model"], path)  # 2.5 effective bits
    args = ["--model", tiny_model["name"], "--profile", str(path), "--baseline", "kivi", "--baseline", "K3V2",
            *SHORT]
    doc = _json(runner, args)
    rows = {r["name"]: r for r in doc["rows"]}
    assert doc["settings"]["budgets"] == [2.5]
    assert rows["p"]["compared_at"] == 2.5 and rows["kivi@2.5"]["compared_at"] == 2.5
    assert rows["K3V2"]["effective_bits"] == pytest.approx(3.5) and rows["K3V2"]["compared_at"] is None
    table = runner.invoke(app, ["eval", *args]).stdout
    matched, _, apart = table.partition("Not matched")
    assert "| K3V2 |" not in matched and "| K3V2 |" in apart
    assert "| p |" in matched and "| kivi@2.5 |" in matched


def test_default_baselines_are_all_matched(runner, tiny_model, tmp_path):
    path = tmp_path / "p.safetensors"
    _profile(tiny_model["model"], path)
    doc = _json(runner, ["--model", tiny_model["name"], "--profile", str(path), "--calib", "austen-emma",
                         *SHORT, "--no-flips"])
    families = {r["family"] for r in doc["rows"]}
    assert {"fp", "rateq", "uniform", "split", "wnorm", "rank", "hybrid"} <= families
    assert all(r["compared_at"] == 2.5 for r in doc["rows"][1:]), [(r["name"], r["compared_at"]) for r in doc["rows"]]


# -- 5. -b is --budget, as in calibrate and solve --------------------------------------------------------------
def test_short_b_is_budget(runner, tiny_model):
    doc = _json(runner, ["--model", tiny_model["name"], "-b", "2.5", "-b", "3", "--baseline", "kivi", *SHORT])
    assert [r["name"] for r in doc["rows"]] == ["fp", "kivi@2.5", "kivi@3"]
    assert doc["settings"]["budgets"] == [2.5, 3.0]
    loads = len(tiny_model["loads"])
    bad = runner.invoke(app, ["eval", "--model", tiny_model["name"], "-b", "kivi", *SHORT])
    assert bad.exit_code == 2 and len(tiny_model["loads"]) == loads  # not a number: a usage error


# -- 6. bad input is refused before the weights load -----------------------------------------------------------
def _bad_inputs(tiny, tmp_path):
    other = tiny("llama", num_hidden_layers=2, **TINY_SHAPE)  # a profile for a model of another shape
    foreign = tmp_path / "foreign.safetensors"
    _profile(other, foreign, curves=True)
    return {
        "unknown baseline": (["--baseline", "kivvi"], "unknown baseline"),
        "unknown baseline with a budget": (["--baseline", "nonsense@2.5"], "unknown baseline"),
        "bad NAME@BITS": (["--baseline", "kivi@two"], "NAME@BITS"),
        "budgeted name without a budget": (["--baseline", "kivi"], "--budget"),
        "fixed storage with @BITS": (["--baseline", "K3V2@2.5"], "no @BITS"),
        "missing profile": (["--profile", str(tmp_path / "missing.safetensors")], "does not exist"),
        "missing profile as a baseline": (["--baseline", str(tmp_path / "missing.safetensors")], "does not exist"),
        "profile for another model": (["--profile", str(foreign)], "num_layers 2 vs 3"),
        "nan budget": (["-b", "nan", "--baseline", "kivi"], "--budget"),
        "inf budget": (["-b", "inf", "--baseline", "kivi"], "--budget"),
        "zero budget": (["-b", "0", "--baseline", "kivi"], "--budget"),
        "negative budget": (["--budget", "-1", "--baseline", "kivi"], "--budget"),
        "nan budget in a name": (["--baseline", "kivi@nan"], "kivi@nan"),
        "budget no kivi matches": (["-b", "0.5", "--baseline", "kivi"], "no uniform quantizer fits"),
        "budget no split matches": (["-b", "2.7", "--baseline", "splits"], "no fixed K/V split"),
        "missing data file": (["--data", str(tmp_path / "missing.txt"), "--baseline", "K4V4"], "does not exist"),
        "unknown data": (["--data", "nosuchtext", "--baseline", "K4V4"], "unknown text"),
        "text shorter than --char-start": (["--data", str(tmp_path / "short.txt"), "--baseline", "K4V4"],
                                          "--char-start"),
        "missing curves": (["--baseline", "waterfill@2.5", "--curves", str(tmp_path / "none.safetensors")],
                           "does not exist"),
        "missing calibration text": (["-b", "2.5", "--baseline", "rank", "--calib", str(tmp_path / "none.txt")],
                                     "does not exist"),
        "curves for another model": (["--baseline", "waterfill@2.5", "--curves",
                                      str(tmp_path / "foreign.curves.safetensors")], "num_layers 2 vs 3"),
        "report folder is a file": (["--baseline", "K4V4", "--report", str(tmp_path / "short.txt")], "is a file"),
        "negative residual": (["--baseline", "K4V4", "--residual", "-1"], "residual"),
        "zero windows": (["--baseline", "K4V4", "--n-windows", "0"], "--n-windows"),
    }


BAD_CASES = ["unknown baseline", "unknown baseline with a budget", "bad NAME@BITS", "budgeted name without a budget",
             "fixed storage with @BITS", "missing profile", "missing profile as a baseline",
             "profile for another model", "nan budget", "inf budget", "zero budget", "negative budget",
             "nan budget in a name", "budget no kivi matches", "budget no split matches", "missing data file",
             "unknown data", "text shorter than --char-start", "missing curves", "missing calibration text",
             "curves for another model", "report folder is a file",
             "negative residual", "zero windows"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_before_the_model_loads(monkeypatch, capsys, tiny, tmp_path, no_load, case):
    folder = tmp_path / "tiny-llama"
    tiny("llama", **TINY_SHAPE).config.save_pretrained(folder)
    (tmp_path / "short.txt").write_text("A short text.\n")
    cases = _bad_inputs(tiny, tmp_path)
    assert set(cases) == set(BAD_CASES)
    args, needle = cases[case]
    code, err = _main(monkeypatch, capsys, ["--model", str(folder), *SHORT, *args])
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and needle in err, err


def test_profile_for_another_model_is_refused_before_the_load(monkeypatch, capsys, tiny, tiny_model, tmp_path):
    """The model's config is read without its weights: a profile of another shape never gets to the load."""
    other = tiny("llama", num_hidden_layers=2, **TINY_SHAPE)
    path = tmp_path / "foreign.safetensors"
    _profile(other, path)
    code, err = _main(monkeypatch, capsys, ["--model", tiny_model["name"], "--profile", str(path), *SHORT])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "num_layers 2 vs 3" in err
    assert tiny_model["loads"] == []


def test_too_little_text_is_one_line_before_evaluation(monkeypatch, capsys, tiny_model, tmp_path):
    """Counting tokens needs only the tokenizer: checked before the weights load."""
    (tmp_path / "little.txt").write_text("Only a few words here.\n")

    def evaluate(*a, **kw):
        raise AssertionError("evaluation started on too little text")

    monkeypatch.setattr(rateq, "evaluate", evaluate)
    code, err = _main(monkeypatch, capsys, ["--model", tiny_model["name"], "--data", str(tmp_path / "little.txt"),
                                            "--char-start", "0", "--baseline", "K4V4", *SHORT])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "not enough text" in err
    assert tiny_model["loads"] == []


# -- 7. the README's table from one eval command ---------------------------------------------------------------
def test_readme_table_from_one_command(runner, tiny_model, tmp_path):
    """Profiles at 2.5, 3.0 and 2.0 bits, waterfilling on the curves kept beside the first, KIVI, a fixed
    split matched at 3.0 and two at other storage: full precision first, each budget's matched rows with KIVI
    excess removed, the rest apart as not matched."""
    m = tiny_model["model"]
    p25, p3, p2 = tmp_path / "p-2.5.safetensors", tmp_path / "p-3.safetensors", tmp_path / "p-2.safetensors"
    _profile(m, p25, bits=(2, 2), group=64, curves=True)  # 2.5
    _profile(m, p3, bits=(2, 2), group=32, block=32)  # 3.0
    _profile(m, p2, bits=(1, 2), group=64)  # 2.0
    out = tmp_path / "report"
    args = ["--model", tiny_model["name"], "-p", str(p25), "-p", str(p3), "-p", str(p2), "-b", "2.5", "-b", "3",
            "--baseline", "kivi", "--baseline", "waterfill", "--baseline", "rot-hadamard@2.5",
            "--baseline", "K3V2:minmax-g64-fp16", "--baseline", "K3V2", "--report", str(out), *SHORT]
    res = runner.invoke(app, ["eval", *args])
    assert res.exit_code == 0, (res.output, res.exception)
    md = (out / "report.md").read_text()
    doc = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert doc["rows"][0]["name"] == "fp"
    assert {n: rows[n]["compared_at"] for n in rows if n != "fp"} == {
        "p-2.5": 2.5, "p-3": 3.0, "p-2": None, "kivi@2.5": 2.5, "kivi@3": 3.0, "waterfill@2.5": 2.5,
        "waterfill@3": 3.0, "rot-hadamard@2.5": 2.5, "K3V2:minmax-g64-fp16": 3.0, "K3V2": None}
    fp = rows["fp"]["ppl"]
    worse = {rows[f"kivi@{b}"]["compared_at"] for b in ("2.5", "3") if rows[f"kivi@{b}"]["ppl"] > fp}
    assert set(doc["kivi_excess_removed"]) == {n for n, r in rows.items() if r["compared_at"] in worse}
    assert doc["settings"]["curves"].endswith("p-2.5.curves.safetensors")
    matched, _, apart = md.partition("Not matched")
    assert "| p-2 |" in apart and "| K3V2 |" in apart and "| p-2.5 |" in matched
    first = [line.split("|")[1].strip() for line in matched.splitlines() if line.startswith("| ")][2:]
    assert first == ["fp", "p-2.5", "kivi@2.5", "waterfill@2.5", "rot-hadamard@2.5", "p-3", "kivi@3",
                     "waterfill@3", "K3V2:minmax-g64-fp16"]


# -- the bundled model (slow) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_json_and_report(runner, tmp_path, smol, png_size):
    out = tmp_path / "report"
    res = runner.invoke(app, ["eval", "--data", "austen-pp", "--baseline", "fp", "--baseline", "kivi",
                              "--baseline", "k4v2", "--budget", "2.5", "--json", "--report", str(out), *SHORT])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"fp", "kivi@2.5", "k4v2"}
    assert rows["kivi@2.5"]["effective_bits"] == pytest.approx(2.5)
    assert rows["kivi@2.5"]["nominal_bits"] == pytest.approx(2.0)
    assert rows["k4v2"]["effective_bits"] == pytest.approx(4.0) and rows["k4v2"]["compared_at"] is None
    assert rows["fp"]["kl"] == 0.0 and rows["kivi@2.5"]["kl"] > 0
    # Baselines only (no plan, no curves): the table, the JSON and the PPL plot.
    assert sorted(p.name for p in out.iterdir()) == ["ppl_vs_bits.png", "report.md", "results.json"]
    assert png_size(out / "ppl_vs_bits.png") == (840, 540)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == doc["rows"] and saved["settings"] == doc["settings"]
    lines = {line.split("|")[1].strip(): line for line in (out / "report.md").read_text().splitlines()
             if line.startswith("| ")}
    for r in doc["rows"]:  # each row's figures in the report are the JSON's
        cells = [c.strip() for c in lines[r["name"]].strip("|").split("|")]
        assert f"{r['effective_bits']:.3f}" in cells and f"{r['ppl']:.2f}" in cells, (r["name"], cells)


@pytest.mark.slow
def test_eval_table_and_user_errors(runner, smol):
    res = runner.invoke(app, ["eval", "--baseline", "fp", "--baseline", "K2V2", *SHORT])
    assert res.exit_code == 0, res.output
    assert "| K2V2 |" in res.stdout and "effective bits" in res.stdout
    bad = runner.invoke(app, ["eval", "--baseline", "kivi", *SHORT])  # no budget anywhere
    assert bad.exit_code != 0
    assert isinstance(bad.exception, RateQError) and "--budget" in str(bad.exception)
