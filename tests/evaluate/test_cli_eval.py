"""`rateq eval` end to end on the bundled model with a few tokens: table, --json, --report, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from rateq import RateQError

pytestmark = pytest.mark.slow
SHORT = ["--n-windows", "1", "--seq-len", "64", "--char-start", "100000"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_eval_json_and_report(runner, tmp_path, smol):
    out = tmp_path / "report"
    res = runner.invoke(app, ["eval", "--data", "austen-pp", "--baseline", "fp", "--baseline", "kivi",
                              "--baseline", "k4v2", "--budget", "2.5", "--json", "--report", str(out), *SHORT])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"fp", "kivi@2.5", "k4v2"}
    assert rows["kivi@2.5"]["effective_bits"] == pytest.approx(2.5)
    assert rows["kivi@2.5"]["nominal_bits"] == pytest.approx(2.0)
    assert rows["k4v2"]["effective_bits"] == pytest.approx(4.0)
    assert rows["fp"]["kl"] == 0.0 and rows["kivi@2.5"]["kl"] > 0
    for name in ("report.md", "results.json", "ppl_vs_bits.png"):
        assert (out / name).stat().st_size > 0
    assert "| kivi@2.5 |" in (out / "report.md").read_text()


def test_eval_table_and_user_errors(runner, smol):
    res = runner.invoke(app, ["eval", "--baseline", "fp", "--baseline", "K2V2", *SHORT])
    assert res.exit_code == 0, res.output
    assert "| K2V2 |" in res.stdout and "effective bits" in res.stdout
    bad = runner.invoke(app, ["eval", "--baseline", "kivi", *SHORT])  # no budget anywhere
    assert bad.exit_code != 0
    assert isinstance(bad.exception, RateQError) and "--budget" in str(bad.exception)
