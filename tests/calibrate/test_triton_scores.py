"""The fused key-candidate kernel computes what the torch path of `candidate_errors` computes: the score, output and
fisher sums of every key candidate, for GQA and MHA, head_dims that are not powers of two, causal, sliding-window
and padded masks, sampled query rows, in fp32 and through a 16-bit matmul (fp16 here: Triton's interpreter has no
bf16 dot). Checked in Triton's interpreter on the CPU (`TRITON_INTERPRET=1`), and compiled for CUDA GPUs (sm_86,
sm_90) with Triton's compiler."""

from __future__ import annotations

import os
import textwrap

os.environ.setdefault("TRITON_INTERPRET", "1")  # read by the kernel on first use (see test_triton_decode.py)

import pytest
import torch

pytest.importorskip("triton")

import cuda_compile  # noqa: E402  (tests/cuda_compile.py)
import rateq  # noqa: E402
from rateq.calibrate import calibrate_metrics  # noqa: E402
from rateq.calibrate import triton_scores  # noqa: E402
from rateq.calibrate.metrics import LayerInputs, allowed_pairs, candidate_errors  # noqa: E402
from rateq.quant.spec import QuantSpec  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_scores.interpreting(), reason="TRITON_INTERPRET is set to something else")


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """On the CPU the kernel runs only when asked for (the interpreter is slow)."""
    monkeypatch.setenv("RATEQ_KERNELS", "triton")

METRICS = ("score", "output", "fisher")
NOISE = (0.3, 0.03, 0.003, 3e-4)  # candidates from 1-bit-like to 8-bit-like errors
# fp32: at the smallest errors (8-bit-like) both paths round a difference of nearly equal fp32 quantities, the
# torch path P̂V − AV, the kernel p̂ − a, summed in other orders (key tiles of 32 for fp32): up to about 1e-3 apart;
# fp16: both round the difference to fp16, in other orders.
TOL = {torch.float32: dict(rtol=2e-3, atol=0), torch.float16: dict(rtol=2e-3, atol=0)}


def _inputs(B, Hq, Hkv, T, D, mask, g, cv=2):
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    v = torch.randn(B, Hkv, T, D, generator=g)
    allowed = allowed_pairs(None, T, T, B).clone()
    if mask == "window":
        allowed &= ~allowed_pairs(None, T, T, B).tril(-9)  # each query sees itself and the 8 keys before it
    elif mask == "padded":
        allowed[0, :, :5] = False  # batch row 0 left-padded by 5: its first 5 rows attend nothing
    k_hat = k[None] + torch.tensor(NOISE).view(-1, 1, 1, 1, 1) * torch.randn(len(NOISE), B, Hkv, T, D, generator=g)
    v_hat = v[None] + torch.tensor(NOISE[:cv]).view(-1, 1, 1, 1, 1) * torch.randn(cv, B, Hkv, T, D, generator=g)
    grad = torch.randn(B, T, Hq, D, generator=g)
    return LayerInputs(q, k, v, allowed, D ** -0.5), k_hat, v_hat, grad


def _torch_path(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setenv("RATEQ_KERNELS", "torch")
        return candidate_errors(*args, **kwargs)


@pytest.mark.parametrize("matmul_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,T,mask,stride", [
    (6, 2, 16, 70, "causal", 1),   # GQA 3 (padded to 4 query heads per block), a block ending mid-way
    (6, 2, 24, 45, "window", 3),   # head_dim 24 (padded to 32), a sliding window, every 3rd row
    (4, 4, 32, 40, "padded", 2),   # MHA, rows that attend nothing
    (8, 1, 16, 130, "causal", 4),  # 8 query heads per KV head, several blocks of rows and keys
])
def test_fused_key_errors_match_the_torch_path(monkeypatch, matmul_dtype, Hq, Hkv, D, T, mask, stride):
    g = torch.Generator().manual_seed(Hq * 100 + T)
    inp, k_hat, v_hat, grad = _inputs(2, Hq, Hkv, T, D, mask, g)
    assert triton_scores.runs(inp, matmul_dtype, "cpu")
    kwargs = dict(grad=grad, matmul_dtype=matmul_dtype, query_stride=stride, query_offset=1)
    ref = _torch_path(monkeypatch, inp, k_hat, v_hat, ("mse",) + METRICS, **kwargs)
    got = candidate_errors(inp, k_hat, v_hat, ("mse",) + METRICS, **kwargs)
    for m in ("mse",) + METRICS:
        for r in range(2):
            assert ref[m][r].shape == got[m][r].shape and (ref[m][r] > 0).all(), (m, r)
            torch.testing.assert_close(got[m][r], ref[m][r], **TOL[matmul_dtype], msg=lambda s: f"{m} role {r}: {s}")
    # The candidates' order is the noise's: the errors rise with it (the kernel reads the right candidate).
    assert (got["output"][0].diff(dim=1) < 0).all()


def test_each_metric_alone_and_keys_only(monkeypatch):
    g = torch.Generator().manual_seed(5)
    inp, k_hat, v_hat, grad = _inputs(1, 4, 2, 33, 16, "causal", g)
    for metrics in (("score",), ("output",), ("fisher",)):
        kwargs = dict(grad=grad, query_stride=2)
        ref = _torch_path(monkeypatch, inp, k_hat, v_hat[:0], metrics, **kwargs)
        got = candidate_errors(inp, k_hat, v_hat[:0], metrics, **kwargs)
        assert set(got) == set(metrics)
        torch.testing.assert_close(got[metrics[0]][0], ref[metrics[0]][0], **TOL[torch.float32])
        assert got[metrics[0]][1].shape == (2, 0)


def test_where_the_kernel_runs(monkeypatch):
    g = torch.Generator().manual_seed(0)
    inp, *_ = _inputs(1, 4, 2, 16, 8, "causal", g)
    assert triton_scores.runs(inp, torch.float32, "cpu")
    assert not triton_scores.runs(inp, torch.bfloat16, "cpu")  # the interpreter has no bf16 dot
    for change in (dict(key_base=inp.key), dict(value_base=inp.value), dict(softcap=30.0)):
        assert not triton_scores.runs(LayerInputs(**{**inp.__dict__, **change}), torch.float32, "cpu"), change
    wide, *_ = _inputs(1, 4, 2, 16, 160, "causal", g)  # head_dim past 128: 16-bit operands only
    half = LayerInputs(**{**wide.__dict__, "query": wide.query.half(), "key": wide.key.half(), "value": wide.value.half()})
    assert triton_scores.runs(half, torch.float16, "cpu")
    assert not triton_scores.runs(wide, torch.float32, "cpu") and not triton_scores.runs(half, torch.float32, "cpu")
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    assert not triton_scores.runs(inp, torch.float32, "cpu")
    monkeypatch.delenv("RATEQ_KERNELS")  # on the CPU only when asked for, even under the interpreter
    assert not triton_scores.runs(inp, torch.float32, "cpu")
    monkeypatch.setenv("RATEQ_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels need a CUDA device
    assert not triton_scores.runs(inp, torch.float32, "cpu")


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_calibration_through_the_kernel_gives_the_torch_paths_curves(monkeypatch, tiny, arch):
    model = tiny(arch, kv_heads=2)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    specs = [QuantSpec(group_size=16), QuantSpec(group_size=16, prerope=True)]
    calls = []
    real = triton_scores.key_errors
    monkeypatch.setattr(triton_scores, "key_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(metrics=("fisher", "score"), quantizers=specs, bits=(1, 2, 4, 8), batch_size=2)
    got = calibrate_metrics(model, None, ids, **kwargs)
    assert len(calls) == 2 * model.config.num_hidden_layers  # every layer, each batch row
    with monkeypatch.context() as m:
        m.setenv("RATEQ_KERNELS", "torch")
        ref = calibrate_metrics(model, None, ids, **kwargs)
    assert len(calls) == 2 * model.config.num_hidden_layers
    for metric in ref:
        torch.testing.assert_close(got[metric].distortion, ref[metric].distortion, **TOL[torch.float32])
    assert rateq.Curves is type(got["fisher"])


@pytest.mark.skipif(not cuda_compile.available(), reason="Triton without its CUDA backend")
def test_the_kernel_compiles_for_cuda_gpus_within_their_shared_memory():
    """The launches `key_errors` makes, compiled for sm_86 (99 KB of shared memory per block, the least of any GPU
    since sm_80) and sm_90 (the H100/H200 path): bf16 at head_dim 128 (the calibration default on CUDA), fp16 at
    256, fp32 at 128 (the widest fp32 the kernel takes). Outside the interpreter, in a process of its own."""
    code = textwrap.dedent("""
        import sys, warnings
        warnings.filterwarnings("ignore")
        sys.path.insert(0, sys.argv[1])
        import torch
        from cuda_compile import SHARED_LIMIT, Recorder, compile_launch
        from rateq.calibrate import triton_scores as ts

        real = ts._kernel()
        for dtype, D, targets in ((torch.bfloat16, 128, (86, 90)), (torch.float16, 256, (86,)),
                                  (torch.float32, 128, (86,))):
            rec = ts._state["kernel"] = Recorder(real)
            Hq, Hkv, T = 8, 2, 40
            q, grad = torch.zeros(Hq, T, D, dtype=dtype), torch.zeros(T, Hq, D, dtype=dtype)
            k = v = torch.zeros(Hkv, T, D, dtype=dtype)
            allowed = torch.ones(T, T, dtype=torch.bool).tril()
            ts.key_errors(q, k, v, torch.zeros(3, Hkv, T, D, dtype=dtype), allowed, grad, D ** -0.5, 0, 2,
                          ("score", "output", "fisher"), dtype)
            assert len(rec.launches) == 2, rec.launches
            for grid, args, kwargs in rec.launches:
                for cc in targets if not kwargs["BASE"] else targets[-1:]:
                    shared = compile_launch(real, args, kwargs, cc).metadata.shared
                    print(dtype, D, "base" if kwargs["BASE"] else "main", f"sm_{cc}", shared)
                    assert shared <= SHARED_LIMIT[86], (dtype, D, cc, shared)
        print("ok")
    """)
    cuda_compile.run_script(code)
