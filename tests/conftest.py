"""Shared fixtures: tiny random models of several architectures, and the bundled real model."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, head_dim=16,
            vocab_size=256, max_position_embeddings=512)


def build_tiny(arch: str = "llama", *, kv_heads: int = 2, seed: int = 0, **overrides):
    """A tiny random causal LM of `arch` (llama, qwen3, qwen2, mistral, gemma3) in fp32, eval mode.

    kv_heads=4 gives MHA (as many KV heads as query heads), 2 or 1 GQA. gemma3 alternates sliding-window
    layers (window 16) with full ones.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kw = dict(TINY, num_key_value_heads=kv_heads)
    kw.update(overrides)
    if arch == "llama":
        config = LlamaConfig(**kw)
    elif arch == "qwen3":
        config = Qwen3Config(**kw)
    elif arch == "qwen2":
        kw.pop("head_dim")
        config = Qwen2Config(**kw)
    elif arch == "mistral":
        config = MistralConfig(**kw, sliding_window=None)
    elif arch == "gemma3":
        kw.setdefault("sliding_window", 16)
        kw.setdefault("layer_types", ["sliding_attention", "full_attention", "sliding_attention"][: kw["num_hidden_layers"]])
        config = Gemma3TextConfig(**kw)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    model.rateq_name = f"tiny-{arch}"
    return model


@pytest.fixture(scope="session")
def tiny():
    """Factory fixture: `tiny("qwen3", kv_heads=4)`."""
    return build_tiny


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the bundled default model, smollm2-135m, loaded once per test session."""
    import rateq

    return rateq.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def reference_windows(smol):
    """The reference evaluation windows (results/reference.md): 4 × 1024 consecutive tokens of Pride and Prejudice
    from character 100000."""
    import rateq

    return rateq.text_windows(smol[1], "austen-pp", 4, 1024, seed=None, char_start=100_000)


def read_png(path) -> tuple[int, int]:
    """`(width, height)` of the PNG at `path`, after checking that it is one: the PNG signature, the IHDR chunk
    first, a last IEND chunk, and pixels that decode (Pillow) to a drawing of more than a few colours."""
    import struct

    from PIL import Image

    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR"), f"{path}: no IHDR chunk first"
    assert data[-8:-4] == b"IEND", f"{path}: truncated (no IEND chunk last)"
    with Image.open(path) as image:
        image.load()
        assert image.size == (width, height)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 16, f"{path} is nearly blank ({len(colours)} colours)"
    return width, height


@pytest.fixture(scope="session")
def png_size():
    """`png_size(path) -> (width, height)` of a valid, non-blank PNG (see `read_png`)."""
    return read_png
