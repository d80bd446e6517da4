"""Serving engines: the KV-cache formats each one runs, the rules its cache follows, and a writer from a `Plan` to
the engine's own file or flags.

An engine stores keys and values in formats of its own, each at one code width — rateq's engine formats
(`rateq.quant.spec.ENGINE_FORMATS`), calibrated like any quantizer — and lays its cache out per layer or per
model. `solve_for` solves curves under one engine's rules, so that `Engine.write` represents every plan it
returns; any other plan (`rateq.solve`, made by hand) is written only if it obeys them, and refused otherwise
with one line naming the layer, head and role that break which rule.

| engine | formats | 16-bit units | tie | keys and values | writes |
| --- | --- | --- | --- | --- | --- |
| `modelopt` | fp8, fp8_tensor, nvfp4 | no | layer | FP8, NVFP4 or FP8_K_NVFP4_V per layer (keys ≥ values) | hf_quant_config.json |
| `vllm` | fp8, fp8_tensor, fp8_head, nvfp4 | skipped layers | layer-kv | alike; one format for every quantized layer | launch flags |
| `sglang` | fp8, fp8_tensor, nvfp4 | bf16 layers | layer-kv | alike; any format per layer | launch flags |
| `trtllm` | fp8, fp8_tensor, nvfp4 | bf16 layers | layer-kv | alike; any format per layer | `--extra_llm_api_options` YAML |
| `llamacpp` | q8_0, q4_0, q4_1, q5_0, iq4_nl | f16 | model | free; one type each for every layer | launch flags |

The schemas, as their projects publish them:

- ModelOpt's `hf_quant_config.json`: `{"producer": {"name": "modelopt", …}, "quantization": {…}}` with
  `kv_cache_quant_algo` one of `FP8`, `NVFP4`, `FP8_K_NVFP4_V` (FP8 keys, NVFP4 values) or `MIXED_PRECISION`,
  the per-layer map `kv_cache_quantized_layers` (`{"model.layers.0.self_attn": {"quant_algo": "FP8"}, …}`, keyed
  by attention module) and `kv_cache_schema_version` 1; a KV-only export keeps the top-level `quant_algo`
  `MIXED_PRECISION` with empty `quantized_layers` (NVIDIA/Model-Optimizer#2272: modelopt/torch/export/
  quant_utils.py, tests/unit/torch/export/test_convert_hf_config.py). vLLM reads the map layer by layer, full
  FP8 or NVFP4 layers only (vllm-project/vllm#56116; FP8_K_NVFP4_V is ModelOpt's own algo for FP8 keys with
  NVFP4 values).
- vLLM: `--kv-cache-dtype` (`CacheConfig.cache_dtype`: `auto`, `fp8_e4m3`, `nvfp4`, …) for every layer, and
  `--kv-cache-dtype-skip-layers` (layer indices kept at the model's dtype), vllm/config/cache.py.
- SGLang: `--kv-cache-dtype` (`fp8_e4m3`, `fp4_e2m1`: e2m1 codes with one 8-bit scale per 16, `bf16`;
  docs/advanced_features/quantized_kv_cache.md) and `--kv-cache-per-layer-dtype` ranges such as
  `0-1:fp8_e4m3,62-63:bf16` for the layers that differ (sgl-project/sglang#15420, #17530).
- TensorRT-LLM: `KvCacheConfig.dtype` (`fp8`, `nvfp4`; trtllm-serve `--kv_cache_dtype`, NVIDIA/TensorRT-LLM#11487)
  and its per-layer ranges such as `0-3:fp8,4-35:nvfp4` over every layer (NVIDIA/TensorRT-LLM#13695).
- llama.cpp: `-ctk/--cache-type-k` and `-ctv/--cache-type-v` (`f16`, `bf16`, `q8_0`, `q4_0`, `q4_1`, `iq4_nl`,
  `q5_0`, `q5_1`; tools/server/README.md), one type for every layer; a quantized V cache needs flash attention.

Static scales. `fp8_tensor` is FP8 with one calibrated scale per layer for keys and one for values, the
`k_scale` / `v_scale` every engine above loads from the checkpoint (plain `fp8` is the same with scale 1, what an
engine runs when the checkpoint has none); `fp8_head` has one per KV head, compressed-tensors' `attn_head`
strategy (scales of shape `(num_kv_heads, 1, 1)`, `kv_cache_scheme` `{"type": "float", "num_bits": 8,
"strategy": "attn_head", "symmetric": true, "dynamic": false}`), which vLLM reads
(`CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`: float, 8 bits, strategy `tensor` or `attn_head`,
symmetric). `write_scales` writes them as checkpoint tensors: ModelOpt's names
`model.layers.{i}.self_attn.k_proj.k_scale` / `v_proj.v_scale` for ModelOpt, SGLang and TensorRT-LLM, and
`model.layers.{i}.self_attn.k_scale` / `v_scale` for vLLM (its `maybe_remap_kv_scale_name` maps both forms onto
the attention layer); a layer whose format has no calibrated scale gets 1.

Engines quantize every cached token: they keep no full-precision residual window or sinks, so a plan meant for
one is best solved from curves calibrated without them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .curves import Curves
from .errors import RateQError
from .io import atomic_write, write_safetensors
from .plan import Plan
from .quant.spec import ENGINE_FORMATS, FULL_PRECISION_BITS, QuantSpec, parse_spec
from .quant.static import scale_key
from .solve.problem import TIES

FP16 = "16"  # a unit's format when it is stored unquantized
# ModelOpt's per-layer algos: (key format, value format) → quant_algo.
MODELOPT_ALGOS = {("fp8", "fp8"): "FP8", ("nvfp4", "nvfp4"): "NVFP4", ("fp8", "nvfp4"): "FP8_K_NVFP4_V"}
MODELOPT_SCHEMA_VERSION = 1
# Model types whose attention modules are `model.layers.{i}.self_attn` (what ModelOpt's map is keyed by).
SELF_ATTN_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")
# The ties a tie implies: a plan honouring the key honours every tie in its value.
_IMPLIES = {None: (None,), "layer": (None, "layer"), "layer-kv": (None, "layer", "layer-kv"),
            "model": (None, "layer", "model")}
_ROLES = ("keys", "values")


@dataclass(frozen=True, eq=False)
class Engine:
    """What one serving engine runs, and how a plan is written for it.

    - `formats`: the spec ids it stores (`fp8`, `nvfp4`, `q8_0`, …); `names` maps each, and `FP16` (a unit
      kept unquantized) where the engine allows it, to the engine's own name for it.
    - `tie`: how its cache is laid out (`rateq.solve`'s ties): `layer` — a layer's KV heads share one format
      for keys and one for values; `layer-kv` — keys and values too; `model` — one for every layer.
    - `keys_at_least_values`: keys always take at least their values' bits (ModelOpt's FP8_K_NVFP4_V).
    - `one_format`: every quantized layer takes the same format (a single `--kv-cache-dtype`).
    """

    name: str
    title: str
    formats: tuple[str, ...]
    names: dict
    tie: str
    keys_at_least_values: bool
    one_format: bool
    writes: str  # what `write` returns, in words
    rule: str  # the K/V rule, in words
    _write: Callable[["Engine", list[tuple[str, str]], Plan], str]

    @property
    def allow_fp16(self) -> bool:
        """Whether units may stay unquantized (16 bits)."""
        return FP16 in self.names

    def name_of(self, fmt: str) -> str:
        return self.names[fmt]

    # -- the rules -------------------------------------------------------------------------------------------
    def options(self, *, tie: str | None = None, allow_fp16: bool | None = None,
                keys_at_least_values: bool | None = None, quantizers=None, devices=None,
                per_layer_budget=None, **solve_kw) -> dict:
        """`rateq.solve`'s keyword arguments for this engine: its tie, its K/V rule and fp16 choice, merged with
        the caller's where they agree (a stricter tie, keys ≥ values, no fp16, fewer formats); one RateQError
        where they do not. Needs no curves."""
        if tie is not None and tie not in TIES:
            raise RateQError(f"tie must be None, {', '.join(map(repr, TIES[:-1]))} or {TIES[-1]!r}, got {tie!r}")
        if tie is not None and self.tie not in _IMPLIES[tie]:
            raise RateQError(f"{self.name} runs tie={self.tie!r} ({self._tie_words()}); tie={tie!r} does not keep "
                             f"to it: leave the tie out or use {self._ties_allowed()}")
        if allow_fp16 and not self.allow_fp16:
            raise RateQError(f"{self.name} quantizes every layer in {', '.join(self.formats)}: unquantized 16-bit "
                             "units are not available with it")
        if (tie or self.tie) == "model" and (devices or per_layer_budget is not None):
            who = self.name if self.tie == "model" else "tie='model'"
            raise RateQError(f"{who} sets one format for every layer's keys and one for every layer's values: "
                             "per-device caps and per-layer budgets are not available with it")
        if quantizers is not None:
            quantizers = [quantizers] if isinstance(quantizers, (str, QuantSpec)) else list(quantizers)
            for q in quantizers:
                qid = q.id if isinstance(q, QuantSpec) else parse_spec(str(q)).id
                if qid not in self.formats:
                    raise RateQError(f"quantizer {qid} is not a {self.name} format; it runs "
                                     f"{', '.join(self.formats)}")
        return dict(solve_kw, tie=tie or self.tie, quantizers=quantizers, devices=devices,
                    per_layer_budget=per_layer_budget,
                    allow_fp16=self.allow_fp16 if allow_fp16 is None else bool(allow_fp16),
                    keys_at_least_values=self.keys_at_least_values or bool(keys_at_least_values))

    def layer_formats(self, plan: Plan) -> list[tuple[str, str]]:
        """Every layer's (key format, value format) — spec ids, or `FP16` — when `plan` obeys this engine's
        rules; else a one-line RateQError naming the layer, head and role and the rule it breaks."""
        if not isinstance(plan, Plan):
            raise RateQError(f"{self.name} writes a rateq.Plan, got {type(plan).__name__}")
        L, H = plan.num_layers, plan.num_kv_heads
        cant = f"{self.name} cannot run this plan:"
        fmt = [[[None] * H for _ in range(2)] for _ in range(L)]
        for l in range(L):
            for r, role in enumerate("kv"):
                for h in range(H):
                    bits, spec = int(plan.bits(role)[l, h]), plan.spec(l, h, role)
                    if bits == FULL_PRECISION_BITS:
                        if not self.allow_fp16:
                            raise RateQError(f"{cant} layer {l} head {h} {_ROLES[r]} are unquantized (16 bits); "
                                             f"it quantizes every layer in {', '.join(self.formats)}")
                        fmt[l][r][h] = FP16
                    elif spec.id in self.formats:
                        fmt[l][r][h] = spec.id
                    else:
                        raise RateQError(f"{cant} layer {l} head {h} {_ROLES[r]} use {spec.id} at {bits} bits, "
                                         f"not one of its formats ({', '.join(self.formats)}); solve with "
                                         f"--engine {self.name}")
                if len(set(fmt[l][r])) > 1:
                    h = next(h for h in range(H) if fmt[l][r][h] != fmt[l][r][0])
                    raise RateQError(f"{cant} layer {l} {_ROLES[r]}: head 0 {_shown(fmt[l][r][0])}, head {h} "
                                     f"{_shown(fmt[l][r][h])}; it stores a layer's {_ROLES[r]} in one format")
        layers = [(f[0][0], f[1][0]) for f in fmt]
        for l, (k, v) in enumerate(layers):
            if self.tie == "layer-kv" and k != v:
                raise RateQError(f"{cant} layer {l}: keys {_shown(k)}, values {_shown(v)}; {self.rule}")
            if self.keys_at_least_values and _bits(k) < _bits(v):
                raise RateQError(f"{cant} layer {l}: keys {_shown(k)} below values {_shown(v)}; {self.rule}")
        if self.tie == "model":
            for r in range(2):
                l = next((l for l in range(L) if layers[l][r] != layers[0][r]), None)
                if l is not None:
                    raise RateQError(f"{cant} {_ROLES[r]}: layer 0 {_shown(layers[0][r])}, layer {l} "
                                     f"{_shown(layers[l][r])}; {self.rule}")
        if self.one_format:
            used = sorted({k for k, _ in layers if k != FP16})
            if len(used) > 1:
                first = {f: next(l for l, (k, _) in enumerate(layers) if k == f) for f in used}
                raise RateQError(f"{cant} " + " and ".join(f"layer {first[f]} {f}" for f in used) + f"; {self.rule}")
        return layers

    def write(self, plan: Plan) -> str:
        """The engine's own file or flags for `plan` (text ending in a newline), or a one-line RateQError naming
        what the engine cannot represent."""
        return self._write(self, self.layer_formats(plan), plan)

    # -- words -----------------------------------------------------------------------------------------------
    def _tie_words(self) -> str:
        return {"layer": "every KV head of a layer shares one format for keys and one for values",
                "layer-kv": "every KV head of a layer shares one format for keys and values",
                "model": "every layer shares one format for keys and one for values"}[self.tie]

    def _ties_allowed(self) -> str:
        return " or ".join(repr(t) for t in TIES if self.tie in _IMPLIES[t])

    def describe(self) -> str:
        """What this engine runs, in a few lines."""
        fmts = ", ".join(f"{f} (`{self.names[f]}`, {ENGINE_FORMATS[f]} code bits, "
                         f"{parse_spec(f).bits_per_element(ENGINE_FORMATS[f]):g} effective)" for f in self.formats)
        fp16 = f"unquantized units: `{self.names[FP16]}`" if self.allow_fp16 else "every unit quantized"
        return "\n".join([
            f"{self.name}: {self.title}",
            f"  formats: {fmts}; {fp16}",
            f"  tie: {self.tie!r}: {self._tie_words()}",
            f"  keys and values: {self.rule}",
            f"  writes: {self.writes}",
        ])


def _bits(fmt: str) -> int:
    return FULL_PRECISION_BITS if fmt == FP16 else ENGINE_FORMATS[fmt]


def _shown(fmt: str) -> str:
    return "unquantized (16 bits)" if fmt == FP16 else f"{fmt} ({ENGINE_FORMATS[fmt]} bits)"


def _ranges(names: list[str], layers) -> str:
    """`0-3:fp8,7-7:nvfp4`: runs of consecutive `layers` (sorted indices) with their names. Every range is
    written `first-last`, a single layer too, the form every per-layer parser reads."""
    runs: list[list] = []
    for l in layers:
        if runs and runs[-1][1] == l - 1 and runs[-1][2] == names[l]:
            runs[-1][1] = l
        else:
            runs.append([l, l, names[l]])
    return ",".join(f"{a}-{b}:{n}" for a, b, n in runs)


# -- writers -----------------------------------------------------------------------------------------------------
def attention_modules(plan: Plan) -> list[str]:
    """Every layer's attention module name (`model.layers.{i}.self_attn`), from the plan's model fingerprint."""
    arch = plan.model.architecture
    if arch not in SELF_ATTN_MODELS:
        raise RateQError(f"the attention modules of {arch} models are not known to rateq (it names those of "
                         f"{', '.join(SELF_ATTN_MODELS)}: model.layers.<i>.self_attn)")
    return [f"model.layers.{l}.self_attn" for l in range(plan.num_layers)]


def _fp8_kind(fmt: str) -> str:
    """`fp8` for every FP8 variant (unit or calibrated scale): what a per-layer algo or dtype name sees."""
    return "fp8" if fmt.startswith("fp8") else fmt


def _write_modelopt(engine: Engine, layers: list[tuple[str, str]], plan: Plan) -> str:
    from . import __version__

    modules = attention_modules(plan)
    algos = [MODELOPT_ALGOS[(_fp8_kind(k), _fp8_kind(v))] for k, v in layers]
    quantization = {
        # KV-only, as ModelOpt exports it: no weight is quantized, and the top-level quant_algo is still one
        # vLLM's reader accepts (it refuses a missing one).
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": {},
        "kv_cache_quant_algo": algos[0] if len(set(algos)) == 1 else "MIXED_PRECISION",
        "kv_cache_quantized_layers": {m: {"quant_algo": a} for m, a in zip(modules, algos)},
        "kv_cache_schema_version": MODELOPT_SCHEMA_VERSION,
    }
    # Readers pick ModelOpt's parser by the producer's name (vLLM's _normalize_quantization_config); the version
    # says which program wrote the file.
    doc = {"producer": {"name": "modelopt", "version": f"rateq-{__version__}"}, "quantization": quantization}
    return json.dumps(doc, indent=2) + "\n"


def _write_vllm(engine: Engine, layers: list[tuple[str, str]], plan: Plan) -> str:
    used = sorted({k for k, _ in layers if k != FP16})
    if not used:
        return "--kv-cache-dtype auto\n"
    flags = ["--kv-cache-dtype", engine.name_of(used[0])]
    skip = [str(l) for l, (k, _) in enumerate(layers) if k == FP16]
    if skip:
        flags += ["--kv-cache-dtype-skip-layers", *skip]
    return " ".join(flags) + "\n"


def _write_sglang(engine: Engine, layers: list[tuple[str, str]], plan: Plan) -> str:
    names = [engine.name_of(k) for k, _ in layers]
    default = Counter(names).most_common(1)[0][0]  # the most common name, the first such layer's on a tie
    flags = ["--kv-cache-dtype", default]
    others = [l for l, n in enumerate(names) if n != default]
    if others:
        flags += ["--kv-cache-per-layer-dtype", _ranges(names, others)]
    return " ".join(flags) + "\n"


def _write_trtllm(engine: Engine, layers: list[tuple[str, str]], plan: Plan) -> str:
    names = [engine.name_of(k) for k, _ in layers]
    dtype = names[0] if len(set(names)) == 1 else _ranges(names, range(len(names)))
    return f'kv_cache_config:\n  dtype: "{dtype}"\n'


def _write_llamacpp(engine: Engine, layers: list[tuple[str, str]], plan: Plan) -> str:
    k, v = layers[0]
    return f"--cache-type-k {engine.name_of(k)} --cache-type-v {engine.name_of(v)}\n"


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine(
        name="modelopt", title="NVIDIA ModelOpt's hf_quant_config.json (per-layer KV formats, read by vLLM)",
        formats=("fp8", "fp8_tensor", "nvfp4"), names={"fp8": "FP8", "fp8_tensor": "FP8", "nvfp4": "NVFP4"},
        tie="layer",
        keys_at_least_values=True, one_format=False,
        writes="hf_quant_config.json: kv_cache_quant_algo FP8, NVFP4, FP8_K_NVFP4_V or MIXED_PRECISION with "
               "kv_cache_quantized_layers per attention module (schema version 1)",
        rule="ModelOpt's per-layer algos are FP8, NVFP4 and FP8_K_NVFP4_V (keys at least values)",
        _write=_write_modelopt),
    Engine(
        name="vllm", title="vLLM's --kv-cache-dtype and --kv-cache-dtype-skip-layers",
        formats=("fp8", "fp8_tensor", "fp8_head", "nvfp4"),
        names={"fp8": "fp8_e4m3", "fp8_tensor": "fp8_e4m3", "fp8_head": "fp8_e4m3", "nvfp4": "nvfp4", FP16: "auto"},
        tie="layer-kv",
        keys_at_least_values=False, one_format=True,
        writes="launch flags: --kv-cache-dtype D [--kv-cache-dtype-skip-layers I …] (skipped layers unquantized)",
        rule="vLLM's --kv-cache-dtype is one format for keys and values of every quantized layer (per-layer "
             "formats: solve for modelopt and serve its hf_quant_config.json)",
        _write=_write_vllm),
    Engine(
        name="sglang", title="SGLang's --kv-cache-dtype and --kv-cache-per-layer-dtype",
        formats=("fp8", "fp8_tensor", "nvfp4"),
        names={"fp8": "fp8_e4m3", "fp8_tensor": "fp8_e4m3", "nvfp4": "fp4_e2m1", FP16: "bf16"}, tie="layer-kv",
        keys_at_least_values=False, one_format=False,
        writes="launch flags: --kv-cache-dtype D [--kv-cache-per-layer-dtype FIRST-LAST:D,…] (the other layers)",
        rule="SGLang's per-layer dtype sets a layer's keys and values alike",
        _write=_write_sglang),
    Engine(
        name="trtllm", title="TensorRT-LLM's KvCacheConfig.dtype (per-layer ranges)",
        formats=("fp8", "fp8_tensor", "nvfp4"), names={"fp8": "fp8", "fp8_tensor": "fp8", "nvfp4": "nvfp4", FP16: "bf16"},
        tie="layer-kv",
        keys_at_least_values=False, one_format=False,
        writes="--extra_llm_api_options YAML: kv_cache_config.dtype, one dtype or FIRST-LAST:D ranges over "
               "every layer",
        rule="TensorRT-LLM's KvCacheConfig.dtype sets a layer's keys and values alike",
        _write=_write_trtllm),
    Engine(
        name="llamacpp", title="llama.cpp's --cache-type-k and --cache-type-v",
        formats=("q8_0", "q4_0", "q4_1", "q5_0", "iq4_nl"),
        names={"q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "iq4_nl": "iq4_nl", FP16: "f16"},
        tie="model", keys_at_least_values=False, one_format=False,
        writes="launch flags: --cache-type-k T --cache-type-v T (a quantized V cache needs flash attention)",
        rule="llama.cpp's --cache-type-k and --cache-type-v are one type each for every layer (keys and values "
             "free)",
        _write=_write_llamacpp),
)}
EXPORT_FORMATS = ("json", *ENGINES)


def get_engine(engine: str | Engine) -> Engine:
    """The `Engine` of a name (`modelopt`, `vllm`, `sglang`, `trtllm`, `llamacpp`), or a RateQError listing them."""
    if isinstance(engine, Engine):
        return engine
    if engine not in ENGINES:
        raise RateQError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return ENGINES[engine]


def describe(engine: str | Engine) -> str:
    """What `engine` runs: formats, unquantized units, tie, K/V rule and what is written for it."""
    return get_engine(engine).describe()


# -- solving -----------------------------------------------------------------------------------------------------
def engine_quantizers(curves: Curves, engine: str | Engine) -> list[QuantSpec]:
    """The engine's formats the curves hold at their own width; a RateQError naming what to calibrate if none."""
    eng = get_engine(engine)
    held = [q for q in curves.quantizers if q.id in eng.formats and q.fixed_bits in curves.bits]
    if held:
        return held
    lacking = [f"{q.id} lacks its {q.fixed_bits} bits" for q in curves.quantizers
               if q.id in eng.formats and q.fixed_bits not in curves.bits]
    have = ", ".join(q.id for q in curves.quantizers)
    raise RateQError(f"the curves hold none of {eng.name}'s formats ({', '.join(eng.formats)}) at their widths "
                     f"(they have {have} at bits {list(curves.bits)}{'; ' + '; '.join(lacking) if lacking else ''}); "
                     f"calibrate them: rateq calibrate --engine {eng.name}")


def solve_for(curves: Curves, budget: float, engine: str | Engine, **kw) -> Plan:
    """`rateq.solve` under one engine's rules: only its formats the curves hold, its tie, its K/V rule and its
    choice of unquantized units, so that `engine.write(plan)` represents the plan. `kw` are `rateq.solve`'s
    keyword arguments, taken where they agree with the engine (`Engine.options`). An engine that runs one format
    for the whole model (vLLM) is solved once per format, keeping the least predicted distortion. The plan's
    `solver` facts record the engine."""
    from .solve import solve

    eng = get_engine(engine)
    if not isinstance(curves, Curves):
        raise RateQError(f"solve_for needs a rateq.Curves, got {type(curves).__name__}")
    opts = eng.options(**kw)
    held = engine_quantizers(curves, eng)
    if opts["quantizers"] is not None:
        asked = {q.id if isinstance(q, QuantSpec) else parse_spec(str(q)).id for q in opts["quantizers"]}
        missing = sorted(asked - {q.id for q in held})
        if missing:
            raise RateQError(f"quantizers {', '.join(missing)} are not in the curves at their widths; "
                             f"they hold {', '.join(q.id for q in held)} of {eng.name}'s formats")
        held = [q for q in held if q.id in asked]
    groups = [[q] for q in held] if eng.one_format and len(held) > 1 else [held]
    plans, errors = [], []
    for specs in groups:
        try:
            plans.append(solve(curves, budget, **{**opts, "quantizers": specs}))
        except RateQError as exc:
            errors.append((specs[0].id, exc))
    if not plans:
        if len(errors) == 1:
            raise errors[0][1]
        raise RateQError(f"{eng.name} runs one format for every quantized layer and none meets this: "
                         + "; ".join(f"{q}: {exc}" for q, exc in errors))
    plan = min(plans, key=lambda p: p.solver["predicted_distortion"])
    plan.solver["engine"] = eng.name
    eng.layer_formats(plan)  # the solver keeps every rule; only units the caller fixed against one are refused
    return plan


# -- static scales -----------------------------------------------------------------------------------------------
def scale_tensors(plan: Plan, engine: str | Engine) -> dict:
    """The checkpoint tensors of `plan`'s static scales for `engine` (module doc): per layer a key and a value
    scale, fp32 scalars, or `(num_kv_heads, 1, 1)` for `fp8_head`; 1 where a layer's format has none. Empty when
    the plan uses no static-scale format. Refused (RateQError) where the engine cannot run the plan."""
    eng = get_engine(engine)
    layers = eng.layer_formats(plan)
    used = {f for kv in layers for f in kv if f != FP16}
    if not any(parse_spec(f).static_scale for f in used):
        return {}
    modules = attention_modules(plan)
    out = {}
    for l, (module, kv) in enumerate(zip(modules, layers)):
        for r, (role, fmt) in enumerate(zip("kv", kv)):
            spec = None if fmt == FP16 else parse_spec(fmt)
            if spec is not None and spec.static_scale:
                s = plan.params[scale_key(spec)][l, :, r].to(torch.float32)
            else:
                s = torch.ones(plan.num_kv_heads)
            t = s.reshape(-1, 1, 1).clone() if spec is not None and spec.static_scale == "head" else s[:1].reshape(())
            name = f"{module}.{role}_scale" if eng.name == "vllm" else f"{module}.{role}_proj.{role}_scale"
            out[name] = t.contiguous()
    return out


def write_scales(plan: Plan, engine: str | Engine, path: str | os.PathLike) -> Path:
    """Write `scale_tensors(plan, engine)` as a safetensors file to add to the checkpoint; a RateQError when the
    plan has no static scales (nothing to write) or the engine cannot run it."""
    tensors = scale_tensors(plan, engine)
    if not tensors:
        raise RateQError("the plan uses no static-scale format (fp8_tensor, fp8_head): it has no scales to write")
    meta = {"format": "rateq.kv_scales", "engine": get_engine(engine).name}
    scheme = kv_cache_scheme(plan)
    if scheme is not None:
        meta["kv_cache_scheme"] = json.dumps(scheme)
    return write_safetensors(path, tensors, meta)


def kv_cache_scheme(plan: Plan) -> dict | None:
    """compressed-tensors' `kv_cache_scheme` for a plan of FP8 with static scales (`quantization_config` of the
    checkpoint's config.json): strategy `attn_head` for `fp8_head`, `tensor` for `fp8_tensor`; None otherwise."""
    kinds = {q.kind for q in plan.quantizers if q.static_scale}
    if not kinds or not kinds <= {"fp8_head", "fp8_tensor"}:
        return None
    return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
            "strategy": "attn_head" if "fp8_head" in kinds else "tensor"}


# -- files -------------------------------------------------------------------------------------------------------
def write_engine_file(plan: Plan, engine: str | Engine, path: str | os.PathLike) -> Path:
    """Write `engine.write(plan)` to `path` atomically; nothing is written when the engine refuses the plan."""
    eng = get_engine(engine)
    text = eng.write(plan)
    path = Path(path)
    with atomic_write(path, f"{eng.name} export") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


__all__ = ["ENGINES", "EXPORT_FORMATS", "Engine", "FP16", "attention_modules", "describe", "engine_quantizers",
           "get_engine", "kv_cache_scheme", "scale_tensors", "solve_for", "write_engine_file", "write_scales"]
