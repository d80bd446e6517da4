"""Plans engines can run: every export checked against the engine's published schema and read back into per-layer
formats, `solve_for` plans that keep every engine's rules, and one-line refusals (library and command line)."""

from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import pytest
import torch
import yaml

import rateq
from rateq import RateQError, parse_spec
from rateq.curves import Curves
from rateq.engines import ENGINES, FP16, describe, get_engine, solve_for
from rateq.models import ModelFingerprint
from rateq.quant.spec import ENGINE_FORMATS, KIVI
from rateq.quant.static import scale_key

L, H = 6, 2
MODEL = ModelFingerprint("tiny-llama", "llama", L, H, 64)


def make_plan(keys, values, model=MODEL, heads=None):
    """A plan from per-layer formats (spec ids, or FP16 for unquantized); `heads` overrides units:
    `{(layer, head, "k"): fmt}`."""
    fmts = {(l, h, r): f for l in range(model.num_layers) for h in range(model.num_kv_heads)
            for r, f in (("k", keys[l]), ("v", values[l]))}
    fmts.update(heads or {})
    ids = sorted({f for f in fmts.values() if f != FP16}) or ["fp8"]
    specs = [parse_spec(i) for i in ids]
    shape = (model.num_layers, model.num_kv_heads)
    bits = {r: torch.zeros(shape, dtype=torch.int64) for r in "kv"}
    qid = {r: torch.zeros(shape, dtype=torch.int64) for r in "kv"}
    for (l, h, r), f in fmts.items():
        if f == FP16:
            bits[r][l, h] = 16
        else:
            spec = specs[ids.index(f)]
            bits[r][l, h], qid[r][l, h] = spec.fixed_bits, ids.index(f)
    return rateq.Plan(bits["k"], bits["v"], qid["k"], qid["v"], specs, model,
                      params=static_scales(specs, model.num_layers, model.num_kv_heads))


def static_scales(specs, L, H):
    """Distinct calibrated-looking scales `(L, H, 2)` for the static-scale formats among `specs` (equal across a
    layer's heads for per-layer ones)."""
    out = {}
    for q in specs:
        if q.static_scale:
            s = 0.01 * torch.arange(1, L + 1, dtype=torch.float32).view(L, 1, 1) * torch.tensor([1.0, 2.0])
            s = s.expand(L, H, 2).clone()
            if q.static_scale == "head":
                s *= torch.arange(1, H + 1, dtype=torch.float32).view(1, H, 1)
            out[scale_key(q)] = s
    return out


def kivi_plan():
    return rateq.Plan.uniform(MODEL, 2)


def engine_curves(ids, *, L=L, H=H, bits=(2, 4, 5, 8), seed=0, extra=(KIVI,)):
    """Random monotone curves over engine formats `ids` (plus `extra` quantizers), +inf at widths a format is not
    stored at (as calibration writes them)."""
    rng = np.random.default_rng(seed)
    specs = [parse_spec(i) for i in ids] + list(extra)
    d = np.sort(rng.lognormal(0, 1.5, (L, H, 2, len(specs), len(bits))), -1)[..., ::-1].copy()
    for qi, q in enumerate(specs):
        for bi, b in enumerate(bits):
            if not q.allows_bits(b):
                d[:, :, :, qi, bi] = np.inf
    counts = rng.integers(64, 1024, (L, H, 2)).astype(np.float64)
    return Curves(torch.tensor(d), bits, specs, torch.tensor(counts), "output",
                  ModelFingerprint("tiny-llama", "llama", L, H, 64), {"data": "synthetic"},
                  params=static_scales(specs, L, H))


def unit_formats(plan):
    """`[(layer, head, role, fmt)]` of every unit, read from the plan itself."""
    return [(l, h, r, FP16 if int(plan.bits(r)[l, h]) == 16 else plan.spec(l, h, r).id)
            for l in range(plan.num_layers) for h in range(plan.num_kv_heads) for r in "kv"]


def layer_formats_of(plan):
    """`[(key format, value format)]` per layer, asserting every head of a layer agrees."""
    out = []
    for l in range(plan.num_layers):
        kv = []
        for r in "kv":
            fmts = {f for (ll, _, rr, f) in unit_formats(plan) if ll == l and rr == r}
            assert len(fmts) == 1, f"layer {l} {r}: heads differ {fmts}"
            kv.append(fmts.pop())
        out.append(tuple(kv))
    return out


def parse_ranges(text, num_layers=None):
    """`{layer: name}` from `first-last:name,…` (also `layer:name`), as SGLang's and TensorRT-LLM's per-layer dtype
    strings read; with `num_layers`, every layer must be named exactly once."""
    out = {}
    for item in text.split(","):
        span, name = item.split(":")
        first, _, last = span.partition("-")
        for l in range(int(first), int(last or first) + 1):
            assert l not in out, f"layer {l} named twice in {text!r}"
            out[l] = name
    if num_layers is not None:
        assert sorted(out) == list(range(num_layers)), f"{text!r} does not cover layers 0..{num_layers - 1}"
    return out


def flags(text):
    """`{flag: [values]}` of a launch command line."""
    assert text.endswith("\n") and text.count("\n") == 1
    out, key = {}, None
    for tok in shlex.split(text):
        if tok.startswith("--"):
            key = tok
            out[key] = []
        else:
            out[key].append(tok)
    return out


MIXED_KEYS = ["fp8", "fp8", "nvfp4", "fp8", "nvfp4", "nvfp4"]
MIXED_VALUES = ["fp8", "nvfp4", "nvfp4", "fp8", "nvfp4", "nvfp4"]


# -- exports against the published schemas --------------------------------------------------------------------
def test_modelopt_writes_hf_quant_config_with_per_layer_kv_formats():
    # Schema: ModelOpt's KV-only export (NVIDIA/Model-Optimizer#2272, modelopt/torch/export/quant_utils.py and
    # tests/unit/torch/export/test_convert_hf_config.py): producer {name, version}; quantization.quant_algo
    # MIXED_PRECISION with empty quantized_layers; kv_cache_quant_algo MIXED_PRECISION; kv_cache_quantized_layers
    # {"model.layers.<i>.self_attn": {"quant_algo": FP8 | NVFP4 | FP8_K_NVFP4_V}}; kv_cache_schema_version 1.
    plan = make_plan(MIXED_KEYS, MIXED_VALUES)
    doc = json.loads(ENGINES["modelopt"].write(plan))
    assert set(doc) == {"producer", "quantization"}
    assert doc["producer"]["name"] == "modelopt" and doc["producer"]["version"] == f"rateq-{rateq.__version__}"
    q = doc["quantization"]
    assert set(q) == {"quant_algo", "quantized_layers", "kv_cache_quant_algo", "kv_cache_quantized_layers",
                      "kv_cache_schema_version"}
    assert q["quant_algo"] == "MIXED_PRECISION" and q["quantized_layers"] == {}
    assert q["kv_cache_quant_algo"] == "MIXED_PRECISION" and q["kv_cache_schema_version"] == 1
    layers = q["kv_cache_quantized_layers"]
    assert list(layers) == [f"model.layers.{l}.self_attn" for l in range(L)]
    assert all(set(v) == {"quant_algo"} for v in layers.values())
    # Round trip: ModelOpt's algo names back to (key, value) formats.
    algo = {"FP8": ("fp8", "fp8"), "NVFP4": ("nvfp4", "nvfp4"), "FP8_K_NVFP4_V": ("fp8", "nvfp4")}
    assert [algo[layers[f"model.layers.{l}.self_attn"]["quant_algo"]] for l in range(L)] == layer_formats_of(plan)

    # A uniform plan keeps the uniform algo name, with the complete layer map (the same test file's
    # test_convert_uniform_kv_cache_config_preserves_layer_map).
    for fmt, name in (("fp8", "FP8"), ("nvfp4", "NVFP4")):
        q = json.loads(ENGINES["modelopt"].write(make_plan([fmt] * L, [fmt] * L)))["quantization"]
        assert q["kv_cache_quant_algo"] == name and q["kv_cache_schema_version"] == 1
        assert {v["quant_algo"] for v in q["kv_cache_quantized_layers"].values()} == {name}
        assert len(q["kv_cache_quantized_layers"]) == L


def test_vllm_writes_kv_cache_dtype_and_skip_layers():
    # Flags: vLLM's CacheConfig (vllm/config/cache.py): cache_dtype ∈ CacheDType ("auto", "fp8", "fp8_e4m3",
    # "nvfp4", …) for every layer; kv_cache_dtype_skip_layers: layer indices kept at the model's dtype ("auto").
    cache_dtypes = {"auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "nvfp4"}
    keys = ["fp8", FP16, "fp8", "fp8", FP16, "fp8"]
    plan = make_plan(keys, keys)
    f = flags(ENGINES["vllm"].write(plan))
    assert f == {"--kv-cache-dtype": ["fp8_e4m3"], "--kv-cache-dtype-skip-layers": ["1", "4"]}
    assert f["--kv-cache-dtype"][0] in cache_dtypes
    read = [FP16 if str(l) in f["--kv-cache-dtype-skip-layers"] else "fp8" for l in range(L)]
    assert [(k, k) for k in read] == layer_formats_of(plan)
    assert flags(ENGINES["vllm"].write(make_plan(["nvfp4"] * L, ["nvfp4"] * L))) == {"--kv-cache-dtype": ["nvfp4"]}
    assert flags(ENGINES["vllm"].write(make_plan([FP16] * L, [FP16] * L))) == {"--kv-cache-dtype": ["auto"]}


def test_sglang_writes_a_default_dtype_and_per_layer_ranges():
    # Flags: SGLang's --kv-cache-dtype (fp8_e4m3, fp4_e2m1, bf16; docs/advanced_features/quantized_kv_cache.md) and
    # --kv-cache-per-layer-dtype "0-1:fp8_e4m3,62-63:bf16" for the layers that differ (sgl-project/sglang#17530).
    keys = ["fp8", "fp8", "nvfp4", FP16, "nvfp4", "nvfp4"]
    plan = make_plan(keys, keys)
    f = flags(ENGINES["sglang"].write(plan))
    assert set(f) == {"--kv-cache-dtype", "--kv-cache-per-layer-dtype"}
    default, = f["--kv-cache-dtype"]
    assert default == "fp4_e2m1"  # the most common
    per_layer = parse_ranges(f["--kv-cache-per-layer-dtype"][0])
    assert per_layer == {0: "fp8_e4m3", 1: "fp8_e4m3", 3: "bf16"}
    name = {"fp8_e4m3": "fp8", "fp4_e2m1": "nvfp4", "bf16": FP16}
    read = [name[per_layer.get(l, default)] for l in range(L)]
    assert [(k, k) for k in read] == layer_formats_of(plan)
    assert flags(ENGINES["sglang"].write(make_plan(["fp8"] * L, ["fp8"] * L))) == {"--kv-cache-dtype": ["fp8_e4m3"]}


def test_trtllm_writes_kv_cache_config_dtype_ranges_over_every_layer():
    # Schema: TensorRT-LLM's KvCacheConfig.dtype in the --extra_llm_api_options YAML: "fp8" / "nvfp4"
    # (NVIDIA/TensorRT-LLM#11487), or per-layer ranges "0-3:fp8,4-35:nvfp4" (NVIDIA/TensorRT-LLM#13695).
    keys = ["fp8", "fp8", "nvfp4", FP16, "nvfp4", "fp8"]
    plan = make_plan(keys, keys)
    doc = yaml.safe_load(ENGINES["trtllm"].write(plan))
    assert set(doc) == {"kv_cache_config"} and set(doc["kv_cache_config"]) == {"dtype"}
    dtype = doc["kv_cache_config"]["dtype"]
    assert dtype == "0-1:fp8,2-2:nvfp4,3-3:bf16,4-4:nvfp4,5-5:fp8"
    per_layer = parse_ranges(dtype, L)
    name = {"fp8": "fp8", "nvfp4": "nvfp4", "bf16": FP16}
    assert [(name[per_layer[l]],) * 2 for l in range(L)] == layer_formats_of(plan)
    doc = yaml.safe_load(ENGINES["trtllm"].write(make_plan(["nvfp4"] * L, ["nvfp4"] * L)))
    assert doc == {"kv_cache_config": {"dtype": "nvfp4"}}


def test_llamacpp_writes_cache_types_for_keys_and_values():
    # Flags: llama.cpp's -ctk/--cache-type-k and -ctv/--cache-type-v (tools/server/README.md: f32, f16, bf16, q8_0,
    # q4_0, q4_1, iq4_nl, q5_0, q5_1), one type each for every layer.
    cache_types = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
    for k, v in (("q8_0", "q4_0"), ("q5_0", "iq4_nl"), (FP16, "q4_1"), ("q4_0", "q8_0")):
        plan = make_plan([k] * L, [v] * L)
        f = flags(ENGINES["llamacpp"].write(plan))
        assert set(f) == {"--cache-type-k", "--cache-type-v"}
        assert f["--cache-type-k"][0] in cache_types and f["--cache-type-v"][0] in cache_types
        read = tuple("16" if t == "f16" else t for t in (f["--cache-type-k"][0], f["--cache-type-v"][0]))
        assert layer_formats_of(plan) == [read] * L


# -- refusals ----------------------------------------------------------------------------------------------------
REFUSED = [
    ("modelopt", lambda: make_plan(["fp8"] * 2 + ["nvfp4"] + ["fp8"] * 3, ["fp8"] * L),
     "modelopt cannot run this plan: layer 2: keys nvfp4 (4 bits) below values fp8 (8 bits); ModelOpt's per-layer "
     "algos are FP8, NVFP4 and FP8_K_NVFP4_V"),
    ("modelopt", lambda: make_plan(["fp8"] * L, ["fp8"] * L, heads={(1, 0, "k"): FP16, (1, 1, "k"): FP16}),
     "layer 1 head 0 keys are unquantized (16 bits); it quantizes every layer in fp8, fp8_tensor, nvfp4"),
    ("modelopt", kivi_plan, "layer 0 head 0 keys use minmax-g32-fp16 at 2 bits, not one of its formats (fp8, fp8_tensor, nvfp4)"),
    ("modelopt", lambda: make_plan(["fp8"] * L, ["fp8"] * L, heads={(3, 1, "v"): "nvfp4"}),
     "layer 3 values: head 0 fp8 (8 bits), head 1 nvfp4 (4 bits); it stores a layer's values in one format"),
    ("modelopt", lambda: make_plan(["fp8"] * L, ["fp8"] * L, ModelFingerprint("m", "mamba", L, H, 64)),
     "the attention modules of mamba models are not known to rateq"),
    ("vllm", lambda: make_plan(MIXED_KEYS, MIXED_KEYS),
     "vllm cannot run this plan: layer 0 fp8 and layer 2 nvfp4; vLLM's --kv-cache-dtype is one format"),
    ("vllm", lambda: make_plan(MIXED_KEYS, MIXED_VALUES),
     "layer 1: keys fp8 (8 bits), values nvfp4 (4 bits); vLLM's --kv-cache-dtype is one format for keys and values"),
    ("sglang", lambda: make_plan(["fp8"] * L, [FP16] + ["fp8"] * 5),
     "sglang cannot run this plan: layer 0: keys fp8 (8 bits), values unquantized (16 bits)"),
    ("trtllm", lambda: make_plan(["q8_0"] * L, ["q8_0"] * L), "layer 0 head 0 keys use q8_0 at 8 bits"),
    ("llamacpp", lambda: make_plan(["q8_0", "q8_0", "q4_0", "q8_0", "q8_0", "q8_0"], ["q4_0"] * L),
     "llamacpp cannot run this plan: keys: layer 0 q8_0 (8 bits), layer 2 q4_0 (4 bits); llama.cpp's "
     "--cache-type-k and --cache-type-v are one type each for every layer"),
    ("llamacpp", lambda: make_plan(["fp8"] * L, ["fp8"] * L), "use fp8 at 8 bits, not one of its formats"),
]


@pytest.mark.parametrize("engine, plan, message", REFUSED, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(REFUSED)])
def test_a_plan_the_engine_cannot_run_is_refused_in_one_line(engine, plan, message):
    with pytest.raises(RateQError) as exc:
        ENGINES[engine].write(plan())
    assert message in str(exc.value) and "\n" not in str(exc.value)


# -- solving for an engine ---------------------------------------------------------------------------------------
ALL_FORMATS = tuple(ENGINE_FORMATS)


def assert_runs(plan, engine):
    """Every rule of `engine`, checked on the plan's units independently of `Engine.layer_formats`."""
    eng = ENGINES[engine]
    units = unit_formats(plan)
    assert {f for *_, f in units} <= set(eng.formats) | ({FP16} if eng.allow_fp16 else set())
    layers = layer_formats_of(plan)  # heads of a layer agree: every engine ties at least per layer
    if eng.tie == "layer-kv":
        assert all(k == v for k, v in layers)
    if eng.tie == "model":
        assert len(set(layers)) == 1
    if eng.keys_at_least_values:
        assert all(plan.k_bits[l, h] >= plan.v_bits[l, h] for l in range(plan.num_layers) for h in range(H))
    if eng.one_format:
        assert len({k for k, _ in layers if k != FP16}) <= 1
    assert plan.solver["engine"] == engine
    eng.write(plan)  # and the writer takes it


@pytest.mark.parametrize("engine", list(ENGINES))
def test_solve_for_keeps_the_engines_rules(engine):
    for seed in range(4):
        curves = engine_curves(ALL_FORMATS, seed=seed)
        eng = ENGINES[engine]
        fmts = [parse_spec(f) for f in eng.formats]
        lo = min(q.bits_per_element(q.fixed_bits) for q in fmts)
        hi = 16.0 if eng.allow_fp16 else max(q.bits_per_element(q.fixed_bits) for q in fmts)
        for budget in np.linspace(lo, hi, 5):
            plan = solve_for(curves, float(budget), engine)
            assert plan.effective_bits <= budget * (1 + 1e-12)
            assert_runs(plan, engine)


@pytest.mark.parametrize("method", ["exact", "greedy", "convex"])
def test_solve_for_is_the_solver_under_the_engines_constraints(method):
    curves = engine_curves(ALL_FORMATS, seed=7)
    for budget in (5.0, 6.5, 9.0):
        # sglang: its formats, tie, unquantized layers — nothing else.
        plan = solve_for(curves, budget, "sglang", method=method)
        ref = rateq.solve(curves, budget, method=method, quantizers=["fp8", "fp8_tensor", "nvfp4"], tie="layer-kv",
                          allow_fp16=True)
        assert plan.solver["predicted_distortion"] == pytest.approx(ref.solver["predicted_distortion"])
        # vllm: the better of one format for every quantized layer (of those that meet the budget).
        plan = solve_for(curves, budget, "vllm", method=method)
        feasible = []
        for f in ("fp8", "fp8_tensor", "fp8_head", "nvfp4"):
            try:
                feasible.append(rateq.solve(curves, budget, method=method, quantizers=[f], tie="layer-kv",
                                            allow_fp16=True).solver["predicted_distortion"])
            except RateQError:
                pass
        assert plan.solver["predicted_distortion"] == pytest.approx(min(feasible))
    plan = solve_for(curves, 6.0, "modelopt", method=method)
    ref = rateq.solve(curves, 6.0, method=method, quantizers=["fp8", "fp8_tensor", "nvfp4"], tie="layer",
                      keys_at_least_values=True)
    assert plan.solver["predicted_distortion"] == pytest.approx(ref.solver["predicted_distortion"])
    assert plan.solver["tie"] == "layer" and plan.solver["keys_at_least_values"]


def test_solve_for_takes_stricter_constraints_and_refuses_others():
    curves = engine_curves(ALL_FORMATS, seed=3)
    plan = solve_for(curves, 6.0, "modelopt", tie="layer-kv")  # stricter: K and V alike per layer
    assert all(k == v for k, v in layer_formats_of(plan)) and plan.solver["tie"] == "layer-kv"
    plan = solve_for(curves, 6.0, "sglang", allow_fp16=False, quantizers=["nvfp4", "fp8"],
                     devices=[(0, 2, 8.0), (3, 5, 4.5)])
    assert FP16 not in {f for *_, f in unit_formats(plan)} and plan.solver["devices"][1] == [3, 5, 4.5]
    assert all(f == "nvfp4" for l, _, _, f in unit_formats(plan) if l >= 3)
    plan = solve_for(curves, 5.0, "llamacpp", quantizers=["q4_0", "q5_0"])
    assert {f for *_, f in unit_formats(plan)} <= {"q4_0", "q5_0"}
    assert_runs(plan, "llamacpp")


@pytest.mark.parametrize("engine, kwargs, message", [
    ("vllm", dict(tie="layer"), "vllm runs tie='layer-kv' (every KV head of a layer shares one format for keys and "
                                "values); tie='layer' does not keep to it: leave the tie out or use 'layer-kv'"),
    ("llamacpp", dict(tie="layer-kv"), "llamacpp runs tie='model'"),
    ("modelopt", dict(allow_fp16=True), "modelopt quantizes every layer"),
    ("llamacpp", dict(devices=[(0, 2, 5.0), (3, 5, 5.0)]), "per-device caps and per-layer budgets are not available"),
    ("llamacpp", dict(per_layer_budget=6.0), "per-device caps and per-layer budgets are not available"),
    ("modelopt", dict(tie="model", devices=[(0, 5, 6.0)]), "tie='model' sets one format for every layer's keys"),
    ("trtllm", dict(quantizers=["q8_0"]), "quantizer q8_0 is not a trtllm format; it runs fp8, fp8_tensor, nvfp4"),
    ("sglang", dict(quantizers=[KIVI]), "quantizer minmax-g32-fp16 is not a sglang format"),
    ("modelopt", dict(tie="heads"), "tie must be None, 'layer', 'layer-kv' or 'model', got 'heads'"),
])
def test_solve_for_refuses_what_the_engine_does_not_run(engine, kwargs, message):
    curves = engine_curves(ALL_FORMATS)
    with pytest.raises(RateQError) as exc:
        solve_for(curves, 6.0, engine, **kwargs)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_curves_without_the_engines_formats_say_what_to_calibrate():
    curves = engine_curves(["q8_0", "q4_0"])
    with pytest.raises(RateQError, match=r"^the curves hold none of modelopt's formats \(fp8, fp8_tensor, nvfp4\) at their widths "
                                         r"\(they have q8_0, q4_0, minmax-g32-fp16 at bits \[2, 4, 5, 8\]\); "
                                         r"calibrate them: rateq calibrate --engine modelopt$"):
        solve_for(curves, 6.0, "modelopt")
    no_width = engine_curves(["fp8"], bits=(2, 4))  # fp8 calibrated, but not at its 8 bits
    with pytest.raises(RateQError, match=r"fp8 lacks its 8 bits\); calibrate them: rateq calibrate --engine vllm$"):
        solve_for(no_width, 6.0, "vllm")
    with pytest.raises(RateQError, match="are not in the curves at their widths"):
        solve_for(engine_curves(["fp8"]), 6.0, "vllm", quantizers=["nvfp4"])
    with pytest.raises(RateQError, match=r"^unknown engine 'tgi'; use one of modelopt, vllm, sglang, trtllm, "
                                         r"llamacpp$"):
        get_engine("tgi")


def test_vllm_names_both_formats_when_neither_meets_the_budget():
    curves = engine_curves(["fp8", "nvfp4"])
    with pytest.raises(RateQError) as exc:
        solve_for(curves, 4.0, "vllm")
    text = str(exc.value)
    assert text.startswith("vllm runs one format for every quantized layer and none meets this: fp8: budget 4 ")
    assert "; nvfp4: budget 4 " in text and "\n" not in text


def test_describe_names_formats_ties_and_output():
    for name, eng in ENGINES.items():
        text = describe(name)
        assert text.startswith(f"{name}: ") and f"tie: {eng.tie!r}" in text
        for f in eng.formats:
            assert f"{f} (`{eng.name_of(f)}`, {ENGINE_FORMATS[f]} code bits" in text
    assert "nvfp4 (`NVFP4`, 4 code bits, 4.5 effective)" in describe("modelopt")
    assert "every unit quantized" in describe("modelopt") and "unquantized units: `f16`" in describe("llamacpp")


# -- command line ------------------------------------------------------------------------------------------------
def run_main(monkeypatch, capsys, *args):
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    from cli.main import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["rateq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return (0 if exc.value.code is None else exc.value.code), out.out, out.err


@pytest.fixture
def curves_file(tmp_path):
    path = tmp_path / "e.curves.safetensors"
    engine_curves(ALL_FORMATS, seed=5).save(path)
    return path


@pytest.mark.parametrize("engine", list(ENGINES))
def test_solve_engine_then_export_its_format(monkeypatch, capsys, tmp_path, curves_file, engine):
    profile = tmp_path / f"{engine}.safetensors"
    code, out, err = run_main(monkeypatch, capsys, "solve", curves_file, "--engine", engine, "--budget", "6",
                              "--out", profile, "--json")
    assert code == 0, err
    doc = json.loads(out)
    plan = rateq.load_profile(profile)
    assert doc["engine"] == engine and plan.solver["engine"] == engine and doc["effective_bits"] <= 6
    assert_runs(plan, engine)
    scales = []
    if plan.params:  # static scales go into the checkpoint: export asks for a file for them
        code, out, err = run_main(monkeypatch, capsys, "export", profile, "--format", engine)
        assert code == 2 and not out and "add --scales PATH" in err
        scales = ["--scales", tmp_path / "scales.safetensors"]
    code, out, err = run_main(monkeypatch, capsys, "export", profile, "--format", engine, *scales)
    assert code == 0 and not err and out == ENGINES[engine].write(plan)
    target = tmp_path / "engine-out" / "kv.txt"
    code, out, err = run_main(monkeypatch, capsys, "export", profile, "--format", engine, "--out", target, *scales)
    assert code == 0 and target.read_text() == ENGINES[engine].write(plan)
    assert f"written to {target} for {engine}" in out
    code, out, _ = run_main(monkeypatch, capsys, "solve", curves_file, "--engine", engine, "-b", "6", "-o", profile)
    assert code == 0 and f"rateq export {profile} --format {engine}" in out and f"engine {engine}" in out


@pytest.mark.parametrize("args, message", [
    (["--engine", "tgi"], "unknown --engine 'tgi'; use one of modelopt, vllm, sglang, trtllm, llamacpp"),
    (["--engine", "vllm", "--tie", "layer"], "vllm runs tie='layer-kv'"),
    (["--engine", "llamacpp", "--devices", "0-2:5,3-5:5"], "llamacpp sets one format for every layer's keys"),
    (["--engine", "trtllm", "--quantizers", "q4_0"], "quantizer q4_0 is not a trtllm format"),
    (["--engine", "sglang", "--sweep", "4:8:1"], "--engine solves at one --budget"),
])
def test_solve_engine_refuses_before_reading_the_curves(monkeypatch, capsys, tmp_path, args, message):
    missing = tmp_path / "none.curves.safetensors"  # never read: the options are refused first
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_main(monkeypatch, capsys, "solve", missing, "--budget", "6", "--out", out, *args)
    assert code == 2 and not stdout
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_solve_engine_without_its_formats_in_the_curves(monkeypatch, capsys, tmp_path):
    path = tmp_path / "kivi.curves.safetensors"
    engine_curves([], extra=(KIVI,)).save(path)
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_main(monkeypatch, capsys, "solve", path, "--engine", "trtllm", "-b", "6", "-o", out)
    assert code == 2 and not stdout and err.count("\n") == 1
    assert "calibrate them: rateq calibrate --engine trtllm" in err
    assert not out.exists()


def test_export_refuses_a_plan_the_engine_cannot_run(monkeypatch, capsys, tmp_path):
    profile = tmp_path / "kivi.safetensors"
    rateq.save_profile(kivi_plan(), profile)
    target = tmp_path / "flags.txt"
    for fmt in ENGINES:
        code, out, err = run_main(monkeypatch, capsys, "export", profile, "--format", fmt, "--out", target)
        assert code == 2 and not out and err.count("\n") == 1 and "Traceback" not in err
        assert f"{fmt} cannot run this plan: layer 0 head 0 keys use minmax-g32-fp16 at 2 bits" in err
        assert not target.exists()
    code, out, err = run_main(monkeypatch, capsys, "export", profile, "--format", "vllm")
    assert code == 2 and not out and "vllm cannot run this plan" in err
    code, out, err = run_main(monkeypatch, capsys, "export", profile, "--format", "yaml", "--out", target)
    assert code == 2 and err.count("\n") == 1
    assert "unknown export format 'yaml'; use one of json, modelopt, vllm, sglang, trtllm, llamacpp" in err
    code, _, err = run_main(monkeypatch, capsys, "export", profile, "--format", "sglang", "--out", tmp_path)
    assert code == 2 and "is a folder" in err
    assert list(tmp_path.iterdir()) == [profile]


# -- static scales -----------------------------------------------------------------------------------------------
def test_modelopt_scales_are_checkpoint_k_scale_and_v_scale_per_layer(tmp_path):
    # ModelOpt's exported checkpoints name the KV scales `model.layers.{i}.self_attn.k_proj.k_scale` and
    # `.v_proj.v_scale` (fp32 scalars); vLLM's loader maps them onto the attention layer
    # (vllm/model_executor/model_loader/weight_utils.py, maybe_remap_kv_scale_name: modelopt_scale_names).
    from safetensors import safe_open

    from rateq.engines import scale_tensors, write_scales

    plan = make_plan(["fp8_tensor"] * L, ["fp8_tensor"] * 3 + ["nvfp4"] * 3)
    doc = json.loads(ENGINES["modelopt"].write(plan))["quantization"]
    algos = [doc["kv_cache_quantized_layers"][f"model.layers.{l}.self_attn"]["quant_algo"] for l in range(L)]
    assert algos == ["FP8"] * 3 + ["FP8_K_NVFP4_V"] * 3
    t = scale_tensors(plan, "modelopt")
    assert set(t) == {f"model.layers.{l}.self_attn.{r}_proj.{r}_scale" for l in range(L) for r in "kv"}
    for l in range(L):
        assert t[f"model.layers.{l}.self_attn.k_proj.k_scale"].shape == ()
        assert float(t[f"model.layers.{l}.self_attn.k_proj.k_scale"]) == pytest.approx(0.01 * (l + 1))
        v = float(t[f"model.layers.{l}.self_attn.v_proj.v_scale"])
        assert v == (pytest.approx(0.02 * (l + 1)) if l < 3 else 1.0)  # NVFP4 values: unit tensor scale
    path = write_scales(plan, "modelopt", tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "rateq.kv_scales" and f.metadata()["engine"] == "modelopt"
        assert torch.equal(f.get_tensor("model.layers.2.self_attn.k_proj.k_scale"), t["model.layers.2.self_attn.k_proj.k_scale"])
    with pytest.raises(RateQError, match="no scales to write"):
        write_scales(make_plan(["fp8"] * L, ["fp8"] * L), "modelopt", tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()


def test_vllm_per_head_scales_follow_compressed_tensors_attn_head(tmp_path):
    # compressed-tensors' attn_head strategy: one scale per KV head of shape (num_heads, 1, 1)
    # (compressed_tensors/quantization/lifecycle/initialize.py, QuantizationStrategy.ATTN_HEAD); vLLM accepts a
    # kv_cache_scheme of type float, 8 bits, strategy tensor or attn_head, symmetric
    # (CompressedTensorsKVCacheMethod.validate_kv_cache_scheme) and loads `self_attn.k_scale` onto
    # `self_attn.attn.k_scale` (maybe_remap_kv_scale_name).
    from safetensors import safe_open

    from rateq.engines import kv_cache_scheme, scale_tensors, write_scales

    plan = make_plan(["fp8_head"] * L, ["fp8_head"] * L)
    assert flags(ENGINES["vllm"].write(plan)) == {"--kv-cache-dtype": ["fp8_e4m3"]}
    scheme = kv_cache_scheme(plan)
    assert scheme == {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "attn_head"}
    t = scale_tensors(plan, "vllm")
    assert set(t) == {f"model.layers.{l}.self_attn.{r}_scale" for l in range(L) for r in "kv"}
    k3 = t["model.layers.3.self_attn.k_scale"]
    assert k3.shape == (H, 1, 1) and k3.flatten().tolist() == pytest.approx([0.04, 0.08])
    with safe_open(str(write_scales(plan, "vllm", tmp_path / "s.safetensors")), "pt") as f:
        assert json.loads(f.metadata()["kv_cache_scheme"]) == scheme
    assert kv_cache_scheme(make_plan(["fp8_tensor"] * L, ["fp8_tensor"] * L))["strategy"] == "tensor"
    # per-head scales are vLLM's only: the per-layer engines refuse them, naming the format
    with pytest.raises(RateQError, match="fp8_head at 8 bits, not one of its formats"):
        ENGINES["sglang"].write(plan)
