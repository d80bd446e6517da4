"""`rateq calibrate` at scale: --device-map / --max-memory / --offload-folder through accelerate, --revision and
--trust-remote-code for hub models, peak memory in the summary and in --json; each bad value is one line on
stderr, exit code 2, before any weights load."""

from __future__ import annotations

import json
import re

import pytest
import torch

import rateq

HAS_CUDA = torch.cuda.is_available()


class ByteTokenizer:
    """Each UTF-8 byte is a token: ids < 256, the tiny models' vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt", verbose=False):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)}


def one_line_error(result, match: str) -> str:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty working folder, an offline hub, and no model weights may load."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rateq, "load_model", lambda *a, **k: pytest.fail("weights loaded before the inputs were checked"))
    return tmp_path


BAD = [
    (["--max-memory", "cpu=1GiB"], "give --device-map too"),
    (["--offload-folder", "off"], "give --device-map too"),
    (["--device-map", "everywhere"], "use one of auto, balanced"),
    (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "positive number of bytes"),
    (["--device-map", "auto", "--max-memory", "mars=1GiB"], "mars"),
    (["--device-map", "bad.json"], "not a JSON file"),
    (["--device-map", "list.json"], "must be an object"),
    (["--revision", " "], "--revision is empty"),
    (["--revision", "v1.0"], "no revisions"),  # the bundled model
    (["--model", "Qwen/Qwen3-0.6B", "--revision", "main"], "hub is unreachable"),  # offline
]


@pytest.mark.parametrize("args, match", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_placement_and_hub_options_are_one_line_before_weights(run_cli, no_weights, args, match):
    (no_weights / "bad.json").write_text("{not json")
    (no_weights / "list.json").write_text("[0, 1]")
    one_line_error(run_cli("calibrate", "--budget", "4", *args), match)
    assert sorted(p.name for p in no_weights.iterdir()) == ["bad.json", "list.json"]  # nothing written


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("args", [["--device-map", "auto", "--max-memory", "0=70GiB,cpu=200GiB"],
                                  ["--device-map", "gpus.json"]])
def test_a_gpu_in_the_placement_of_a_machine_without_one_is_refused(run_cli, no_weights, args):
    (no_weights / "gpus.json").write_text(json.dumps({"model": 0, "lm_head": "cuda:1"}))
    one_line_error(run_cli("calibrate", "--budget", "4", *args), "CUDA")


@pytest.fixture
def tiny_saved(tiny, tmp_path, monkeypatch):
    """A saved tiny Llama (weights and config, no tokenizer files) read through the byte tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny("llama", head_dim=32, num_hidden_layers=4).save_pretrained(folder)
    monkeypatch.setattr(rateq.models, "load_tokenizer", lambda name, **kw: ByteTokenizer())
    monkeypatch.chdir(tmp_path)
    return folder


RUN = ["--n-samples", "2", "--seq-len", "64", "--quantizers", "minmax-g32-fp16", "--bits", "2,3,4", "--budget", "3.5"]


def test_a_device_map_over_cpu_and_disk_gives_the_single_device_curves(run_cli, tiny_saved, tmp_path):
    code, out, err = run_cli("calibrate", "--model", tiny_saved, *RUN, "--out", "one.safetensors", "--json")
    assert code == 0, err
    one = json.loads(out)
    split = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
             "lm_head": "disk"}
    (tmp_path / "split.json").write_text(json.dumps(split))
    code, out, err = run_cli("calibrate", "--model", tiny_saved, *RUN, "--out", "split.safetensors", "--json",
                             "--device-map", "split.json", "--offload-folder", "offload")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["calibration"]["devices"] == ["disk", "cpu"] and "devices" not in one["calibration"]
    assert doc["peak_bytes"]["cpu"] > 2**20 and doc["peak_bytes"] == doc["calibration"]["peak_bytes"]
    assert doc["seconds"] == doc["calibration"]["seconds"] > 0
    a = rateq.Curves.load(tmp_path / "one.curves.safetensors")
    b = rateq.Curves.load(tmp_path / "split.curves.safetensors")
    torch.testing.assert_close(b.distortion, a.distortion, rtol=1e-9, atol=0)


def test_device_map_auto_on_a_cpu_machine_keeps_the_cpu_defaults(run_cli, tiny_saved, monkeypatch):
    seen = {}
    real = rateq.load_model

    def spy(name, **kw):
        seen.update(kw)
        return real(name, **kw)

    monkeypatch.setattr(rateq, "load_model", spy)
    code, out, err = run_cli("calibrate", "--model", tiny_saved, *RUN, "--device-map", "auto", "--max-memory",
                             "cpu=8GiB", "--out", "p.safetensors")
    assert code == 0, err
    assert seen["device_map"] == "auto" and seen["max_memory"] == {"cpu": 8 * 2**30} and seen["dtype"] == "auto"
    assert "calibrated 128 tokens" in out and re.search(r"peak memory cpu \d+\.\d [MG]iB;", out), out


def test_hub_options_reach_transformers(monkeypatch, tmp_path):
    # Online, a hub id loads as transformers loads it: the revision and remote code are passed on when asked.
    import transformers

    calls = []

    class Stop(Exception):
        pass

    def record(kind):
        def from_pretrained(source, **kw):
            calls.append((kind, source, kw))
            if kind == "model":
                raise Stop
            return ByteTokenizer()
        return from_pretrained

    monkeypatch.setattr(rateq.models, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    monkeypatch.setattr(rateq.models, "_has_vocabulary", lambda tok: True)
    with pytest.raises(Stop):
        rateq.load_model("qwen3-0.6b", revision="abc123", trust_remote_code=True)
    with pytest.raises(Stop):
        rateq.load_model("Qwen/Qwen3-0.6B")
    (_, src, tok_kw), (_, _, model_kw), (_, src2, _), (_, _, plain_kw) = calls
    assert src == src2 == "Qwen/Qwen3-0.6B"
    assert tok_kw["revision"] == model_kw["revision"] == "abc123" and model_kw["trust_remote_code"] is True
    assert "revision" not in plain_kw and plain_kw["trust_remote_code"] is False and plain_kw["local_files_only"] is False


def test_the_default_candidates_add_learned_codebooks_below_two_and_a_half_bits(run_cli, tiny, tiny_saved, tmp_path,
                                                                              monkeypatch):
    from rateq.calibrate import DEFAULT_QUANTIZERS, LOW_BIT_QUANTIZERS

    seen = []

    def stop(model, tokenizer, data, *, quantizers, **kw):  # what would be calibrated, then no calibration
        seen.append([q.id for q in quantizers])
        raise rateq.RateQError("stopped before calibrating")

    monkeypatch.setattr(rateq, "calibrate", stop)
    tiny("llama", head_dim=64, num_hidden_layers=2).save_pretrained(tmp_path / "tiny-64")  # the defaults' groups of 64
    run = ["calibrate", "--model", tmp_path / "tiny-64", "--n-samples", "2", "--seq-len", "256"]
    for budget, learned in (("2.5", ()), ("3", ()), ("2.4", LOW_BIT_QUANTIZERS), ("1", LOW_BIT_QUANTIZERS)):
        code, _, err = run_cli(*run, "--budget", budget)
        assert code == 2 and "stopped before calibrating" in err, err
        assert seen[-1] == [*DEFAULT_QUANTIZERS, *learned], budget
    # Candidates named are taken as named, whatever the budget; 'default' among them follows it.
    for q, want in (("minmax-g32-fp16", ["minmax-g32-fp16"]),
                    ("default,minmax-g32-fp16", [*DEFAULT_QUANTIZERS, *LOW_BIT_QUANTIZERS])):
        run_cli(*run, "--budget", "2", "-q", q)
        assert seen[-1] == want
    assert not list(tmp_path.glob("*.safetensors"))  # nothing written
