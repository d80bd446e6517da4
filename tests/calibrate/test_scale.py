"""At model scale, checked on the CPU: a model spread over devices by accelerate (CPU and disk offload)
calibrates to the unsplit model's curves; bf16 and fp16 calibration rank units as fp32 does; the peak memory of a
calibration grows with one layer's statistics, not with the depth; candidate scoring runs no Python loop per
head; the summary reports peak bytes per device. The `gpu` tests repeat the device checks on CUDA."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from torch.utils._python_dispatch import TorchDispatchMode

import rateq
from rateq.calibrate import METRICS, calibrate_metrics, default_windows
from rateq.models import input_device, weight_devices

HAS_CUDA = torch.cuda.is_available()
QUANTIZERS = ["minmax-g16-fp16", "minmax-g16-fp16-prerope"]  # tiny models have head_dim 16
# Every part of a 4-layer tiny Llama somewhere else: the embedding and LM head on disk, layers alternating.
SPLIT = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "disk"}


def ids(n=2, t=64, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def offloaded(model) -> bool:
    """Whether some weights really live off the module (accelerate keeps them on the meta device)."""
    return any(p.device.type == "meta" for p in model.parameters())


# -- a model over several devices -------------------------------------------------------------------------------
def test_a_model_split_over_cpu_and_disk_calibrates_to_the_unsplit_curves(tiny, tmp_path):
    from accelerate import dispatch_model

    kw = dict(metrics=METRICS, bits=(2, 3, 4), quantizers=QUANTIZERS, batch_size=2)
    whole = calibrate_metrics(tiny("llama", num_hidden_layers=4), None, ids(), **kw)
    split = dispatch_model(tiny("llama", num_hidden_layers=4), SPLIT, offload_dir=tmp_path)
    assert offloaded(split) and input_device(split) == torch.device("cpu")
    parts = calibrate_metrics(split, None, ids(), **kw)
    for m in METRICS:
        torch.testing.assert_close(parts[m].distortion, whole[m].distortion, rtol=1e-9, atol=0)
        assert parts[m].calibration["devices"] == ["disk", "cpu"] and "devices" not in whole[m].calibration
    assert parts["fisher"].calibration["nll"] == pytest.approx(whole["fisher"].calibration["nll"], rel=1e-9)


def test_load_model_spreads_a_saved_model_by_max_memory_and_calibrates_the_same(tiny, tmp_path):
    model = tiny("qwen3", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "model")
    whole = rateq.calibrate(model, None, ids(), metric="fisher", bits=(2, 4), quantizers=QUANTIZERS)
    # 400 KB of CPU memory hold the embedding and a layer (150 KB each): the rest goes to the offload folder.
    split, tok = rateq.load_model(str(tmp_path / "model"), device_map="sequential", max_memory="cpu=400KB",
                                  offload_folder=tmp_path / "offload")
    assert tok is None and "disk" in weight_devices(split) and "cpu" in weight_devices(split) and offloaded(split)
    parts = rateq.calibrate(split, None, ids(), metric="fisher", bits=(2, 4), quantizers=QUANTIZERS)
    torch.testing.assert_close(parts.distortion, whole.distortion, rtol=1e-6, atol=0)


def test_a_temporary_offload_folder_goes_with_its_model(tiny, tmp_path, monkeypatch):
    import gc

    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path / "cache"))
    tiny("llama").save_pretrained(tmp_path / "model")  # weights and config, no tokenizer files
    split, _ = rateq.load_model(str(tmp_path / "model"), device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                                                                 "model.layers": "disk", "model.norm": "cpu",
                                                                 "lm_head": "cpu"})
    folders = list((tmp_path / "cache" / "offload").iterdir())
    assert len(folders) == 1  # safetensors weights are read in place; other formats would be written here
    del split
    gc.collect()
    assert not folders[0].exists()


@pytest.mark.parametrize("device_map, max_memory, match", [
    ("everywhere", None, "use one of auto"),
    ({"model": "cuda:7"}, None, "CUDA"),
    ({}, None, "maps module names"),
    ("auto", "cpu", "DEVICE=SIZE"),
    ("auto", "cpu=lots", "positive number of bytes"),
    ("auto", "cpu=1GiB,cpu=2GiB", "twice"),
    (None, "cpu=1GiB", "give a device map too"),
    ({"": "cpu"}, "cpu=1GiB", "not to a mapping"),
])
def test_placement_is_checked_before_anything_loads(device_map, max_memory, match, monkeypatch):
    if HAS_CUDA and match == "CUDA":
        pytest.skip("this machine has CUDA")
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the placement was checked"))
    with pytest.raises(rateq.RateQError, match=match):
        rateq.load_model("smollm2-135m", device_map=device_map, max_memory=max_memory)


def test_max_memory_reads_accelerate_sizes():
    from rateq.models import parse_max_memory

    assert parse_max_memory("cpu=2GiB, disk=1GB") == {"cpu": 2 * 2**30, "disk": 10**9}
    assert parse_max_memory({"cpu": 1000}) == {"cpu": 1000}
    if HAS_CUDA:
        assert parse_max_memory("0=1MiB") == parse_max_memory("cuda:0=1MiB") == {0: 2**20}


# -- bf16 and fp16 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_calibration_ranks_units_like_fp32(tiny, dtype):
    model = tiny("llama", kv_heads=4, num_hidden_layers=4)  # 32 units
    kw = dict(metrics=METRICS, bits=(2, 3, 4), quantizers=QUANTIZERS)
    full = calibrate_metrics(model, None, ids(2, 256), **kw)
    half = calibrate_metrics(copy.deepcopy(model).to(dtype), None, ids(2, 256), **kw)
    for m in METRICS:
        assert half[m].calibration["dtype"] == str(dtype).replace("torch.", "")
        d = half[m].distortion
        assert torch.isfinite(d).all() and (d > 0).all(), m
        for q in range(len(QUANTIZERS)):
            for b in range(3):  # at a fixed candidate, the units rank as in fp32
                rho = spearmanr(full[m].distortion[..., q, b].flatten(), d[..., q, b].flatten()).statistic
                assert rho >= 0.95, (m, QUANTIZERS[q], b, rho)


def test_dtype_auto_is_bf16_wherever_a_device_map_computes_on_a_gpu():
    from rateq.models import compute_device, resolve_dtype

    assert resolve_dtype("auto", compute_device("cpu", {"": "cpu", "x": "disk"})) == torch.float32
    assert resolve_dtype("auto", compute_device("cpu", {"": 0})) == torch.bfloat16
    assert compute_device("cuda:1") == "cuda:1"


# -- memory -----------------------------------------------------------------------------------------------------
_PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import build_tiny
    import rateq
    from rateq.memory import PeakMemory

    layers = int(sys.argv[1])
    model = build_tiny("llama", kv_heads=2, num_hidden_layers=layers, max_position_embeddings=4096)
    ids = torch.randint(0, 256, (1, {T}), generator=torch.Generator().manual_seed(0))
    quantizers = {quantizers!r}
    for p in model.parameters():
        p.requires_grad_(False)

    def plain():  # one forward + backward, as the fisher pass runs it
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        del logits
        loss.backward()

    rateq.calibrate(model, None, ids[:, :128], metric="fisher", quantizers=quantizers)  # first-call costs
    plain()
    out = {{}}
    peak = PeakMemory()
    plain()
    out["plain"] = peak.read()["cpu"]
    for metric in ("output", "fisher"):
        before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
        curves = rateq.calibrate(model, None, ids, metric=metric, quantizers=quantizers)
        out[metric] = curves.calibration["peak_bytes"]["cpu"]
        out[metric + "_before"] = before
    print(json.dumps(out))
""")


def _can_reset_resident_peak() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


@pytest.mark.skipif(not _can_reset_resident_peak(), reason="needs Linux's resettable resident peak (/proc/self/clear_refs)")
def test_peak_memory_grows_with_one_layers_statistics_not_with_the_depth(tmp_path):
    # 21 candidates per unit: one layer's candidate K and V are 21 times that layer's own K and V.
    quantizers = ["minmax-g16-fp16", "minmax-g16-fp16-prerope", "minmax-g8-fp16"]
    T, heads, kv_heads, head_dim, C = 768, 4, 2, 16, 3 * 7
    statistics = C * 2 * kv_heads * T * head_dim * 4  # one layer's candidate K and V, fp32
    qkv = (heads + 2 * kv_heads) * T * head_dim * 4  # one layer's query, key and value
    script = tmp_path / "probe.py"
    script.write_text(_PROBE.format(tests=str(Path(__file__).parents[1]), T=T, quantizers=quantizers))
    # Large blocks straight from (and back to) the system: the resident peak follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    runs = {}
    for layers in (2, 5):
        done = subprocess.run([sys.executable, str(script), str(layers)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[layers] = json.loads(done.stdout.strip().splitlines()[-1])
    deeper = 5 - 2
    # Forward-only metrics: what calibration adds to the process grows by less than half a layer's statistics
    # for three more layers (their weights, 150 KB each, included). Were each layer's statistics kept, it would
    # grow by three layers' statistics.
    added = {n: r["output"] - r["output_before"] for n, r in runs.items()}
    assert added[5] - added[2] < statistics / 2, (added, statistics)
    assert added[2] > statistics  # the measure sees one layer's statistics at all
    # fisher: beyond one plain forward + backward, each layer keeps only its query, key and value (activations of
    # the batch, a tenth of its statistics) until its gradient arrives.
    extra = {n: r["fisher"] - r["plain"] for n, r in runs.items()}
    assert extra[5] - extra[2] < statistics / 2 + deeper * qkv, (extra, statistics, qkv)


def test_the_summary_reports_peak_bytes_per_device(tiny, tmp_path):
    curves = rateq.calibrate(tiny("llama"), None, ids(), metric="mse", bits=(2, 4), quantizers=QUANTIZERS)
    peak = curves.calibration["peak_bytes"]
    assert set(peak) == {"cpu"} and isinstance(peak["cpu"], int) and peak["cpu"] > 2**20
    curves.save(tmp_path / "c.safetensors")
    assert rateq.Curves.load(tmp_path / "c.safetensors").calibration["peak_bytes"] == peak


# -- throughput -------------------------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("metric", ["fisher", "score", "mse"])
def test_candidate_scoring_runs_the_same_operations_whatever_the_number_of_heads(tiny, metric):
    # A Python loop per head would run more tensor operations for more heads; batched scoring runs the same.
    quantizers = [*QUANTIZERS, "minmax-g16-rhadamard-fp16-prerope", "lloydmax-g16-rhadamard-fp16"]
    counts = {}
    for kv_heads in (2, 2, 4):  # the first run pays one-time costs (codebooks, rotations): not counted
        model = tiny("llama", kv_heads=kv_heads, num_attention_heads=8, hidden_size=128)
        with _CountOps() as ops:
            rateq.calibrate(model, None, ids(1, 64), metric=metric, bits=(2, 3, 4), quantizers=quantizers)
        counts[kv_heads] = ops.n
    assert counts[2] == counts[4], counts


def test_gpu_defaults_are_16_by_2048_tokens_and_the_cpu_takes_4_by_1024():
    assert default_windows("cuda:0") == default_windows("cuda") == (16, 2048)
    assert default_windows("cpu") == (4, 1024)  # one window of each part of the default text


# -- on a GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_calibration_in_bf16_ranks_units_like_the_cpu(tiny):
    model = tiny("qwen3", kv_heads=4, num_hidden_layers=4)
    kw = dict(metrics=METRICS, bits=(2, 3, 4), quantizers=QUANTIZERS)
    cpu = calibrate_metrics(model, None, ids(2, 256), **kw)
    gpu_model = copy.deepcopy(model).to(device="cuda", dtype=rateq.models.resolve_dtype("auto", "cuda"))
    gpu = calibrate_metrics(gpu_model, None, ids(2, 256), **kw)
    for m in METRICS:
        cal = gpu[m].calibration
        assert cal["dtype"] == "bfloat16" and cal["device"].startswith("cuda") and cal["peak_bytes"][cal["device"]] > 0
        for q in range(len(QUANTIZERS)):
            for b in range(3):
                rho = spearmanr(cpu[m].distortion[..., q, b].flatten(), gpu[m].distortion[..., q, b].flatten()).statistic
                assert rho >= 0.95, (m, q, b, rho)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_model_split_over_gpus_and_cpu_offload_calibrates_like_one_device(tiny, tmp_path):
    from accelerate import dispatch_model

    last = torch.cuda.device_count() - 1
    model = tiny("llama", num_hidden_layers=4).to("cuda:0")
    kw = dict(metrics=METRICS, bits=(2, 3, 4), quantizers=QUANTIZERS)
    one = calibrate_metrics(model, None, ids(), **kw)
    split_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                 "model.layers.2": last, "model.layers.3": "disk", "model.norm": last, "lm_head": last}
    split = dispatch_model(tiny("llama", num_hidden_layers=4), split_map, offload_dir=tmp_path)
    parts = calibrate_metrics(split, None, ids(), **kw)
    for m in METRICS:
        torch.testing.assert_close(parts[m].distortion, one[m].distortion, rtol=1e-3, atol=0)
        assert set(parts[m].calibration["peak_bytes"]) >= {"cpu", "cuda:0", f"cuda:{last}"}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_cuda_the_fused_key_kernel_gives_the_torch_paths_curves(tiny, monkeypatch, dtype):
    from rateq.calibrate import triton_scores

    model = tiny("qwen3", kv_heads=4, num_hidden_layers=4).to(device="cuda", dtype=dtype)
    kw = dict(metrics=METRICS, bits=(2, 3, 4, 8), quantizers=QUANTIZERS, batch_size=2)
    calls = []
    real = triton_scores.key_errors
    monkeypatch.setattr(triton_scores, "key_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = calibrate_metrics(model, None, ids(2, 256), **kw)
    assert len(calls) == 2 * 4  # each batch row of each layer
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    plain = calibrate_metrics(model, None, ids(2, 256), **kw)
    assert len(calls) == 2 * 4
    for m in METRICS:  # the same sums, up to the rounding of the bf16 differences (matmul_dtype on CUDA)
        torch.testing.assert_close(fused[m].distortion, plain[m].distortion, rtol=2e-2, atol=0)
