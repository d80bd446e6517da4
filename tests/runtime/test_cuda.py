"""The cache on a GPU: decoding a model from the packed codes gives the logits of decoding it from the dequantized
history, in fp32 and bf16, every family of the plan (learned codebooks too) on the model's device (here the CPU,
where a test machine has no CUDA: the same check, so that it is known to hold before it runs on a GPU)."""

from __future__ import annotations

import pytest
import torch

from rateq import CachePolicy, Plan, RateQCache, fingerprint, parse_spec
from rateq.quant.params import param_key

from .conftest import TINY_SPECS
from .test_families import FAMILY_SPECS

HAS_CUDA = torch.cuda.is_available()
on_cuda = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def codebook_plan(model) -> Plan:
    """Learned codebooks on every head at 2 bits, two kinds mixed per (layer, head, K/V): pairs of channels (16
    centroids), and quadruples stored before RoPE (256 centroids, 8-bit codes)."""
    g = torch.Generator().manual_seed(4)
    specs = [parse_spec("codebook-g2"), parse_spec("codebook-g4-prerope")]
    fp = fingerprint(model, name="tiny")
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    params = {param_key(s, 2): torch.randn(L, H, 2, D // s.group_size, 1 << (2 * s.group_size), s.group_size,
                                           generator=g) for s in specs}
    bits = torch.full((L, H), 2)
    pick = lambda: torch.randint(0, 2, (L, H), generator=g)  # noqa: E731
    return Plan(bits, bits.clone(), pick(), pick(), specs, fp, params=params)


@pytest.mark.parametrize("plan_of", ["mixed", "codebooks"])
@pytest.mark.parametrize("device, dtype, tol", [
    ("cpu", torch.float32, 1e-4),
    pytest.param("cuda", torch.float32, 1e-3, marks=on_cuda),  # TF32 may be on for the model's matmuls
    pytest.param("cuda", torch.bfloat16, 5e-2, marks=on_cuda),
], ids=["cpu-fp32", "cuda-fp32", "cuda-bf16"])
def test_packed_decode_gives_the_logits_of_the_dense_history(plan_of, device, dtype, tol, tiny, mixed_plan, decode):
    model = tiny("qwen3", kv_heads=2).to(device=device, dtype=dtype)
    if plan_of == "mixed":
        plan = mixed_plan(model, seed=3, bits=(1, 2, 3, 4, 8, 16), specs=TINY_SPECS + FAMILY_SPECS)
    else:
        plan = codebook_plan(model)
    policy = CachePolicy(residual=8, block=16, sinks=2)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5)).to(device)
    packed = RateQCache(plan, model, policy=policy, packed=True)
    dense = RateQCache(plan, model, policy=policy, packed=False)
    got, want = decode(model, ids, packed, 20), decode(model, ids, dense, 20)
    assert got.device.type == device and got.dtype == dtype
    for layer in packed.layers:  # learned codebooks moved where the cache is, once, with the first append
        for role in "kv":
            for bucket in layer.store(role).buckets:
                if bucket.codec.param is not None:
                    assert bucket.codec.param.device.type == device
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert packed.nbytes() == dense.nbytes()
