"""One hook for every architecture: a custom function in transformers' `AttentionInterface`.

Each attention module of a transformers 5 model calls the function registered under
`config._attn_implementation` with post-RoPE `query (B, Hq, T, D)`, `key`/`value (B, Hkv, S, D)` (before
GQA repetition), the mask and `scaling`. rateq registers its own functions there for calibration and for the
one-pass fake-quant evaluation, and switches the model to them for the duration of a `with` block.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_counter = itertools.count()


def model_configs(model) -> list:
    """Every distinct config of `model`'s modules (a multimodal model holds several)."""
    seen = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and all(cfg is not s for s in seen):
            seen.append(cfg)
    return seen


@contextlib.contextmanager
def attention_hook(model, fn: Callable):
    """Route every attention call of `model` through `fn(module, query, key, value, attention_mask, **kw)`
    (same signature and return as transformers' attention functions) inside the block."""
    name = f"rateq_hook_{next(_counter)}"
    AttentionInterface.register(name, fn)
    # Masks built as for eager attention: always a materialised additive 4-D mask (causal, padding and sliding
    # window included), so hooks never have to rebuild one themselves.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    configs = model_configs(model)
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


def forward_attention_mask(args: tuple, kwargs: dict):
    """The `attention_mask` a causal LM's forward was called with (keyword, or second positional argument)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if isinstance(mask, torch.Tensor) else None


@functools.lru_cache(maxsize=None)
def _cpu_flash_dispatch_mismatch() -> bool:
    """Whether torch's CPU kernels run below the CPU's vector width (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU).
    Then torch's fused bf16/fp16 CPU attention packs for AVX-512 and refuses ("pack_vnni2 is only supported when
    avx512 is supported"); its math kernel is the one that runs."""
    try:
        wide = bool(torch.cpu._is_avx512_supported())
    except AttributeError:
        return False
    return wide and not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def plain_attention(module, query, key, value, attention_mask, **kwargs):
    """The reference attention rateq wraps: transformers' SDPA path (handles GQA, masks, sliding windows)."""
    if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and _cpu_flash_dispatch_mismatch():
        with sdpa_kernel([SDPBackend.MATH]):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`(B, Hkv, S, D)` → `(B, Hkv*groups, S, D)`: each KV head serves `groups` consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
