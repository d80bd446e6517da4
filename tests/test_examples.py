"""The scripts under examples/ run end to end at tiny settings (each a subprocess, as a user runs it).

The model is a tiny random Llama saved with `save_pretrained` next to the bundled smollm2-135m tokenizer, so
`--model FOLDER` is exercised too; resolve_and_export.py also runs on its defaults (the shipped curves).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rateq

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Candidates that fit a 64-dim head and 64-token windows: plain KIVI g32 and pre-RoPE keys over 64 tokens.
SMALL = ["--n-samples", "1", "--seq-len", "64", "--quantizers", "minmax-g32-fp16,minmax-g64-fp16-prerope",
         "--bits", "2,3,4"]


def run_example(name: str, *args, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    """A tiny random Llama (head_dim 64, the default candidates' width) with smollm2-135m's tokenizer."""
    from rateq.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny("llama", kv_heads=2, num_attention_heads=2, head_dim=64, vocab_size=len(tok),
                 max_position_embeddings=2048)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calibrated(tiny_folder, tmp_path_factory):
    """Run calibrate_and_generate.py once: the profile and curves it writes feed the other examples."""
    work = tmp_path_factory.mktemp("examples")
    out = run_example("calibrate_and_generate.py", "--model", tiny_folder, *SMALL, "--budget", "3.0",
                      "--out", "out/tiny-3.0.safetensors", "--context-chars", "400", "--max-new-tokens", "4", cwd=work)
    return work, out


def test_calibrate_and_generate(calibrated):
    work, out = calibrated
    assert "3.000 effective bits" in out
    profile, curves = work / "out" / "tiny-3.0.safetensors", work / "out" / "tiny-3.0.curves.safetensors"
    assert rateq.load_profile(profile).effective_bits == pytest.approx(3.0)
    assert rateq.Curves.load(curves).bits == (2, 3, 4)
    line = next(l for l in out.splitlines() if l.startswith("cache:"))
    held = int(re.search(r"(\d+) bytes held", line).group(1))
    fp16 = int(re.search(r"(\d+) bytes as float16", line).group(1))
    assert 0 < held < fp16  # the context fills whole key blocks: packed below fp16


def test_compare_baselines(tiny_folder, calibrated):
    work, _ = calibrated
    out = run_example("compare_baselines.py", "--model", tiny_folder, "--profile", work / "out" / "tiny-3.0.safetensors",
                      "--baselines", "fp,kivi", "--windows", "1", "--seq-len", "64", "--n-samples", "1", cwd=work)
    rows = [l for l in out.splitlines() if l.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[2:]]
    assert names[0] == "fp" and "kivi@3" in names and any(n.startswith("plan") for n in names), out


def test_resolve_and_export_stored_curves(calibrated):
    work, _ = calibrated
    out = run_example("resolve_and_export.py", "--curves", work / "out" / "tiny-3.0.curves.safetensors",
                      "--budgets", "2", "3", "4", "--export", "3.5", "--out", "plan.json", "--profile", "p.safetensors",
                      cwd=work)
    assert "infeasible" in out  # 2 bits: below the cheapest candidate (2-bit g64: 2.5 bits)
    doc = json.loads((work / "plan.json").read_text())
    assert doc["effective_bits"] == pytest.approx(3.5)
    assert rateq.plan_from_json(doc).effective_bits == pytest.approx(rateq.load_profile(work / "p.safetensors").effective_bits)


def test_resolve_and_export_defaults(tmp_path):
    out = run_example("resolve_and_export.py", "--out", "-", cwd=tmp_path)  # the shipped smollm2-135m curves
    assert "smollm2-135m" in out and "exported: smollm2-135m: 2.500 effective bits" in out
    assert json.loads(out[out.index("{"):])["model"]["name"] == "smollm2-135m"
