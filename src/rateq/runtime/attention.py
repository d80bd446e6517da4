"""Decode attention straight from the packed store, selected through transformers' `AttentionInterface`.

`RateQCache(plan, model)` switches the model's attention to `rateq:<its implementation>` (`install`): a
function that runs the model's own implementation on every call except a decode step of a `RateQLayer` in
packed mode, which `RateQLayer.update` marks by returning handles (empty tensors that name the layer) instead
of a dense history. Then, per layer and step:

- scores: sinks and the full-precision tail by a matmul, every bucket of the quantized history from its codes
  (`RoleStore.scores`: the native CPU kernels or Triton on CUDA, `rateq.runtime.kernels`, where they take the
  bucket; else `rateq.quant.attend.scores`, a chunk of `CHUNK` tokens at a time — metadata folded into the
  query, rotations applied once to the query); GQA groups the query heads of each KV head, never repeating K
  or V;
- one softmax over all positions, with the sliding window and the model's mask applied by position;
- outputs: the same parts weighted (`RoleStore.mix`, likewise: per-token value scales on the weights, one
  unrotation of the output).

Nothing of the layer's dense history is formed: what a step allocates beyond the store is the scores, the
outputs and, on the torch path, one chunk of unpacked codes. Prefill and any multi-token call, padded batches,
and forwards under another cache go through the model's own attention unchanged.
"""

from __future__ import annotations

import functools
import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..hooks import model_configs

PREFIX = "rateq:"


def handles(layer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `update` returns in packed mode: two empty tensors that name the layer."""
    k, v = like.new_empty(0), like.new_empty(0)
    k.rateq_layer = v.rateq_layer = layer
    return k, v


def packed_forward(layer, query: torch.Tensor, attention_mask, *, scaling: float, softcap=None) -> torch.Tensor:
    """Attention output `(B, t, Hq, D)` of `query (B, Hq, t, D)` over `layer`'s held tokens, from the codes."""
    B, Hq, t, D = query.shape
    H = layer.num_heads
    r = Hq // H
    q = (query.to(torch.float32) * scaling).view(B, H, r * t, D)  # query heads grouped by KV head, then tokens
    kr, vr = layer._k, layer._v
    n, first = layer.cumulative_length, layer._visible_from
    ns, nq, nt = kr.sink.shape[2], kr.store.length, kr.tail.shape[2]
    s = q.new_empty(B, H, r * t, ns + nq + nt)  # scores of positions [kr.start, n), filled part by part
    if ns:
        torch.matmul(q, kr.sink.to(torch.float32).transpose(-1, -2), out=s[..., :ns])
    if nq:
        kr.store.scores(q, out=s[..., ns:ns + nq])
    if nt:
        torch.matmul(q, kr.tail.to(torch.float32).transpose(-1, -2), out=s[..., ns + nq:])
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    lead = first - kr.start
    s = s[..., lead:] if lead > 0 else s  # positions [first, n)
    if attention_mask is not None:
        m = attention_mask[..., -t:, -(n - first):]  # columns end at position n - 1
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
        m = m.to(torch.float32)
        s = (s.view(B, H, r, t, -1) + (m[:, None] if m.shape[1] == 1 else m.view(B, H, r, t, -1))).view(B, H, r * t, -1)
    p = s.sub_(s.amax(-1, keepdim=True)).exp_()  # softmax in place
    p = p.div_(p.sum(-1, keepdim=True))
    # values cover [vr.start, n) with vr.start ≤ first (keys leave a window by blocks, values token by token):
    # the positions before `first` carry no weight
    drop = first - vr.start
    if drop:
        p = torch.nn.functional.pad(p, (drop, 0))
    ns, nq = vr.sink.shape[2], vr.store.length
    out = q.new_zeros(B, H, r * t, D)
    if ns:
        out += p[..., :ns] @ vr.sink.to(torch.float32)
    if nq:
        out += vr.store.mix(p[..., ns:ns + nq])
    if vr.tail.shape[2]:
        out += p[..., ns + nq:] @ vr.tail.to(torch.float32)
    return out.view(B, Hq, t, D).transpose(1, 2).to(query.dtype)


def _eager(module):
    """The model's own eager attention function (transformers keeps it in the modeling module)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention(impl, module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    layer = getattr(key, "rateq_layer", None)
    if layer is None:
        fallback = _eager(module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        if softcap is not None:
            kw["softcap"] = softcap
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    try:
        return packed_forward(layer, query, attention_mask, scaling=scaling, softcap=softcap), None
    finally:
        layer.finish_step()


@functools.lru_cache(maxsize=None)
def _register(impl: str) -> str:
    name = PREFIX + impl
    AttentionInterface.register(name, functools.partial(_attention, impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def install(model) -> bool:
    """Route `model`'s attention through the packed decode path (a no-op for calls that are not a RateQCache
    decode step). Returns whether every config could be switched."""
    ok = True
    for cfg in model_configs(model):
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is None:
            continue
        if impl.startswith(PREFIX):
            continue
        if impl.startswith("rateq_hook_") or impl not in ("sdpa", "eager"):
            ok = False  # flash-attention or a foreign hook: leave it, the cache stays dense
            continue
        cfg._attn_implementation = _register(impl)
    return ok

