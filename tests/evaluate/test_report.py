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


def _table_rows(md: str) -> list[dict[str, str]]:
    """The first markdown table of `md` as one dict per row, keyed by the header's cells."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head, body = cells[0], cells[2:]
    assert all(len(row) == len(head) for row in body)
    return [dict(zip(head, row)) for row in body]


def test_write_report(tiny, tmp_path, png_size):
    from rateq.plots import DPI

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
    # One bit map per solved or hand-made plan (not for the uniform baseline), and nothing else written.
    assert set(paths) == {"markdown", "json", "ppl_vs_bits", "curves", "bits_mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values()) == [
        "bits_mine.png", "curves.png", "ppl_vs_bits.png", "report.md", "results.json"]
    assert png_size(paths["ppl_vs_bits"]) == (7 * DPI, int(4.5 * DPI))
    assert png_size(paths["curves"]) == (6 * DPI, 4 * DPI)
    assert png_size(paths["bits_mine"]) == (7 * DPI, 3 * DPI)  # 3 layers × 2 heads: the bit map's least size

    # The JSON holds the evaluation's rows and settings as they are; no KIVI row, so nothing to remove.
    doc = json.loads(paths["json"].read_text())
    assert doc["rows"] == json.loads(json.dumps(res.rows, default=str))
    assert doc["settings"] == json.loads(json.dumps(res.settings, default=str))
    assert doc["kivi_excess_removed"] == {}
    assert [r["name"] for r in doc["rows"]] == ["fp", "mine", "u2"]
    # The report's table shows each JSON row's figures, in the same order.
    md = paths["markdown"].read_text()
    assert md.startswith("# tiny\n")
    table = _table_rows(md)
    assert [t["method"] for t in table] == ["fp", "mine", "u2"]
    for t, r in zip(table, doc["rows"]):
        assert t["effective bits"] == f"{r['effective_bits']:.3f}" and t["nominal bits"] == f"{r['nominal_bits']:.3f}"
        assert t["PPL"] == f"{r['ppl']:.2f}" and t["KL (nats)"] == f"{r['kl']:.4f}"
    assert table[1]["effective bits"] == f"{mixed.effective_bits:.3f}"
    assert table[0]["ΔPPL"] == "+0.00" and table[2]["ΔPPL"] == f"{doc['rows'][2]['delta_ppl']:+.2f}"
    # Every plot written is shown in the report, each once.
    for p in ("ppl_vs_bits.png", "bits_mine.png", "curves.png"):
        assert md.count(f"]({p})") == 1, p
    assert to_markdown(res).count("\n") == 2 + 3  # header, rule, three rows


def _row(name, family, eff, ppl, *, at, budget=None, policy=None):
    return {"name": name, "label": name, "family": family, "budget": budget, "nominal_bits": eff,
            "effective_bits": eff, "ppl": ppl, "delta_ppl": ppl - 20.0, "kl": 0.1, "flip_rate": None,
            "key_flip_rate": 0.1, "compared_at": at,
            "policy": policy if family != "fp" else None}


R32 = {"residual": 0, "block": 32, "sinks": 0}
R128 = {"residual": 0, "block": 128, "sinks": 0}


def test_kivi_excess_removed_follows_the_compared_budget():
    """A row built for 2.5 bits that stores 2.496 is compared with KIVI at 2.5; one at 3.5 bits is not."""
    rows = [_row("fp", "fp", 16.0, 20.0, at=None),
            _row("kivi@2.5", "uniform", 2.5, 40.0, at=2.5, budget=2.5, policy=R32),
            _row("waterfill@2.5", "waterfill", 2.496, 25.0, at=2.5, budget=2.5, policy=R128),
            _row("K3V2", "split", 3.5, 22.0, at=None, policy=R32)]
    removed = kivi_excess_removed(rows)
    assert removed == {"kivi@2.5": pytest.approx(0.0), "waterfill@2.5": pytest.approx(0.75)}


def test_markdown_lists_unmatched_rows_apart():
    rows = [_row("fp", "fp", 16.0, 20.0, at=None),
            _row("p3", "rateq", 3.0, 22.0, at=3.0, budget=3.0, policy=R128),
            _row("p2.5", "rateq", 2.5, 25.0, at=2.5, budget=2.5, policy=R128),
            _row("kivi@2.5", "uniform", 2.5, 40.0, at=2.5, budget=2.5, policy=R32),
            _row("K3V2", "split", 3.5, 22.0, at=None, policy=R32),
            _row("p2", "rateq", 2.0, 30.0, at=None, budget=2.0, policy=R128)]
    md = to_markdown(rows)
    matched, sep, apart = md.partition("Not matched")
    assert sep and "(2.5, 3 effective bits)" in apart
    names = [line.split("|")[1].strip() for line in matched.splitlines() if line.startswith("| ")][2:]
    assert names == ["fp", "p2.5", "kivi@2.5", "p3"]  # fp first, then each budget's rows in input order
    assert [line.split("|")[1].strip() for line in apart.splitlines() if line.startswith("| ")][2:] == ["K3V2", "p2"]
    header = matched.splitlines()[0]
    assert "matched at" in header and "KIVI excess removed" in header and "policy" in header
    assert "KIVI excess removed" not in apart and "matched at" not in apart
    assert "| p2.5 | p2.5 | 2.5 |" in matched and "| 75% | R 0, block 128, sinks 0 |" in matched
    assert matched.splitlines()[2].split("|")[3].strip() == "–"  # fp is the reference, at no budget
    # One policy for every row: no policy column.
    same = [dict(r, policy=R32 if r["family"] != "fp" else None) for r in rows]
    assert "policy" not in to_markdown(same).splitlines()[0]


def test_rows_report_learned_bytes_and_their_share_of_the_models_fp16_weights(tiny):
    from rateq import parse_spec
    from rateq.evaluate.task_report import summary_table
    from rateq.plan import learned_text
    from rateq.quant.params import param_key

    model = tiny("llama")  # 3 layers, 2 KV heads of 16 channels
    fp = rateq.fingerprint(model)
    spec = parse_spec("codebook-g2")
    books = torch.randn(3, 2, 2, 8, 16, 2, generator=torch.Generator().manual_seed(0))
    plan = Plan.uniform(fp, 2, spec=spec, params={param_key(spec, 2): books})
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, ids, ["fp", Method.from_plan(plan, "books"),
                                Method.from_plan(Plan.uniform(fp, 2, spec=QuantSpec(group_size=8)), "u2")], flips=False)
    n = sum(p.numel() for p in model.parameters())
    row = json.loads(json.dumps(res.to_dict()))["rows"][1]
    assert row["learned_bytes"] == plan.learned_nbytes() == 6144 and row["fp16_weight_bytes"] == 2 * n
    assert row["learned_share"] == pytest.approx(6144 / (2 * n))
    assert res["fp"]["learned_bytes"] == res["u2"]["learned_bytes"] == 0
    cell = learned_text(6144, row["learned_share"], short=True)
    assert cell == f"6.0 KiB ({100 * 6144 / (2 * n):.2f}%)"
    table = _table_rows(to_markdown(res))
    assert [t["learned"] for t in table] == ["–", cell, "–"]
    assert list(table[0])[:5] == ["method", "what", "nominal bits", "effective bits", "learned"]
    tasks = _table_rows(summary_table(list(res)))
    assert [t["learned"] for t in tasks] == ["–", cell, "–"]
    # rows without learned parameters keep their tables as they were
    plain = [r for r in res if r["name"] != "books"]
    assert "learned" not in _table_rows(to_markdown(plain))[0] and "learned" not in _table_rows(summary_table(plain))[0]
