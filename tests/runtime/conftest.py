"""Helpers for the runtime tests: mixed per-head plans for tiny models, and token-by-token decoding."""

from __future__ import annotations

import pytest
import torch

from rateq import Plan, QuantSpec, fingerprint

# Tiny models have head_dim 16, so per-token (channel) groups must divide 16. Three quantizers with different
# layouts of metadata: fp16 scale + zero, one fp16 scale (symmetric), fp8 scale + packed integer zero-point.
TINY_SPECS = [
    QuantSpec(group_size=8),
    QuantSpec(kind="symmetric", group_size=16),
    QuantSpec(group_size=8, zero="code", scale_dtype="fp8"),
]


def _mixed_plan(model_or_config, *, seed: int = 0, bits=(1, 2, 3, 4, 5, 8, 16), specs=None) -> Plan:
    """Random bits and quantizer per (layer, head, K/V): several buckets per layer, non-contiguous heads."""
    fp = fingerprint(model_or_config, name="tiny")
    specs = TINY_SPECS if specs is None else specs
    L, H = fp.num_layers, fp.num_kv_heads
    g = torch.Generator().manual_seed(seed)
    choice = torch.tensor(bits)
    pick = lambda: choice[torch.randint(0, len(bits), (L, H), generator=g)]  # noqa: E731
    qid = lambda: torch.randint(0, len(specs), (L, H), generator=g)  # noqa: E731
    return Plan(pick(), pick(), qid(), qid(), list(specs), fp)


@pytest.fixture
def mixed_plan():
    """Factory: `mixed_plan(model, seed=0, bits=(…), specs=None)`."""
    return _mixed_plan


@torch.no_grad()
def _decode(model, ids: torch.Tensor, cache, prefill: int) -> torch.Tensor:
    """Logits `(B, T, V)`: one forward over `ids[:, :prefill]`, then one token at a time, through `cache`."""
    outs = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, dim=1)


@pytest.fixture
def decode():
    """`decode(model, ids, cache, prefill)` → logits of every position, decoded through the cache."""
    return _decode
