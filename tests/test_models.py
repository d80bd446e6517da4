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


def llama_parameters(config) -> int:
    """A Llama's parameters from its config: embedding, per layer q/k/v/o projections, gated MLP and two norms,
    the final norm, and the output head unless it is the embedding."""
    d, f, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    return V * d + L * layer + d + (0 if config.tie_word_embeddings else d * V)


@pytest.mark.parametrize("tied", [False, True])
def test_a_models_fingerprint_counts_its_parameters(tiny, tied):
    model = tiny("llama", tie_word_embeddings=tied)
    fp = rateq.fingerprint(model)
    assert fp.num_parameters == llama_parameters(model.config) == (127_424 if tied else 143_808)
    assert fp.fp16_weight_nbytes == 2 * fp.num_parameters
    assert rateq.ModelFingerprint.from_dict(fp.to_dict()) == fp
    # from a config alone the count is unknown, and the fingerprint's JSON is what it was before counts existed
    shape = rateq.fingerprint(model.config, name=fp.name)
    assert shape.num_parameters is None and shape.fp16_weight_nbytes is None
    assert set(shape.to_dict()) == {"name", "architecture", "num_layers", "num_kv_heads", "head_dim"}
    assert fp.mismatches(shape) == [] and shape == rateq.ModelFingerprint.from_dict(shape.to_dict())


def test_default_model_loads_offline(smol):
    model, tok = smol
    fp = rateq.fingerprint(model)
    assert (fp.name, fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim) == ("smollm2-135m", "llama", 30, 3, 64)
    assert tok("Emma Woodhouse")["input_ids"]


def test_default_model_reference_perplexity(smol, reference_windows):
    # Plain-forward perplexity of smollm2-135m on the reference window (4 × 1024 tokens of Pride and Prejudice
    # from character 100000) is 24.88.
    model, _ = smol
    with torch.no_grad():
        logits = model(reference_windows, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), reference_windows[:, 1:].flatten())
    assert math.exp(float(nll)) == pytest.approx(24.88, abs=0.05)


def test_devices_are_checked_before_anything_loads():
    from rateq.models import check_device

    assert check_device("cpu") == torch.device("cpu") and check_device(torch.device("meta")).type == "meta"
    for bad, match in (("tpu", "unknown device"), ("cuda:x", "unknown device"), ("", "unknown device"),
                       ("cuda:99", "cuda:99")):
        with pytest.raises(rateq.RateQError, match=match):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(rateq.RateQError, match="CUDA"):
            check_device("cuda")
        with pytest.raises(rateq.RateQError, match="CUDA"):
            rateq.load_model("smollm2-135m", device="cuda")  # refused before the model is looked at


def test_fingerprints_from_files_are_checked():
    good = {"name": "m", "architecture": "llama", "num_layers": 2, "num_kv_heads": 1, "head_dim": 8}
    assert rateq.ModelFingerprint.from_dict(good).head_dim == 8
    assert rateq.ModelFingerprint.from_dict({**good, "num_parameters": 1000}).num_parameters == 1000
    assert rateq.ModelFingerprint.from_dict({**good, "num_parameters": None}).num_parameters is None
    for change in ({"num_layers": "2"}, {"num_layers": 0}, {"head_dim": 2.5}, {"num_kv_heads": True},
                   {"name": 5}, {"head_dim": None}, {"num_parameters": 0}, {"num_parameters": "135M"},
                   {"num_parameters": 1.5e8}, {"num_parameters": True}):
        with pytest.raises(rateq.RateQError):
            rateq.ModelFingerprint.from_dict({**good, **change})
    with pytest.raises(rateq.RateQError, match="lacks head_dim"):
        rateq.ModelFingerprint.from_dict({k: v for k, v in good.items() if k != "head_dim"})
    with pytest.raises(rateq.RateQError, match="JSON object"):
        rateq.ModelFingerprint.from_dict([1, 2])


def test_config_and_tokenizer_load_without_weights(tmp_path, tiny, monkeypatch):
    from rateq.models import load_config, load_tokenizer

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded"))
    config = load_config("smollm2-135m")
    assert rateq.fingerprint(config, name="smollm2-135m") == rateq.ModelFingerprint("smollm2-135m", "llama", 30, 3, 64)
    assert load_tokenizer("smollm2-135m")("Emma")["input_ids"]
    folder = tmp_path / "tiny"
    tiny("qwen3", kv_heads=4).config.save_pretrained(folder)
    assert rateq.fingerprint(load_config(str(folder))).num_kv_heads == 4
    with pytest.raises(rateq.RateQError, match="no tokenizer files"):
        load_tokenizer(str(folder))  # a folder with a config and no tokenizer


@pytest.mark.parametrize("name, match", [("./no/such/folder", "does not exist"), ("", "give a model"),
                                         ("nobody/no-such-model-rateq", "hub is unreachable"),
                                         ("gpt-7", "not a rateq alias")])
def test_models_that_cannot_load_fail_fast(name, match, monkeypatch):
    from rateq.models import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(rateq.RateQError, match=match):
        load_config(name)


def test_a_model_folder_must_hold_a_config(tmp_path):
    from rateq.models import load_config

    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(rateq.RateQError, match="no config.json"):
        load_config(str(tmp_path))
    with pytest.raises(rateq.RateQError, match="is a file"):
        load_config(str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(rateq.RateQError, match="cannot load the config"):
        load_config(str(tmp_path))


def test_loading_is_quiet_and_leaves_settings_as_they_were():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from rateq.models import quiet_loading

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_loading():
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled() == bars


# -- placement over devices (accelerate) ------------------------------------------------------------------------
def test_a_random_model_spreads_over_a_device_map_and_calibrates(tmp_path):
    from rateq.models import input_device, weight_devices

    split = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = random_model("qwen3-0.6b", device_map=split, offload_folder=tmp_path, num_hidden_layers=2,
                         hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=256)
    assert weight_devices(model) == ["disk", "cpu"] and input_device(model) == torch.device("cpu")
    assert any(p.device.type == "meta" for p in model.parameters()) and any(tmp_path.iterdir())
    norm = model.model.norm.weight
    assert norm.device.type == "cpu" and bool((norm == 1).all())
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    curves = rateq.calibrate(model, None, ids, bits=(2, 4), quantizers=["minmax-g16-fp16"])
    assert torch.isfinite(curves.distortion).all() and curves.calibration["devices"] == ["disk", "cpu"]


def test_device_map_auto_on_the_meta_free_cpu_places_every_layer(tmp_path):
    model = random_model("llama-3.2-1b", device_map="auto", max_memory={"cpu": "1GiB"}, num_hidden_layers=2,
                         hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=256)
    assert set(model.hf_device_map.values()) <= {"cpu", "disk"}
    assert (model(torch.randint(0, 256, (1, 8))).logits.isfinite()).all()


def test_the_70b_alias_has_llama_3_1_70b_shape():
    fp = rateq.fingerprint(random_model("llama-3.1-70b", device="meta"))
    assert (fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim) == ("llama", 80, 8, 128)


def test_a_device_map_file_is_read_and_checked(tmp_path):
    from rateq.models import check_device_map

    path = tmp_path / "map.json"
    path.write_text('{"model": "cpu", "lm_head": "disk"}')
    assert check_device_map(str(path)) == {"model": "cpu", "lm_head": "disk"}
    assert check_device_map("auto") == "auto" and check_device_map(None) is None
    path.write_text('{"model": "meta"}')
    with pytest.raises(rateq.RateQError, match="meta device holds no weights"):
        check_device_map(path)


def test_device_and_device_map_are_one_choice():
    with pytest.raises(rateq.RateQError, match="not both"):
        rateq.load_model("smollm2-135m", device="meta", device_map="auto")
