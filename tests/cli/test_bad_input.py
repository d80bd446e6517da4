"""Every bad input a user can give the command line: one line `error: …` on stderr, exit code 2, no traceback,
nothing written — and all of it found before any model weights load.

Inputs are tiny: curves and a profile from a calibration of a tiny random llama, and a hand-made profile that
fits the bundled smollm2-135m (only its config and tokenizer are read here; its weights never load). Each case
runs in an empty working folder, which must still be empty afterwards, as must any folder named as output.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rateq
from rateq.io import read_safetensors, write_safetensors
from rateq.models import ModelFingerprint, load_config

HAS_PROC = os.path.isdir("/proc")
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny):
    """Good input files in their own folder (never an output folder of a test)."""
    folder = tmp_path_factory.mktemp("inputs")
    model = tiny("llama", kv_heads=2)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    curves = rateq.calibrate(model, None, ids, bits=(2, 3, 4), metric="mse",
                             quantizers=["minmax-g32-fp16", "minmax-g16-fp16"])
    curves.save(folder / "tiny.curves.safetensors")
    rateq.save_profile(rateq.solve(curves, 3.5), folder / "tiny.safetensors")
    smol = rateq.fingerprint(load_config("smollm2-135m"), name="smollm2-135m")
    rateq.save_profile(rateq.Plan.uniform(smol, 4, 2, policy=rateq.CachePolicy(block=32)), folder / "smol.safetensors")
    shape = ModelFingerprint("smollm2-135m", "llama", 4, 3, 64)  # smollm2's name, another shape
    rateq.save_profile(rateq.Plan.uniform(shape, 4), folder / "smol-4-layers.safetensors")
    (folder / "short.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n")
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("  \n\n ")
    rng = random.Random(0)
    (folder / "binary.bin").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (folder / "nul.txt").write_bytes(b"text\x00with a NUL byte\n" * 100)
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    (folder / "bad.jsonl").write_text('{"body": "no text field"}\n')
    (folder / "a-file").write_text("not a folder\n")
    (folder / "no-config").mkdir()
    return SimpleNamespace(folder=folder, curves=folder / "tiny.curves.safetensors",
                           profile=folder / "tiny.safetensors", smol=folder / "smol.safetensors",
                           smol_4_layers=folder / "smol-4-layers.safetensors")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder (where default outputs would go); no weights may load; the hub is offline."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rateq, "load_model", lambda *a, **k: pytest.fail("model weights loaded before the inputs "
                                                                         "were checked"))
    return folder


def refused(result, *, match: str | None = None, folders=()) -> str:
    """Assert the promise for a bad input; return the error line."""
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1 and err.count("\n") == 1, err
    assert lines[0].startswith("error: "), err
    if match is not None:
        assert match in lines[0], lines[0]
    for folder in folders:
        folder = Path(folder)
        assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == [], list(folder.iterdir())
    return lines[0]


# -- damaged profiles and curves ---------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    t, m = read_safetensors(src, "file")
    write_safetensors(dst, tensors(t) if tensors else t, meta(m) if meta else m)
    return dst


def damaged(kind: str, src: Path, folder: Path, role: str) -> tuple[Path, str]:
    """A damaged copy of `src` (a profile or curves file) and a phrase its error must contain."""
    dst = folder / f"{kind}.{role}.safetensors"
    data = src.read_bytes()
    bits = "k_bits" if role == "profile" else "distortion"
    if kind == "truncated":
        dst.write_bytes(data[: len(data) // 2])
        return dst, "truncated"
    if kind == "random":
        rng = random.Random(kind)
        dst.write_bytes(bytes(rng.randrange(256) for _ in range(len(data))))
        return dst, "not a readable"
    if kind == "empty":
        dst.write_bytes(b"")
        return dst, "too short"
    if kind == "foreign":
        write_safetensors(dst, {"weight": torch.zeros(2, 3)}, {"format": "pt"})
        return dst, "not a rateq"
    if kind == "future-version":
        return _rewrite(src, dst, meta=lambda m: {**m, "version": "2"}), "version '2'"
    if kind == "tampered-shape":
        return _rewrite(src, dst, tensors=lambda t: {**t, bits: t[bits][:-1].clone()}), "shape"
    if kind == "tampered-bits":
        if role == "profile":  # the tensors no longer give the effective bits the file states
            return _rewrite(src, dst, tensors=lambda t: {**t, "k_bits": t["k_bits"].clamp(max=7) + 1}), "effective bits"
        return _rewrite(src, dst, meta=lambda m: {**m, "bits": "[2, 3, 99]"}), "bit widths"
    if kind == "missing-specs":
        return _rewrite(src, dst, meta=lambda m: {k: v for k, v in m.items() if k != "quantizers"}), "quantizers"
    if kind == "bad-json":
        return _rewrite(src, dst, meta=lambda m: {**m, "model": "{not json"}), "damaged"
    if kind == "folder":
        dst.mkdir()
        return dst, "is a folder"
    if kind == "missing":
        return dst, "does not exist"
    raise ValueError(kind)


DAMAGE = ["truncated", "random", "empty", "foreign", "future-version", "tampered-shape", "tampered-bits",
          "missing-specs", "bad-json", "folder", "missing"]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", ["show", "show-png", "export", "apply"])
def test_damaged_profiles(run_cli, work, inputs, tmp_path, kind, command):
    path, phrase = damaged(kind, inputs.profile, tmp_path, "profile")
    out = tmp_path / "out"
    args = {"show": ["show", path], "show-png": ["show", path, "--png", out / "map.png"],
            "export": ["export", path, "--out", out / "plan.json"], "apply": ["apply", path, "--prompt", "Hi"]}
    refused(run_cli(*args[command]), match=phrase, folders=[work, out])


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", ["solve", "sweep"])
def test_damaged_curves(run_cli, work, inputs, tmp_path, kind, command):
    path, phrase = damaged(kind, inputs.curves, tmp_path, "curves")
    out = tmp_path / "out"
    args = ["solve", path, "--budget", "3", "--out", out / "p.safetensors"] if command == "solve" else \
        ["solve", path, "--sweep", "2:4:1"]
    refused(run_cli(*args), match=phrase, folders=[work, out])


def test_a_profile_where_curves_belong_and_back(run_cli, work, inputs, tmp_path):
    refused(run_cli("solve", inputs.profile, "--sweep", "2:4:1"), match="a profile, not curves", folders=[work])
    refused(run_cli("show", inputs.curves), match="a curves file", folders=[work])


# -- budgets, sweeps, methods, bit lists, quantizer ids ----------------------------------------------------

BUDGETS = [("nan", "--budget must be a positive, finite number"), ("-1", "--budget must be a positive, finite number"),
           ("0", "--budget must be a positive, finite number"), ("inf", "--budget must be a positive, finite number"), ("100", "outside the feasible range"), ("0.5", "outside the feasible range"),
           ("abc", "Invalid value for '--budget'")]


@pytest.mark.parametrize("budget, phrase", BUDGETS)
def test_bad_budgets_in_solve(run_cli, work, inputs, tmp_path, budget, phrase):
    out = tmp_path / "out"
    refused(run_cli("solve", inputs.curves, "--budget", budget, "--out", out / "p.safetensors"), match=phrase,
            folders=[work, out])


def test_bad_learned_tokens_in_solve(run_cli, work, inputs, tmp_path):
    out = tmp_path / "out"
    refused(run_cli("solve", inputs.curves, "--budget", "3", "--learned-tokens", "0", "--out", out / "p.safetensors"),
            match="--learned-tokens must be a positive number of cached tokens", folders=[work, out])


@pytest.mark.parametrize("budget, phrase", BUDGETS)
def test_bad_budgets_in_calibrate(run_cli, work, budget, phrase):
    refused(run_cli("calibrate", "--budget", budget), match=phrase, folders=[work])


@pytest.mark.parametrize("sweep, phrase", [("1:x:2", "START:STOP:STEP"), ("4:2:1", "START ≤ STOP"),
                                           ("1:2:0", "STEP > 0"), ("1:2:-1", "STEP > 0"), ("2:4", "START:STOP:STEP"),
                                           ("nan:4:1", "START ≤ STOP"), ("0:1e9:1e-6", "at most 10000")])
def test_bad_sweeps(run_cli, work, inputs, sweep, phrase):
    refused(run_cli("solve", inputs.curves, "--sweep", sweep), match=phrase, folders=[work])


@pytest.mark.parametrize("args, phrase", [
    (["solve", "{curves}", "--budget", "3", "--out", "{out}/p.safetensors", "--method", "simplex"], "unknown --method"),
    (["solve", "{curves}", "--sweep", "2:4:1", "--method", "simplex"], "unknown --method"),
    (["solve", "{curves}", "--budget", "3", "--out", "{out}/p.safetensors", "--quantizers", "minmax-g64-fp16"],
     "not in the curves"),
    (["solve", "{curves}", "--budget", "3", "--out", "{out}/p.safetensors", "--min-bits", "5", "--max-bits", "3"],
     "min_bits 5 is above max_bits 3"),
    (["solve", "{curves}", "--budget", "3", "--out", "{out}/p.safetensors", "--min-bits", "0"], "--min-bits"),
    (["calibrate", "--budget", "3", "--method", "magic"], "unknown --method"),
    (["calibrate", "--budget", "3", "--metric", "psnr"], "unknown --metric"),
])
def test_bad_methods_and_constraints(run_cli, work, inputs, tmp_path, args, phrase):
    out = tmp_path / "out"
    args = [a.replace("{curves}", str(inputs.curves)).replace("{out}", str(out)) for a in args]
    refused(run_cli(*args), match=phrase, folders=[work, out])


@pytest.mark.parametrize("bits, phrase", [("2,x", "comma-separated integers"), ("", "--bits is empty"),
                                          (",", "--bits is empty"), ("0,2", "must be 1..8"), ("9", "must be 1..8"),
                                          ("3,2", "increasing and distinct"), ("2,2", "increasing and distinct")])
def test_bad_bit_lists(run_cli, work, bits, phrase):
    refused(run_cli("calibrate", "--budget", "3", "--bits", bits), match=phrase, folders=[work])


@pytest.mark.parametrize("ids, phrase", [
    ("minmax-q7", "cannot parse quantizer"),
    ("", "--quantizers is empty"),
    ("nosuchkind-g32-fp16", "unknown quantizer kind"),
    ("minmax-g0-fp16", "group_size must be a positive integer"),
    ("lloydmax-g64-fp16", "add rotation"),
    ("minmax-g32-fp16-o0.99", "keeps every entry"),
    ("lloydmax-g48-rhadamard-fp16", "do not divide head_dim 64"),  # needs the model's config: smollm2's heads
    ("minmax-g128-channels-fp16", "do not divide head_dim 64"),
])
def test_bad_quantizer_ids(run_cli, work, ids, phrase):
    refused(run_cli("calibrate", "--budget", "4", "--quantizers", ids), match=phrase, folders=[work])


def test_bad_policy_options_in_calibrate(run_cli, work):
    refused(run_cli("calibrate", "--budget", "4", "--quantizers", "minmax-g64-fp16", "--block", "32"),
            match="key block 32 is not a multiple of quantizer minmax-g64-fp16's group of 64 tokens", folders=[work])
    refused(run_cli("calibrate", "--budget", "4", "--sinks", "-1"), match="--sinks must be at least 0", folders=[work])


# -- models --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, phrase", [
    ("nobody/no-such-model-rateq", "not in the local hub cache and the hub is unreachable"),
    ("gpt-7", "unknown model 'gpt-7': not a rateq alias"),
    ("./no/such/folder", "does not exist"),
    ("{inputs}/a-file", "is a file"),
    ("{inputs}/no-config", "has no config.json"),
])
def test_unknown_and_offline_models_fail_fast(run_cli, work, inputs, model, phrase):
    model = model.replace("{inputs}", str(inputs.folder))
    start = time.perf_counter()
    refused(run_cli("calibrate", "--budget", "3", "--model", model), match=phrase, folders=[work])
    refused(run_cli("apply", inputs.smol, "--model", model, "--prompt", "Hi"), match=phrase, folders=[work])
    assert time.perf_counter() - start < 20  # no retries, no waiting for a network that is not there


def test_a_profile_naming_a_model_that_is_not_here(run_cli, work, inputs):
    line = refused(run_cli("apply", inputs.profile, "--prompt", "Hi"), match="'tiny-llama'", folders=[work])
    assert "give --model" in line


def test_a_profile_for_another_model(run_cli, work, inputs):
    line = refused(run_cli("apply", inputs.profile, "--model", "smollm2-135m", "--prompt", "Hi"),
                   match="does not fit smollm2-135m", folders=[work])
    assert "num_layers 3 vs 30" in line and "head_dim 16 vs 64" in line
    refused(run_cli("apply", inputs.smol_4_layers, "--data", "austen-pp"), match="num_layers 4 vs 30",
            folders=[work])


# -- data ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, phrase", [
    ("missing.txt", "does not exist"),
    ("{inputs}/empty.txt", "is empty"),
    ("{inputs}/blank.txt", "is empty"),
    ("{inputs}/short.txt", "not enough text"),
    ("{inputs}/binary.bin", "is binary"),
    ("{inputs}/nul.txt", "is binary"),
    ("{inputs}/latin1.txt", "not UTF-8 text"),
    ("{inputs}/bad.jsonl", "'text' field"),
    ("{inputs}", "is a folder"),
    ("nosuchalias", "unknown text"),
    ("hf:onlyname", "must look like"),
])
def test_bad_data(run_cli, work, inputs, data, phrase):
    data = data.replace("{inputs}", str(inputs.folder))
    refused(run_cli("calibrate", "--budget", "3", "--data", data), match=phrase, folders=[work])
    refused(run_cli("apply", inputs.smol, "--data", data, "--char-start", "0"), match=phrase, folders=[work])


def test_text_too_short_for_the_tokens_asked(run_cli, work, inputs):
    refused(run_cli("calibrate", "--budget", "3", "--data", "austen-emma", "--n-samples", "400"),
            match="400 x 1024 tokens requested", folders=[work])
    refused(run_cli("calibrate", "--budget", "3", "--n-samples", "2000"),
            match="mix draws 500 of its 2000 windows from austen-emma: not enough text: 500 x 1024", folders=[work])
    refused(run_cli("apply", inputs.smol, "--data", "austen-pp", "--char-start", "10000000"), match="cannot start at",
            folders=[work])
    refused(run_cli("apply", inputs.smol, "--data", "austen-pp", "--n-windows", "1000", "--seq-len", "1024"),
            match="not enough text", folders=[work])


# -- outputs -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_PROC, reason="needs /proc, a folder where no file can be created")
@pytest.mark.parametrize("command", ["solve", "calibrate", "show", "export"])
def test_unwritable_outputs(run_cli, work, inputs, command):
    args = {"solve": ["solve", inputs.curves, "--budget", "3", "--out", "/proc/x.safetensors"],
            "calibrate": ["calibrate", "--budget", "3", "--out", "/proc/x.safetensors"],
            "show": ["show", inputs.profile, "--png", "/proc/x.png"],
            "export": ["export", inputs.profile, "--out", "/proc/x.json"]}[command]
    refused(run_cli(*args), match="cannot be written", folders=[work])
    assert not os.path.exists(args[-1])


@pytest.mark.parametrize("target, phrase", [("{out}", "is a folder"), ("{inputs}/a-file/p.safetensors", "is a file"),
                                            ("{curves}", "overwrite the curves")])
def test_outputs_that_cannot_be_files(run_cli, work, inputs, tmp_path, target, phrase):
    out = tmp_path / "out"
    out.mkdir()
    target = target.replace("{out}", str(out)).replace("{inputs}", str(inputs.folder)).replace("{curves}", str(inputs.curves))
    before = inputs.curves.read_bytes()
    refused(run_cli("solve", inputs.curves, "--budget", "3", "--out", target), match=phrase, folders=[work, out])
    refused(run_cli("export", inputs.profile, "--out", target if target != str(inputs.curves) else out),
            folders=[work, out])
    assert inputs.curves.read_bytes() == before


def test_a_missing_output_folder_is_made_only_when_writing(run_cli, work, inputs, tmp_path):
    out = tmp_path / "new" / "deeper" / "p.safetensors"
    refused(run_cli("solve", inputs.curves, "--budget", "100", "--out", out), folders=[work])
    assert not (tmp_path / "new").exists()  # the check made nothing
    refused(run_cli("calibrate", "--budget", "3", "--bits", "9", "--out", out), folders=[work])
    assert not (tmp_path / "new").exists()
    code, _, err = run_cli("solve", inputs.curves, "--budget", "4", "--out", out)
    assert code == 0, err
    assert [p.name for p in out.parent.iterdir()] == ["p.safetensors"]  # no temporary file beside it
    assert rateq.load_profile(out).effective_bits <= 4


# -- devices -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, phrase", [
    pytest.param("cuda", "CUDA", marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    ("cuda:99", "cuda:99"), ("tpu", "unknown device"), ("cuda:x", "unknown device"), ("", "unknown device"),
])
def test_devices_this_machine_does_not_have(run_cli, work, inputs, device, phrase):
    refused(run_cli("calibrate", "--budget", "3", "--device", device), match=phrase, folders=[work])
    refused(run_cli("apply", inputs.smol, "--prompt", "Hi", "--device", device), match=phrase, folders=[work])


def test_bad_dtype(run_cli, work, inputs):
    refused(run_cli("calibrate", "--budget", "3", "--dtype", "fp8"), match="unknown dtype", folders=[work])
    refused(run_cli("apply", inputs.smol, "--prompt", "Hi", "--dtype", "fp8"), match="unknown dtype", folders=[work])


# -- apply's own arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, phrase", [
    ([], "exactly one of --prompt"),
    (["--prompt", "Hi", "--data", "austen-pp"], "exactly one of --prompt"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--data", "austen-pp", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["--data", "austen-pp", "--n-windows", "0"], "--n-windows must be at least 1"),
    (["--data", "austen-pp", "--seq-len", "64", "--prefill", "65"], "--prefill must be between 1 and"),
    (["--data", "austen-pp", "--char-start", "-1"], "--char-start must be at least 0"),
    (["--prompt", "Hi", "--block", "0"], "--block must be at least 1"),
    (["--prompt", "Hi", "--residual", "-1"], "--residual must be at least 0"),
    (["--prompt", "Hi", "--block", "48"], "a multiple of 32: CachePolicy(block=64) in Python, --block 64 on the command line"),
])
def test_bad_apply_arguments(run_cli, work, inputs, args, phrase):
    refused(run_cli("apply", inputs.smol, *args), match=phrase, folders=[work])


# -- usage errors: one line too --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, phrase", [
    (["calibrate"], "Missing option '--budget'"),
    (["solve"], "Missing argument"),
    (["solve", "{curves}", "--bogus"], "No such option: --bogus"),
    (["calibrate", "--budget", "3", "--n-samples", "two"], "Invalid value for '--n-samples'"),
    (["nosuchcommand"], "No such command"),
    (["--threads", "0", "version"], "--threads must be at least 1"),
    (["calibrate", "--budget", "3", "--threads", "-2"], "--threads must be at least 1"),
])
def test_usage_errors_are_one_line(run_cli, work, inputs, args, phrase):
    args = [a.replace("{curves}", str(inputs.curves)) for a in args]
    line = refused(run_cli(*args), match=phrase, folders=[work])
    assert "--help" in line or "threads" in line


def test_bad_threads_from_the_environment(run_cli, work, monkeypatch):
    monkeypatch.setenv("RATEQ_THREADS", "many")
    refused(run_cli("version"), match="Invalid value for '--threads'", folders=[work])


def test_help_still_works(run_cli, work):
    # Through the console entry point (not typer's test runner): exit code 0, nothing on stderr, every command
    # listed, and every option of a command in its help.
    import typer

    from cli.main import app

    group = typer.main.get_command(app)
    code, out, err = run_cli("--help")
    assert code == 0 and not err.strip()
    assert all(f" {name} " in out for name in group.commands), out
    code, out, err = run_cli("solve", "--help")
    assert code == 0 and not err.strip()
    options = [o for p in group.commands["solve"].params for o in p.opts if o.startswith("--")]
    assert "--budget" in options and "--sweep" in options
    assert all(o in out for o in options), [o for o in options if o not in out]


# -- what a good run prints ------------------------------------------------------------------------------------

@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_never_exceed_the_allowed_cores(run_cli, work, monkeypatch, threads_restored):
    from cli._common import allowed_cores

    code, _, _ = run_cli("--threads", "1", "version")
    assert code == 0 and torch.get_num_threads() == 1
    monkeypatch.setenv("RATEQ_THREADS", "4096")
    code, _, _ = run_cli("version")
    assert code == 0 and torch.get_num_threads() == allowed_cores()


def test_rateq_warnings_print_once(run_cli, work, capsys):
    # Calibration reports its warnings on its own console; Python's last-resort handler must not repeat them.
    run_cli("version")
    logging.getLogger("rateq.calibrate").warning("a warning the progress console already showed")
    assert capsys.readouterr().err == ""


def test_errors_in_json_mode_are_one_line_too(run_cli, work, inputs):
    code, out, err = run_cli("show", inputs.curves, "--json")
    refused((code, out, err), match="a curves file", folders=[work])
    assert out == ""
    json.dumps(err)  # plain text
