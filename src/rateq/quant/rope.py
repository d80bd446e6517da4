"""Pre-RoPE keys: undo the rotary embedding before quantizing, re-apply it after dequantizing (KVQuant).

Keys before RoPE have stable per-channel magnitudes (the rotation mixes channel pairs at position-dependent
angles), so per-channel quantizers fit them better. transformers applies RoPE inside the attention module and
hands post-RoPE keys to the attention function and to the cache, so rateq inverts it: with the `cos, sin`
tables of the positions (`(B, T, D)`, the module's `position_embeddings`),

    post = pre·cos + rotate_half(pre)·sin,     pre = (post·cos − rotate_half(post)·sin) / (cos² + sin²).

The division undoes the `attention_scaling` some RoPE variants fold into cos/sin (cos² + sin² = scale²); for
plain RoPE it is 1. This is the rotate-half convention of Llama, Qwen2/3, Mistral, Gemma and most
transformers models; interleaved or partial rotary layouts are refused.

`capture_rope(model)` records each attention module's cos/sin as it runs (a forward pre-hook), which is where
the one-pass evaluation gets them: it sees the positions the model really used, whatever they are. A cache
that stores pre-RoPE keys and re-rotates its history at every step gets the tables of any positions from the
model's own rotary module with `rotary_tables(model, layer, positions)`.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ..errors import RateQError

Rope = tuple[torch.Tensor, torch.Tensor]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _tables(rope: Rope, x: torch.Tensor) -> Rope:
    """cos/sin `(T, D)` or `(B, T, D)` → fp32 broadcastable to `x (B, h, T, D)`."""
    cos, sin = rope
    if cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[-2]:
        raise RateQError(f"rotary tables {tuple(cos.shape)} do not match keys {tuple(x.shape)}: pre-RoPE keys need "
                         "full-width rotary embeddings of the same positions; use prerope=False for this model")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return cos[:, None].to(device=x.device, dtype=torch.float32), sin[:, None].to(device=x.device, dtype=torch.float32)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Pre-RoPE `(B, h, T, D)` → post-RoPE, in fp32."""
    cos, sin = _tables(rope, x)
    x = x.to(torch.float32)
    return x * cos + rotate_half(x) * sin


def invert_rope(y: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Post-RoPE `(B, h, T, D)` → pre-RoPE, in fp32 (exact inverse of `apply_rope` up to rounding)."""
    cos, sin = _tables(rope, y)
    y = y.to(torch.float32)
    return (y * cos - rotate_half(y) * sin) / (cos * cos + sin * sin)


def slice_rope(rope: Rope, start: int, end: int) -> Rope:
    """The tables of positions `[start, end)` of a `(B, T, D)` (or `(T, D)`) pair."""
    cos, sin = rope
    return cos[..., start:end, :], sin[..., start:end, :]


class RopeTables(dict):
    """layer index → `(cos, sin)` of that layer's latest forward."""

    def for_layer(self, layer: int) -> Rope:
        if self.get(layer) is None:
            raise RateQError(f"layer {layer}'s attention received no rotary tables (position_embeddings); "
                             "pre-RoPE keys are not supported for this architecture — use prerope=False")
        return self[layer]


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]


@contextlib.contextmanager
def capture_rope(model):
    """Inside the block, `tables[layer]` holds the `(cos, sin)` each attention module was called with."""
    tables = RopeTables()

    def pre_hook(module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1:
            pe = args[1]
        tables[module.layer_idx] = tuple(pe) if isinstance(pe, (tuple, list)) and len(pe) == 2 else None

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in _attention_modules(model)]
    if not handles:
        raise RateQError("found no attention modules with `layer_idx` and `k_proj`: pre-RoPE keys are not supported "
                         "for this architecture — use prerope=False")
    try:
        yield tables
    finally:
        for h in handles:
            h.remove()


def rotary_tables(model, layer: int, positions: torch.Tensor, dtype=torch.float32) -> Rope:
    """`(cos, sin)` `(1, T, D)` of `positions` for `layer`, computed by the model's rotary module (per layer type
    where the architecture has several, as Gemma 3's local and global layers)."""
    rot = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    attn = next((m for m in _attention_modules(model) if m.layer_idx == layer), None)
    if rot is None or attn is None:
        raise RateQError("found no rotary module (`rotary_emb`) or no attention module for layer "
                         f"{layer}: pre-RoPE keys are not supported for this architecture — use prerope=False")
    device = next(model.parameters()).device
    pos = positions.reshape(1, -1).to(device)
    x = torch.zeros(1, dtype=dtype, device=device)  # only its device and dtype are read
    if "layer_type" in inspect.signature(rot.forward).parameters:
        return rot(x, pos, getattr(attn, "layer_type", None))
    return rot(x, pos)
