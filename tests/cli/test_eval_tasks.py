"""`rateq eval --task …`: bad input is one line with exit code 2 before any weights load, and a run prints the
JSON document and writes the report.

Bad-input cases read only the bundled model's config and tokenizer. The run swaps `rateq.load_model` for a tiny
random Llama over the bundled tokenizer's vocabulary (the config `--model` names is the real one's, which is
all that is read before the weights)."""

from __future__ import annotations

import json

import pytest

import rateq
from rateq.models import load_tokenizer


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder; the model's weights must not load; the hub is offline."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rateq, "load_model", lambda *a, **k: pytest.fail("weights loaded before the input was checked"))
    return folder


def refused(result, phrase: str, folder) -> None:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], lines[0]
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("args, phrase", [
    (["--task", "ruler"], "unknown task 'ruler'; use passkey, needle, agreement, decode-ppl"),
    (["--task", "passkey,needle", "--task", "sudoku"], "unknown task 'sudoku'"),
    (["--task", "passkey", "--depths", "0,0.5,1.5"], "--depths: a depth must be between 0 and 1, got 1.5"),
    (["--task", "needle", "--depths", "-0.25"], "between 0 and 1"),
    (["--task", "passkey", "--depths", "half"], "--depths wants comma-separated numbers"),
    (["--task", "passkey", "--contexts", "1k,2k"], "--contexts wants comma-separated integers"),
    (["--task", "passkey", "--contexts", ","], "--contexts is empty"),
    (["--task", "passkey", "--contexts", "1024,16384"], "context 16384: 16384 tokens are beyond the model's limit of 8192"),
    (["--task", "agreement", "--agree-context", "8192"], "beyond the model's limit of 8192"),
    (["--task", "decode-ppl", "--ppl-context", "9000"], "decode-ppl windows of 9000 tokens"),
    (["--task", "passkey", "--contexts", "40"], "a passkey prompt needs at least"),
    (["--task", "needle", "--contexts", "512", "--keys", "0"], "--keys must be at least 1"),
    (["--task", "passkey", "--trials", "0"], "--trials must be at least 1"),
    (["--task", "passkey", "--baseline", "rank@2.5"], "no RateQCache holds it"),
    (["--task", "passkey", "--baseline", "rot-hadamard@3"], "no RateQCache holds it"),
    (["--task", "passkey", "--baseline", "nosuch@3"], "unknown baseline 'nosuch@3'"),
    (["--task", "agreement", "--data", "nosuchtext"], "unknown text 'nosuchtext'"),
    (["--task", "passkey", "--data", "{short}"], "too short"),
    (["--task", "passkey", "--report", "{file}"], "is a file"),
])
def test_bad_task_input_is_one_line_before_any_weights(run_cli, work, tmp_path, args, phrase):
    (tmp_path / "short.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n" * 20)
    (tmp_path / "a-file").write_text("")
    args = [a.replace("{short}", str(tmp_path / "short.txt")).replace("{file}", str(tmp_path / "a-file")) for a in args]
    refused(run_cli("eval", *args), phrase, work)


@pytest.fixture
def tiny_run(tiny, monkeypatch):
    tok = load_tokenizer("smollm2-135m")
    model = tiny("llama", head_dim=64, kv_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    monkeypatch.setattr(rateq, "load_model", lambda *a, **k: (model, tok))
    return model


def test_a_task_run_prints_json_and_writes_the_report(run_cli, tiny_run, tmp_path):
    report = tmp_path / "report"
    code, out, err = run_cli("eval", "--task", "passkey", "--task", "agreement,decode-ppl", "--contexts", "128",
                             "--depths", "0,1", "--agree-tokens", "3", "--agree-context", "32", "--ppl-context", "24",
                             "-b", "3", "--seed", "5", "--report", report, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["settings"]["tasks"] == ["passkey", "agreement", "decode-ppl"] and doc["settings"]["seed"] == 5
    assert doc["settings"]["contexts"] == [128] and doc["settings"]["depths"] == [0.0, 1.0]
    assert [r["name"] for r in doc["rows"]] == ["fp", "kivi@3"]  # full precision first; KIVI by default
    for row in doc["rows"]:
        assert {"accuracy", "kept", "cells"} <= set(row["passkey"]) and len(row["passkey"]["cells"]) == 2
        assert row["agreement"]["n_tokens"] == 3 and row["decode_ppl"]["seq_len"] == 24
    assert doc["rows"][1]["compared_at"] == 3 and doc["rows"][1]["effective_bits"] == 3
    assert sorted(p.name for p in report.iterdir()) == ["passkey_fp.png", "passkey_kivi_3.png", "report.md",
                                                        "results.json"]
    assert set(doc["report"]) == {"passkey_fp", "passkey_kivi_3", "json", "markdown"}
    code, out, err = run_cli("eval", "--task", "agreement", "--agree-tokens", "2", "--agree-context", "16",
                             "--baseline", "K4V2")
    assert code == 0, err
    assert "| fp | full precision | 16 |" in out and "| K4V2 |" in out and "agreement (2 tokens)" in out
