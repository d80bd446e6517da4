"""`RateQCache`: a transformers `Cache` that stores every KV head at the bits a `Plan` gives it.

```python
cache = rateq.RateQCache(plan, model)                 # or (plan, model.config) when no key is stored pre-RoPE
model.generate(**inputs, past_key_values=cache)
cache.nbytes()                                        # bytes its tensors hold right now
cache.learned_nbytes()                                # codebooks and static scales: per model, not per token
```

One `RateQLayer` (or `RateQSlidingLayer` for sliding-window layers) per model layer, composed like
`DynamicCache`. Operations that touch the whole cache (`crop`, beam reordering, batch selection) either act on
every layer's quantized store, residual tail and sinks alike, or refuse with a `RateQError` before changing
anything.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from ..errors import RateQError
from ..hooks import forward_attention_mask
from ..models import fingerprint, head_dim_of, text_config
from ..plan import Plan
from ..policy import CachePolicy, left_padding
from ..quant.rope import model_rotary
from . import attention
from .layer import CROP_HINT, RateQLayer, RateQSlidingLayer
from .store import Stored, check_plan

_SLIDING = ("sliding_attention", "chunked_attention")


def _stores_prerope_keys(plan: Plan) -> bool:
    return any(plan.quantizers[q].prerope for q in set(plan.k_quantizer.flatten().tolist()))


def rotary_of(model):
    """The model's rotary embedding as `rotary(like, position_ids, layer) -> (cos, sin)`, for pre-RoPE key
    quantizers (each layer gets its own type's tables, e.g. Gemma 3's local and global RoPE)."""
    return model_rotary(model)


def _padding_hook(module, args, kwargs):
    """Before a forward that writes into an empty RateQCache: tell it which leading tokens are padding."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, RateQCache) and cache.get_seq_length() == 0:
        cache.set_padding(forward_attention_mask(args, kwargs), kwargs.get("position_ids"))


def _watch_padding(model) -> None:
    if getattr(model, "_rateq_padding_hook", None) is None:
        model._rateq_padding_hook = model.register_forward_pre_hook(_padding_hook, with_kwargs=True)


class RateQCache(Cache):
    """A per-head mixed-precision packed KV cache (see module docstring).

    `config` is the model's config, or the model itself: then pre-RoPE key quantizers get its rotary tables, and
    every forward that starts the cache tells it which rows are left-padded (from its `attention_mask`), so that
    each row is stored exactly as it would be alone. With a config alone, pass `rotary=rateq.rotary_of(model)`
    for pre-RoPE keys, and call `cache.set_padding(attention_mask)` before the first forward of a padded batch.

    `policy` (residual window, key block, sinks) defaults to `plan.policy`. `device` is accepted for symmetry
    with other caches; tensors live where the model writes its keys and values.

    Built with the model, decode steps compute attention straight from the packed codes (`packed`, the
    default; `rateq.runtime.attention`: the model's attention implementation is wrapped so that every other call
    runs as before, and on the CPU the native kernels of `rateq.runtime.kernels` read the codes): a step then
    allocates a few percent of a layer's dense history instead of all of it, and at long context runs faster
    than `DynamicCache` (`bench/decode_speed.py`). `packed=False` hands the dequantized history to the model's
    own attention instead (the dense path; always so with a config alone).
    """

    def __init__(self, plan: Plan, config, *, policy: CachePolicy | None = None, device=None, rotary=None,
                 packed: bool | None = None):
        policy = plan.policy if policy is None else policy
        model = None
        if isinstance(config, torch.nn.Module):  # a model: its config, and its rotary tables where needed
            model, config = config, config.config
            if rotary is None and _stores_prerope_keys(plan):
                rotary = rotary_of(model)
            _watch_padding(model)
        if packed is None:
            packed = model is not None
        if packed and model is None:
            raise RateQError("packed=True attends from the codes through the model's attention: build the cache "
                             "with the model, RateQCache(plan, model)")
        if rotary is None and _stores_prerope_keys(plan):
            raise RateQError("the plan quantizes keys before RoPE: the cache needs the model's rotary embedding, "
                             "RateQCache(plan, model), or RateQCache(plan, model.config, rotary=rateq.rotary_of(model))")
        tc = text_config(config)
        got = fingerprint(config, name=plan.model.name)
        diff = plan.model.mismatches(got)
        if diff:
            raise RateQError(f"the plan was made for another model ({plan.model.name}): " + ", ".join(diff))
        head_dim = head_dim_of(tc)
        decoder = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
        check_plan(plan, head_dim, policy)
        layers = []
        for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
            args = dict(layer_idx=i, k_bits=plan.k_bits[i], k_quantizer=plan.k_quantizer[i], v_bits=plan.v_bits[i],
                        v_quantizer=plan.v_quantizer[i], quantizers=plan.quantizers, policy=policy, head_dim=head_dim,
                        rotary=rotary, params=plan.params)
            if kind == "full_attention":
                layers.append(RateQLayer(**args))
            elif kind in _SLIDING:
                layers.append(RateQSlidingLayer(sliding_window=kw["sliding_window"], **args))
            else:
                raise RateQError(f"layer {i} is a {kind!r} layer; RateQCache supports full and sliding-window "
                                 f"attention layers only")
        super().__init__(layers=layers)
        # Decode steps attend straight from the packed store unless told not to, where the model's attention can be
        # routed there.
        self.packed = bool(packed and attention.install(model))
        for layer in layers:
            layer.packed = self.packed
        self.plan = plan
        self.policy = policy
        self.device = None if device is None else torch.device(device)

    def __repr__(self):
        return f"RateQCache({self.plan.model.name}, {len(self.layers)} layers, {self.get_seq_length()} tokens)"

    def set_padding(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> None:
        """Before the first forward: the 2-D `attention_mask` of the batch (0 = padding, on the left). Padding is
        never stored, and each row's key blocks, sinks and residual window count from its first real token.
        `position_ids` (as `generate` passes them) give the model's position of that token for pre-RoPE keys;
        without them it is the token's index, as the model's default positions are."""
        if self.get_seq_length() > 0:
            raise RateQError("set_padding is for an empty cache: call it before the first forward (or reset())")
        pad = left_padding(attention_mask)
        shift = None
        if pad is not None:
            if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[0] == pad.numel():
                first = pad.clamp(max=position_ids.shape[1] - 1).to(position_ids.device)
                shift = position_ids.gather(1, first[:, None])[:, 0]
            else:
                shift = pad.clone()
        for layer in self.layers:
            layer.set_padding(pad, shift)

    # -- whole-cache operations: check every layer first, then act -------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens from every layer, or refuse (changing nothing) where a layer
        has already quantized what a fresh cache of the shorter length would hold in full precision."""
        if tokens_to_remove > 0:
            raise RateQError("crop takes a negative number: how many of the last tokens to remove")
        for layer in self.layers:
            problem = layer.crop_problem(-tokens_to_remove)
            if problem:
                raise RateQError(f"cannot crop {-tokens_to_remove} tokens: {problem}. {CROP_HINT}")
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    # reset / reorder_cache / batch_repeat_interleave / batch_select_indices are Cache's loops over layers; each
    # layer applies them to every tensor it holds, and they cannot fail half-way for a reason of rateq's.

    # -- accounting -----------------------------------------------------------------------------------------
    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes held by kind: `codes` (packed codes; fp16 tokens of 16-bit heads), `metadata` (scales,
        zero-points, norms, outliers), `full_precision` (sinks and residual tails, in the model's dtype). The
        quantized kinds are exactly the bytes of the codec's encoding of the stored tokens; capacity reserved
        beyond them for in-place growth is `slack_nbytes()`."""
        out = {"codes": 0, "metadata": 0, "full_precision": 0}
        for layer in self.layers:
            for kind, n in layer.nbytes_by_kind().items():
                out[kind] += n
        return out

    def nbytes(self) -> int:
        """Bytes the cache holds right now: packed codes + metadata + residual tails + sinks (slack excluded)."""
        return sum(self.nbytes_by_kind().values())

    def learned_nbytes(self) -> int:
        """Bytes of the learned parameters its buckets use (codebooks in fp16, static scales in fp32: as
        `Plan.learned_nbytes` counts them): a fixed cost per model like the weights, left out of `nbytes()`."""
        return sum(layer.store(role).learned_nbytes() for layer in self.layers for role in ("k", "v"))

    def slack_nbytes(self) -> int:
        """Bytes allocated beyond what is held: the quantized stores' spare capacity (below an eighth of their
        bytes plus one growth step per tensor), so that appending a token costs O(1) amortized."""
        return self.allocated_nbytes() - self.nbytes()

    def allocated_nbytes(self) -> int:
        """Bytes of every distinct storage the cache's tensors keep alive: `nbytes() + slack_nbytes()`."""
        seen: set[int] = set()
        total = 0
        for layer in self.layers:
            for t in layer.buffers():
                storage = t.untyped_storage()
                if storage.data_ptr() in seen or storage.nbytes() == 0:
                    continue
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def stored(self, layer: int, role: str) -> list[Stored]:
        """The quantized history of `role` ('k'/'v') of `layer`, one `Stored` per bucket of heads sharing (bits,
        quantizer): its parts laid out as `rateq.quant.codec_for(spec).encode` gives them for the stored tokens
        (views of the cache's buffers, not copies)."""
        return self.layers[layer].store(role).stored()

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes a `DynamicCache` would hold for the same tokens with K/V in `dtype` (fp16 by default): every
        token of full layers, the last `window - 1` of sliding ones."""
        item = torch.empty((), dtype=dtype).element_size()
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            B = layer.batch_size
            n = layer.get_seq_length()
            if layer.is_sliding:
                n = min(n, layer.sliding_window - 1)
            total += 2 * B * layer.num_heads * layer.head_dim * n * item
        return total

    def held_positions(self) -> list[dict[str, dict[str, int]]]:
        """Per layer and role: how many tokens are held as sinks, quantized, and in the full-precision tail."""
        return [layer.held_positions() for layer in self.layers]

