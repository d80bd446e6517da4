"""Helpers for the runtime tests: mixed per-head plans for tiny models, and token-by-token decoding."""

from __future__ import annotations

import pytest
import torch

from rateq import Plan, QuantSpec, fingerprint, parse_spec
from rateq.runtime.store import RoleStore

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


def _codebook_store(role, spec, bits, H, D, T, B=1, rotary=None, heads=None):
    """A role store whose heads hold codebooks learned (k-means) on other draws of the same kind of data; `heads`
    (default all) are at (bits, spec), the rest in a plain grid."""
    from rateq.quant.kmeans import learn_unit_codebooks
    from rateq.quant.params import param_key

    g = torch.Generator().manual_seed(bits)
    spread = torch.linspace(0.2, 3.0, D)
    c = spec.group_size
    books = learn_unit_codebooks(torch.randn(2 * H, 256, D, generator=g) * spread, bits, c, seed=1)  # (2H, D/c, K, c)
    params = {param_key(spec, bits): books.view(1, H, 2, *books.shape[1:])}
    heads = list(range(H)) if heads is None else heads
    qids = torch.tensor([0 if h in heads else 1 for h in range(H)])
    other = parse_spec("minmax-g16-channels-fp16")  # per token: any token count
    st = RoleStore(role, torch.full((H,), bits), qids, [spec, other], D, 0, rotary, params=params)
    st.append(torch.randn(B, H, T, D, generator=g) * spread, 0)
    return st


@pytest.fixture
def codebook_store():
    """`codebook_store(role, spec, bits, H, D, T, B=1, rotary=None, heads=None)`: a role store with learned
    codebooks."""
    return _codebook_store
