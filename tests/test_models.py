import math

import pytest
import torch

import rateq
from rateq.models import known_models, random_model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tiny_models_build_and_run(tiny, arch, kv_heads):
    model = tiny(arch, kv_heads=kv_heads)
    fp = rateq.fingerprint(model)
    assert (fp.num_layers, fp.num_kv_heads, fp.head_dim) == (3, kv_heads, 16)
    logits = model(torch.randint(0, 256, (2, 24))).logits
    assert logits.shape == (2, 24, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(known_models()))
def test_every_alias_has_a_buildable_config(name):
    # Built on the meta device: the full architecture with no memory, as --random-weights does on a GPU.
    model = random_model(name, device="meta")
    cfg = known_models()[name]["config"]
    fp = rateq.fingerprint(model)
    assert fp.num_layers == cfg["num_hidden_layers"] and fp.num_kv_heads == cfg["num_key_value_heads"]
    assert fp.name == name


def test_qwen3_8b_shape():
    fp = rateq.fingerprint(random_model("qwen3-8b", device="meta"))
    assert (fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim) == ("qwen3", 36, 8, 128)


def test_unknown_random_alias_is_clear():
    with pytest.raises(rateq.RateQError, match="random weights need one of"):
        random_model("gpt-7")


def test_unreachable_hub_model_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(rateq.RateQError, match="local folder"):
        rateq.load_model("nobody/no-such-model-rateq")


def test_fingerprint_mismatches(tiny):
    a = rateq.fingerprint(tiny("llama", kv_heads=2))
    b = rateq.fingerprint(tiny("qwen3", kv_heads=4))
    assert a.mismatches(b) == ["architecture llama vs qwen3", "num_kv_heads 2 vs 4"]
    assert rateq.ModelFingerprint.from_dict(a.to_dict()) == a


def test_default_model_loads_offline(smol):
    model, tok = smol
    fp = rateq.fingerprint(model)
    assert (fp.name, fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim) == ("smollm2-135m", "llama", 30, 3, 64)
    assert tok("Emma Woodhouse")["input_ids"]


def test_default_model_reference_perplexity(smol, reference_windows):
    # DESIGN.md: plain-forward perplexity of smollm2-135m on the reference window is 24.88.
    model, _ = smol
    with torch.no_grad():
        logits = model(reference_windows, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), reference_windows[:, 1:].flatten())
    assert math.exp(float(nll)) == pytest.approx(24.88, abs=0.05)
