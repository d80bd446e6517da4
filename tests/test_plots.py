"""Plots: drawn without pyplot or a global backend switch, written as valid images whose size follows the plan,
with the facts each figure promises in its titles and labels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import matplotlib
import pytest
import torch

import rateq
from rateq import Curves, ModelFingerprint, Plan, QuantSpec
from rateq.plots import DPI, plot_curves, plot_plan, plot_ppl_vs_bits

A, B = QuantSpec(group_size=8), QuantSpec(group_size=16)

# In a fresh interpreter with a backend chosen by the environment: import rateq, plot everything, write a
# report, and say what matplotlib's global state is before and after.
SCRIPT = """
import json, sys, tempfile
from pathlib import Path

import matplotlib
import torch

import rateq
from rateq import Curves, ModelFingerprint, Plan, QuantSpec
from rateq.evaluate import Method, write_report
from rateq.evaluate.core import Evaluation
from rateq.plots import plot_curves, plot_plan, plot_ppl_vs_bits

state = lambda: {"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules}
before = state()
fp = ModelFingerprint("tiny", "llama", 3, 2, 16)
spec = QuantSpec(group_size=8)
plan = Plan(torch.tensor([[2, 4], [3, 3], [4, 2]]), torch.full((3, 2), 2), torch.zeros(3, 2, dtype=torch.long),
            torch.zeros(3, 2, dtype=torch.long), [spec], fp)
curves = Curves(torch.rand(3, 2, 2, 1, 3, dtype=torch.float64) + 0.1, (1, 2, 4), [spec], torch.ones(3, 2, 2), "mse", fp)
rows = [{"name": "fp", "family": "fp", "effective_bits": 16.0, "nominal_bits": 16.0, "ppl": 20.0},
        {"name": "mine", "family": "rateq", "effective_bits": plan.effective_bits,
         "nominal_bits": plan.nominal_bits, "ppl": 25.0}]
out = Path(tempfile.mkdtemp())
plot_plan(plan, out / "plan.png")
plot_ppl_vs_bits(rows, out / "ppl.png")
plot_curves(curves, out / "curves.png")
write_report(Evaluation(rows, {}, [Method.from_plan(plan, "mine", family="rateq")]), out / "report", curves=curves)
print(json.dumps({"before": before, "after": state(), "files": sorted(p.name for p in (out / "report").iterdir())}))
"""


def test_plotting_never_imports_pyplot_nor_switches_the_backend():
    backend = "pdf"  # not Agg, so that a switch to Agg would show
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": backend, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["before"] == {"backend": backend, "pyplot": False}
    assert got["after"] == {"backend": backend, "pyplot": False}
    assert got["files"] == ["bits_mine.png", "curves.png", "ppl_vs_bits.png", "report.md", "results.json"]


def _plan(L: int, H: int = 2, *, budget: float | None = None) -> Plan:
    g = torch.Generator().manual_seed(L * 100 + H)
    fp = ModelFingerprint("tiny-m", "llama", L, H, 16)
    return Plan(torch.randint(2, 5, (L, H), generator=g), torch.randint(1, 4, (L, H), generator=g),
                torch.randint(0, 2, (L, H), generator=g), torch.zeros(L, H, dtype=torch.long), [A, B], fp,
                budget_bits=budget)


def _bit_map_pixels(L: int, H: int) -> tuple[int, int]:
    """The bit map's size: its figure size in inches (grows with heads and layers) at the plots' DPI."""
    return int(max(7.0, 2.0 + 0.9 * H) * DPI), int(max(3.0, 1.4 + 0.22 * L) * DPI)


def test_bit_maps_are_valid_pngs_that_grow_with_the_plan(tmp_path, png_size):
    sizes = {}
    for L, H in ((4, 2), (12, 2), (24, 2), (24, 12)):
        path = plot_plan(_plan(L, H), tmp_path / f"map-{L}-{H}.png")
        assert path == tmp_path / f"map-{L}-{H}.png"
        sizes[L, H] = png_size(path)
        assert sizes[L, H] == _bit_map_pixels(L, H)
    assert sizes[4, 2][1] < sizes[12, 2][1] < sizes[24, 2][1]  # one row per layer: taller with more layers
    assert sizes[4, 2][0] == sizes[24, 2][0] < sizes[24, 12][0]  # wider with more heads
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"map-{L}-{H}.png" for L, H in sizes)


def _svg_texts(draw) -> list[str]:
    """The texts of a figure drawn as SVG with text kept as text."""
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        path = draw()
    return [re.sub(r"\s+", " ", t).strip() for t in re.findall(r"<text[^>]*>(.*?)</text>", path.read_text(), re.S)]


def test_the_bit_map_names_its_bits_quantizers_and_budget(tmp_path):
    plan = _plan(3, 2, budget=3.5)
    texts = _svg_texts(lambda: plot_plan(plan, tmp_path / "map.svg", title="mine"))
    for role in ("k", "v"):
        assert f"{role.upper()}: mean {plan.mean_bits(role):.2f} bits" in texts
        ids = plan.quantizer_ids(role).flatten().tolist()
        for q in set(ids):
            assert f"{plan.quantizers[q].id} ×{ids.count(q)}" in texts  # the quantizer mix, one line each
    assert f"mine: budget 3.5, {plan.effective_bits:.3f} effective bits ({plan.nominal_bits:.3f} nominal)" in texts
    # A small map prints every cell's bits (besides the tick labels).
    cells = Counter(map(str, plan.k_bits.flatten().tolist() + plan.v_bits.flatten().tolist()))
    assert not cells - Counter(t for t in texts if t.isdigit())
    # Without a title: the model's name; without a budget: no budget.
    texts = _svg_texts(lambda: plot_plan(_plan(3, 2), tmp_path / "plain.svg"))
    assert any(t.startswith("tiny-m: ") and "budget" not in t and t.endswith(" nominal)") for t in texts)
    # A large map prints no cell numbers: only tick labels are digits.
    big = _svg_texts(lambda: plot_plan(_plan(80, 2), tmp_path / "big.svg"))
    assert len([t for t in big if t.isdigit()]) < 40 < 80 * 2


def test_ppl_and_curve_plots(tmp_path, png_size):
    rows = [{"name": "fp", "family": "fp", "effective_bits": 16.0, "ppl": 20.0},
            {"name": "kivi@2.5", "family": "uniform", "effective_bits": 2.5, "ppl": 40.0},
            {"name": "kivi@3", "family": "uniform", "effective_bits": 3.0, "ppl": 30.0},
            {"name": "rot-hadamard@3", "family": "rotation", "effective_bits": 3.0, "ppl": 28.0},
            {"name": "mine", "family": "rateq", "effective_bits": 2.5, "ppl": 25.0}]
    assert png_size(plot_ppl_vs_bits(rows, tmp_path / "ppl.png", title="t")) == (7 * DPI, int(4.5 * DPI))
    texts = _svg_texts(lambda: plot_ppl_vs_bits(rows, tmp_path / "ppl.svg", title="a title"))
    assert {"a title", "perplexity", "full precision (20.00)", "uniform", "rateq", "rot-hadamard"} <= set(texts)
    assert texts.index("rateq") < texts.index("uniform") < texts.index("rot-hadamard")  # legend in family order

    fp = ModelFingerprint("tiny-m", "llama", 3, 2, 16)
    d = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64).expand(3, 2, 2, 2, 3).clone()
    d[1, 0, 0] *= 10  # the most sensitive key head: layer 1, head 0
    curves = Curves(d, (1, 2, 4), [A, B], torch.ones(3, 2, 2), "mse", fp)
    assert png_size(plot_curves(curves, tmp_path / "curves.png")) == (6 * DPI, 4 * DPI)
    texts = _svg_texts(lambda: plot_curves(curves, tmp_path / "curves.svg", units=[(1, 0, 0), (2, 1, 1)]))
    assert {f"L1 H0 K {A.id}", f"L1 H0 K {B.id}", f"L2 H1 V {A.id}", f"L2 H1 V {B.id}", "distortion (mse)"} <= set(texts)
    texts = _svg_texts(lambda: plot_curves(curves, tmp_path / "auto.svg"))
    assert f"L1 H0 K {A.id}" in texts  # by default the most sensitive heads are among those drawn


@pytest.mark.parametrize("draw", ["plan", "ppl", "curves"])
def test_an_unknown_suffix_or_an_unwritable_path_is_one_error_leaving_nothing(tmp_path, draw):
    fp = ModelFingerprint("tiny-m", "llama", 3, 2, 16)
    make = {"plan": lambda p: plot_plan(_plan(3), p),
            "ppl": lambda p: plot_ppl_vs_bits([{"name": "fp", "family": "fp", "effective_bits": 16.0, "ppl": 2.0}], p),
            "curves": lambda p: plot_curves(Curves(torch.rand(3, 2, 2, 1, 2, dtype=torch.float64) + 0.1, (1, 2), [A],
                                                   torch.ones(3, 2, 2), "mse", fp), p)}[draw]
    with pytest.raises(rateq.RateQError, match=r"cannot write a \.nosuchformat image; use one of .*\.png") as exc:
        make(tmp_path / "x.nosuchformat")
    assert "\n" not in str(exc.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(rateq.RateQError, match="cannot write image"):
        make(tmp_path / "file" / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no temporary file left behind


def test_retrieval_heatmap_prints_every_cell_and_marks_lost_ones(tmp_path, png_size):
    from rateq.plots import plot_passkey_heatmap

    cell = lambda c, d, a: {"context": c, "depth": d, "accuracy": a}  # noqa: E731
    ref = [cell(c, d, 1.0 if (c, d) != (2048, 1.0) else 0.0) for c in (1024, 2048) for d in (0.0, 0.5, 1.0)]
    ours = [cell(c, d, 0.5 if (c, d) == (1024, 0.5) else r["accuracy"]) for r in ref for c, d in [(r["context"], r["depth"])]]
    w, h = png_size(plot_passkey_heatmap(ours, tmp_path / "map.png", title="mine", reference=ref))
    assert w > h > 0
    texts = _svg_texts(lambda: plot_passkey_heatmap(ours, tmp_path / "map.svg", title="mine", reference=ref))
    assert "mine: accuracy 75%" in texts and {"1,024", "2,048", "0%", "50%", "100%"} <= set(texts)
    assert "0.5 ×" in texts and "0 ·" in texts and texts.count("1") == 4  # lost, missed by both, kept
    with pytest.raises(rateq.RateQError, match="no cells"):
        plot_passkey_heatmap([], tmp_path / "none.png")
