"""The output sink every command writes through, and calibration's progress and warnings: the library reports
them to a callback, the command line shows the bar and each warning once."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import rateq
from rateq.curves import Curves
from cli._common import Output

ONE_POINT = [(0, 0, 0, 0, 0)]  # a curve point that rises with bits, to make calibration warn


class ByteTokenizer:
    """Each UTF-8 byte is a token: ids < 256, the tiny models' vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt", verbose=False):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)}


# -- the sink --------------------------------------------------------------------------------------------------
def test_json_mode_writes_one_document_and_no_text(capsys):
    with Output(json_mode=True) as sink:
        sink.add({"a": 1, "b": 2}, c=3)
        sink.add(a=4)  # replaces, keeps its place
        sink.line("human text")
        sink.table("a table")
    out = capsys.readouterr().out
    assert json.loads(out) == {"a": 4, "b": 2, "c": 3} and list(json.loads(out)) == ["a", "b", "c"]
    assert "human" not in out


def test_json_mode_writes_nothing_when_the_command_fails(capsys):
    with pytest.raises(rateq.RateQError):
        with Output(json_mode=True) as sink:
            sink.add(a=1)
            raise rateq.RateQError("bad input")
    assert capsys.readouterr().out == ""


def test_human_lines_are_plain_text_on_one_line(capsys):
    long = "profile [bold]x[/bold] :smile: hf:NAME[/CONFIG] " + "word " * 60
    with Output() as sink:
        sink.add(a=1)
        sink.line(long)
    out = capsys.readouterr().out
    assert out == long + "\n"  # no markup, no emoji codes replaced, no wrapping, no JSON after it


def test_warnings_reach_stderr_in_both_modes(capsys):
    for json_mode in (False, True):
        with Output(json_mode) as sink:
            sink.warning("curves [rise] with bits")
        out, err = capsys.readouterr()
        assert err == "warning: curves [rise] with bits\n" and out == ("{}\n" if json_mode else "")


def test_the_calibration_callback_draws_tokens_per_second_and_shows_a_warning_once(capsys):
    with Output() as sink, sink.calibration() as report:
        report({"event": "start", "tokens": 0, "total": 128, "seconds": 0.0})
        report({"event": "batch", "tokens": 64, "total": 128, "seconds": 0.5})
        report({"event": "batch", "tokens": 128, "total": 128, "seconds": 1.0})
        report({"event": "warning", "message": "fisher: 1 of 8 points rise"})
    err = capsys.readouterr().err
    assert err.count("fisher: 1 of 8 points rise") == 1
    assert "128/128" in err and "128 tok/s" in err


# -- the library reports, it draws nothing ---------------------------------------------------------------------
def _calibrate(tiny, progress):
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    return rateq.calibrate(tiny("llama"), None, ids, bits=(2, 3), metric="mse", quantizers=["minmax-g16-fp16"],
                           progress=progress)


def test_a_warning_goes_to_the_callback_and_is_not_logged_as_well(tiny, monkeypatch, caplog):
    monkeypatch.setattr(Curves, "nonmonotone", lambda self, rtol=1e-9: ONE_POINT)
    events = []
    with caplog.at_level(logging.WARNING, logger="rateq"):
        _calibrate(tiny, events.append)
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "rise with more bits" in warnings[0]["message"]
    assert not [r for r in caplog.records if r.name.startswith("rateq")]
    assert [e["tokens"] for e in events if e["event"] == "batch"] == [64, 128]


@pytest.mark.parametrize("progress", [False, True])
def test_without_a_callback_the_warning_is_logged_once(tiny, monkeypatch, caplog, capsys, progress):
    monkeypatch.setattr(Curves, "nonmonotone", lambda self, rtol=1e-9: ONE_POINT)
    with caplog.at_level(logging.WARNING, logger="rateq"):
        _calibrate(tiny, progress)
    logged = [r for r in caplog.records if r.name == "rateq.calibrate"]
    assert len(logged) == 1 and "rise with more bits" in logged[0].getMessage()
    err = capsys.readouterr().err
    assert ("64/128 tokens" in err and "tok/s" in err) if progress else err == ""


# -- the command shows the bar and the warning ----------------------------------------------------------------
@pytest.fixture
def tiny_folder(tiny, tmp_path, monkeypatch):
    """`--model` folder of a tiny Llama (config only); `rateq.load_model` returns that model."""
    model = tiny("llama", head_dim=64)
    folder = tmp_path / "tiny-llama"
    model.config.save_pretrained(folder)
    monkeypatch.setattr(rateq, "load_model", lambda name, **kw: (model, ByteTokenizer()))
    monkeypatch.setattr(rateq.models, "load_tokenizer", lambda name: ByteTokenizer())
    monkeypatch.chdir(tmp_path)
    return folder


CALIBRATE = ["--n-samples", "2", "--seq-len", "64", "--quantizers", "minmax-g32-fp16", "--bits", "2,3,4",
             "--budget", "3.5", "--out", "p.safetensors"]


@pytest.mark.parametrize("json_mode", [False, True])
def test_calibrate_shows_each_warning_once(run_cli, tiny_folder, monkeypatch, json_mode):
    monkeypatch.setattr(Curves, "nonmonotone", lambda self, rtol=1e-9: ONE_POINT)
    code, out, err = run_cli("calibrate", "--model", tiny_folder, *CALIBRATE, *(["--json"] if json_mode else []))
    assert code == 0, err
    assert err.count("rise with more bits") == 1 and err.count("warning:") == 1, err
    if json_mode:
        doc = json.loads(out)
        assert doc["profile"] == "p.safetensors" and doc["curves"] == "p.curves.safetensors"
        assert "tok/s" not in err  # progress is for people: none with --json
    else:
        assert "calibrated 128 tokens" in out and "profile written to p.safetensors" in out
        assert "tok/s" in err and "128/128" in err
