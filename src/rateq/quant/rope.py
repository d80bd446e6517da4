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
model's own rotary module with `model_rotary(model)`.
"""

from __future__ import annotations

import contextlib
import contextvars
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


# Set while a transform runs on some rows of a batch from some position on (left-padded rows are quantized
# from their first real token): `RopeTables.for_layer` then returns those rows' tables from that position.
_ROW_VIEW: contextvars.ContextVar = contextvars.ContextVar("rateq_rope_row_view", default=None)


@contextlib.contextmanager
def row_view(rows: torch.Tensor, start: int):
    """Inside the block, `RopeTables.for_layer` gives the tables of batch rows `rows` from position `start` on."""
    token = _ROW_VIEW.set((rows, start))
    try:
        yield
    finally:
        _ROW_VIEW.reset(token)


class RopeTables(dict):
    """layer index → `(cos, sin)` of that layer's latest forward."""

    def for_layer(self, layer: int) -> Rope:
        if self.get(layer) is None:
            raise RateQError(f"layer {layer}'s attention received no rotary tables (position_embeddings); "
                             "pre-RoPE keys are not supported for this architecture — use prerope=False")
        cos, sin = self[layer]
        view = _ROW_VIEW.get()
        if view is not None:
            rows, start = view
            if cos.dim() == 3 and cos.shape[0] > 1:
                cos, sin = cos[rows.to(cos.device)], sin[rows.to(sin.device)]
            cos, sin = cos[..., start:, :], sin[..., start:, :]
        return cos, sin


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


def model_rotary(model):
    """The model's rotary embedding as `rotary(like, position_ids, layer) -> (cos, sin)`, for pre-RoPE keys.

    `position_ids` is `(1, T)` or `(B, T)`; the tables come back `(·, T, D)` in `like`'s dtype, computed by the
    model's own rotary module (`…rotary_emb`), with the layer's type where the architecture keeps one table per
    type (Gemma 3's local and global RoPE) — exactly the tables the model applies to that layer's keys."""
    rot = [m for name, m in model.named_modules() if name == "rotary_emb" or name.endswith(".rotary_emb")]
    if len(rot) != 1:
        raise RateQError(f"pre-RoPE keys need the model's rotary module (`rotary_emb`); {type(model).__name__} has "
                         f"{len(rot)}: use quantizers without 'prerope' for this model")
    rot = rot[0]
    typed = "layer_type" in inspect.signature(rot.forward).parameters
    layer_types = {m.layer_idx: getattr(m, "layer_type", None) for m in _attention_modules(model)}
    if typed and any(t is None for t in layer_types.values()):
        raise RateQError(f"{type(model).__name__}'s rotary tables depend on a layer type its attention modules do "
                         "not name: use quantizers without 'prerope' for this model")

    def compute(like: torch.Tensor, pos: torch.Tensor, layer: int) -> Rope:
        return rot(like, pos, layer_types[layer]) if typed else rot(like, pos)

    kind = str(getattr(rot, "rope_type", "default"))
    if "dynamic" in kind or kind == "longrope":  # tables that depend on the sequence length: computed each call
        return lambda like, position_ids, layer: compute(like, position_ids.to(like.device), layer)
    memo: dict = {}

    def held_tables(like: torch.Tensor, need: int, layer: int) -> Rope:
        key = (layer_types[layer] if typed else None, like.dtype, str(like.device))
        held = memo.get(key)
        if held is None or held[0].shape[0] < need:
            n = max(need, 2 * (0 if held is None else held[0].shape[0]), 256)
            cos, sin = compute(like, torch.arange(n, device=like.device)[None], layer)
            held = memo[key] = (cos[0], sin[0])
        return held

    def tables(like: torch.Tensor, position_ids: torch.Tensor, layer: int) -> Rope:
        # Static RoPE is a function of the position alone: one table per layer type, grown as positions grow,
        # shared by every layer and step (pre-RoPE keys re-rotate their whole history at each decode step).
        pos = position_ids.to(like.device)
        held = held_tables(like, int(pos.max()) + 1 if pos.numel() else 0, layer)
        if pos.dim() == 2 and pos.shape[0] == 1 and pos.numel():
            a, b = int(pos[0, 0]), int(pos[0, -1])
            if a >= 0 and b - a == pos.shape[1] - 1 and bool((pos[0, 1:] - pos[0, :-1] == 1).all()):
                # consecutive positions: a view of the table
                return held[0][None, a:b + 1], held[1][None, a:b + 1]
        idx = pos.clamp_min(0)
        shape = (*idx.shape, held[0].shape[-1])
        return (held[0].index_select(0, idx.reshape(-1)).view(shape), held[1].index_select(0, idx.reshape(-1)).view(shape))

    def span(like: torch.Tensor, start: int, stop: int, layer: int) -> Rope:
        """The tables `(stop − start, D)` of the consecutive positions `[start, stop)`: views, no index work."""
        held = held_tables(like, stop, layer)
        return held[0][start:stop], held[1][start:stop]

    tables.span = span
    return tables
