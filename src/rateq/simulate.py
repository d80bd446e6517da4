"""One-pass fake-quant evaluation: the whole sequence in one forward, each query seeing the cache as the runtime
would have stored it when that query ran.

A `KVTransform(layer, role, x)` returns the stored (quantized → dequantized) form of every position of
`x (B, Hkv, T, D)`. The `CachePolicy` says which positions a query at step t sees in stored form: keys in
complete blocks out of the residual window, values out of the residual window, never the sinks. Because
stored history is never re-quantized, a position's stored form does not depend on the query, so one transform
per layer and a mask per (query, key) pair reproduce token-by-token decoding through `RateQCache` exactly.

Left-padded batches (a 2-D `attention_mask` with zeros on the left, passed to the model's forward) are
evaluated row by row as the runtime stores them: padding is never quantized, and each row's key blocks, sinks
and residual window count from its first real token, so a row gives the same result padded or alone.

With `residual=0, sinks=0` and a full-sequence prefill every position is stored quantized for every query:
the standard simulated-quantization protocol of the papers (e.g. KVQuant's teacher-forced perplexity).

Pre-RoPE key quantizers (`QuantSpec.prerope`) need the rotary tables of the keys' positions: `simulate_plan`
records each attention module's `position_embeddings` as it runs (`rateq.quant.rope.capture_rope`), so the
post-RoPE keys the hook sees are un-rotated with exactly the cos/sin the model applied, quantized, and
re-rotated.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .errors import RateQError
from .hooks import attention_hook, forward_attention_mask, plain_attention, repeat_kv
from .plan import Plan
from .policy import CachePolicy, left_padding
from .quant.codec import fake_quantize
from .quant.rope import RopeTables, capture_rope, row_view, slice_rope
from .quant.spec import FULL_PRECISION_BITS

KVTransform = Callable[[int, str, torch.Tensor], torch.Tensor]


def plan_transform(plan: Plan, policy: CachePolicy, rope: RopeTables | None = None) -> KVTransform:
    """The stored form of K/V under `plan`: heads grouped by (bits, quantizer), one quantize call per group.

    Keys are quantized over whole blocks from `policy.sinks`; the ragged tail (never seen quantized by any
    query) is left as is. Values are quantized per token at every position. `rope`: the rotary tables of the
    current forward, by layer (needed by pre-RoPE key quantizers only).
    """

    def transform(layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        bits, qids = plan.bits(role)[layer], plan.quantizer_ids(role)[layer]  # (H,)
        out = x.clone()
        start = policy.sinks
        end = x.shape[2]
        if role == "k":
            end = start + ((end - start) // policy.block) * policy.block
        if end <= start:
            return out
        for b, qi in torch.unique(torch.stack([bits, qids], 1), dim=0).tolist():
            heads = ((bits == b) & (qids == qi)).nonzero().flatten()
            spec = plan.quantizers[qi]
            if role == "k" and b < FULL_PRECISION_BITS:
                policy.check_key_group(spec)
            seg = x[:, heads, start:end]  # (B, h, T', D)
            tables = None
            if spec.prerope and role == "k":
                if rope is None:
                    raise RateQError(f"{spec.id} quantizes keys before RoPE: build the transform with the model's rotary "
                                     "tables (rateq.simulate_plan does)")
                tables = slice_rope(rope.for_layer(layer), start, end)
            param = plan.param(layer, heads, role, spec, b)
            out[:, heads, start:end] = fake_quantize(seg, int(b), spec, role, rope=tables, param=param)
        return out

    return transform


def _mixed_attention(module, query, key, value, key_hat, value_hat, kmask, vmask, attention_mask, scaling):
    """Eager attention where query i sees key/value j in stored form where `kmask/vmask[i, j]`."""
    groups = query.shape[1] // key.shape[1]
    k, kh = repeat_kv(key, groups), repeat_kv(key_hat, groups)  # (B, Hq, S, D)
    v, vh = repeat_kv(value, groups), repeat_kv(value_hat, groups)
    scores = torch.where(kmask, query @ kh.transpose(-1, -2), query @ k.transpose(-1, -2)) * scaling  # (B, Hq, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = (probs * vmask) @ vh + (probs * ~vmask) @ v  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous(), probs


def _row_groups(pad: torch.Tensor):
    """(rows, leading padding) for each distinct padding of a batch."""
    return [((pad == p).nonzero().flatten(), int(p)) for p in torch.unique(pad).tolist()]


def _stored_rows(transform: KVTransform, layer: int, role: str, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """`transform` applied to each row from its first real token on (padding left as it is)."""
    out = x.clone()
    for rows, p in _row_groups(pad):
        if p >= x.shape[2]:
            continue
        rows = rows.to(x.device)
        with row_view(rows, p):
            out[rows, :, p:] = transform(layer, role, x[rows, :, p:])
    return out


def _row_masks(policy: CachePolicy, T: int, prefill: int | None, pad: torch.Tensor):
    """`(B, 1, T, T)` stored-form masks: each row's own masks, from its first real token on."""
    kmask = torch.zeros(pad.numel(), 1, T, T, dtype=torch.bool)
    vmask = torch.zeros_like(kmask)
    for rows, p in _row_groups(pad):
        if p >= T:
            continue
        k, v = policy.quantized_masks(T - p, T - p, None if prefill is None else max(0, prefill - p))
        kmask[rows, 0, p:, p:] = k
        vmask[rows, 0, p:, p:] = v
    return kmask, vmask


@contextlib.contextmanager
def simulate(model, transform: KVTransform, policy: CachePolicy = CachePolicy(), *, prefill: int | None = None):
    """Inside the block, forward calls of `model` (no cache) run with K/V in stored form as `policy` dictates.

    `prefill`: length of the first chunk written to the cache at once (None: the whole sequence, the standard
    one-pass protocol); tokens after it are treated as decoded one at a time. A left-padded batch (2-D
    `attention_mask` given to the forward) is stored row by row from each row's first real token.
    """
    padding: dict = {"pad": None}

    def watch(module, args, kwargs):
        padding["pad"] = left_padding(forward_attention_mask(args, kwargs))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] != key.shape[2]:
            raise RateQError("the one-pass evaluation runs whole sequences without a cache (use_cache=False)")
        layer = module.layer_idx
        T = query.shape[2]
        pad = padding["pad"]
        if pad is not None and pad.numel() != query.shape[0]:
            raise RateQError(f"the attention mask has {pad.numel()} rows but the batch has {query.shape[0]}")
        if pad is None:
            key_hat = transform(layer, "k", key)
            value_hat = transform(layer, "v", value)
            kmask, vmask = policy.quantized_masks(T, T, prefill)
        else:
            key_hat = _stored_rows(transform, layer, "k", key, pad)
            value_hat = _stored_rows(transform, layer, "v", value, pad)
            kmask, vmask = _row_masks(policy, T, prefill, pad)
        kmask, vmask = kmask.to(query.device), vmask.to(query.device)
        kcol, vcol = kmask[..., -1, :], vmask[..., -1, :]  # what the last query sees
        if _same_for_every_query(kmask, kcol, pad) and _same_for_every_query(vmask, vcol, pad):
            # Every query sees the same positions quantized (R = 0, full prefill): mix once, use fused SDPA.
            k = torch.where(kcol[..., :, None], key_hat, key)
            v = torch.where(vcol[..., :, None], value_hat, value)
            return plain_attention(module, query, k, v, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return _mixed_attention(module, query, key, value, key_hat, value_hat, kmask, vmask, attention_mask, scaling)

    handle = model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        with attention_hook(model, attention):
            yield
    finally:
        handle.remove()


def _same_for_every_query(mask: torch.Tensor, col: torch.Tensor, pad: torch.Tensor | None) -> bool:
    """Whether every real query of each row sees the stored form at the same positions as the row's last query
    (queries at padding positions feed nothing a real token reads)."""
    if pad is None:
        return torch.equal(mask, col[..., None, :].expand_as(mask))
    T = mask.shape[-1]
    real = (torch.arange(T)[None, :] >= pad[:, None]).to(mask.device)[:, None, :, None]  # (B, 1, T, 1)
    return torch.equal(mask & real, col[..., None, :].expand_as(mask) & real)


def simulate_plan(model, plan: Plan, policy: CachePolicy | None = None, *, prefill: int | None = None):
    """`simulate` with the plan's own quantizers; `policy` defaults to the plan's."""
    policy = plan.policy if policy is None else policy
    if any(q.prerope for q in plan.quantizers):
        return _simulate_prerope(model, plan, policy, prefill)
    return simulate(model, plan_transform(plan, policy), policy, prefill=prefill)


@contextlib.contextmanager
def _simulate_prerope(model, plan: Plan, policy: CachePolicy, prefill: int | None):
    with capture_rope(model) as rope, simulate(model, plan_transform(plan, policy, rope), policy, prefill=prefill):
        yield
