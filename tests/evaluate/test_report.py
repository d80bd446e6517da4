"""Reports: markdown table, JSON and PNG files, KIVI excess removed."""

from __future__ import annotations

import json

import pytest
import torch

import rateq
from rateq import Curves, Plan, QuantSpec
from rateq.evaluate import Method, evaluate, to_markdown, write_report
from rateq.evaluate.report import kivi_excess_removed


def test_kivi_excess_removed():
    rows = [
        {"name": "fp", "family": "fp", "effective_bits": 16.0, "ppl": 20.0},
        {"name": "kivi@2.5", "family": "uniform", "effective_bits": 2.5, "ppl": 40.0},
        {"name": "rateq@2.5", "family": "rateq", "effective_bits": 2.5, "ppl": 25.0},
        {"name": "K4V4", "family": "uniform", "effective_bits": 5.0, "ppl": 21.0},
    ]
    removed = kivi_excess_removed(rows)
    assert removed["rateq@2.5"] == pytest.approx(0.75)
    assert removed["kivi@2.5"] == pytest.approx(0.0)
    assert "K4V4" not in removed  # no KIVI row at 5 bits to compare with


def test_write_report(tiny, tmp_path):
    model = tiny("llama")
    fp = rateq.fingerprint(model)
    spec = QuantSpec(group_size=8)
    mixed = Plan(torch.tensor([[2, 4], [3, 3], [4, 2]]), torch.full((3, 2), 2), torch.zeros(3, 2, dtype=torch.long),
                 torch.zeros(3, 2, dtype=torch.long), [spec], fp)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, ids, ["fp", Method.from_plan(mixed, "mine", family="rateq"),
                                Method.from_plan(Plan.uniform(fp, 2, spec=spec), "u2", family="uniform")])
    bits = (1, 2, 4)
    curves = Curves(torch.rand(3, 2, 2, 1, 3, dtype=torch.float64) * torch.tensor([1.0, 0.3, 0.05]), bits, [spec],
                    torch.ones(3, 2, 2), "mse", fp)
    paths = write_report(res, tmp_path, curves=curves, title="tiny")
    for key in ("markdown", "json", "ppl_vs_bits", "curves", "bits_mine"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert paths["ppl_vs_bits"].read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(paths["json"].read_text())
    assert [r["name"] for r in doc["rows"]] == ["fp", "mine", "u2"]
    md = paths["markdown"].read_text()
    assert "| mine |" in md and "effective bits" in md and "bits_mine.png" in md
    table = to_markdown(res)
    assert table.count("\n") == 2 + 3  # header, rule, three rows
    assert f"{mixed.effective_bits:.3f}" in table
