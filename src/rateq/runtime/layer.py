"""`RateQLayer`: one layer's KV cache, each head stored at its planned bits, as a transformers cache layer.

Positions are absolute (0 = the first token ever written). With `n` tokens written, each role holds
- sinks `[0, min(n, S))` in the model's dtype, for good;
- its quantized history `[q_start, q_end)` in a `RoleStore` (packed codes, bucketed by bits and quantizer);
- a full-precision tail `[q_end, n)` in the model's dtype: the residual window, and for keys the block
  still filling up.
After every `update` the quantized history is extended to what `CachePolicy` says for `n` (values:
`n - residual`; keys: whole blocks before that) by quantizing the front of the tail. Nothing already stored is
ever dequantized and quantized again. `update` returns sinks + dequantized history + tail, dense, in the
model's dtype, so attention sees exactly what the one-pass evaluation `rateq.simulate_plan` shows it.

`RateQSlidingLayer` is the same for sliding-window layers: it also forgets what no future query can see
(values token by token, keys whole blocks at a time, so no key group is ever split), and returns only the
window, as `DynamicSlidingWindowLayer` does. Quantization still follows absolute positions, so its tokens are
stored exactly as in a full layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import RateQError
from ..policy import CachePolicy
from ..quant.spec import QuantSpec
from .attention import handles
from .store import RoleStore


@dataclass
class _Role:
    """One role's state: sinks, quantized store `[q_start, q_end)`, full-precision tail `[q_end, n)`."""

    store: RoleStore
    sink: torch.Tensor | None = None  # (B, H, s, D) model dtype
    tail: torch.Tensor | None = None  # (B, H, n - q_end, D) model dtype
    q_start: int = 0
    q_end: int = 0
    start: int = 0  # first position still held (sliding layers forget what no query can see again)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sink, self.tail) if t is not None]


class RateQLayer(DynamicLayer):
    """A full-attention layer's cache under a per-head bit plan (see module docstring)."""

    is_sliding = False
    # `crop` works only while it loses nothing already quantized (see `crop_problem`), so generation must not
    # count on it to roll back at will.
    is_croppable = False

    def __init__(self, *, layer_idx: int, k_bits: torch.Tensor, k_quantizer: torch.Tensor, v_bits: torch.Tensor,
                 v_quantizer: torch.Tensor, quantizers: list[QuantSpec], policy: CachePolicy, head_dim: int,
                 rotary=None, params: dict | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.num_heads = int(k_bits.numel())
        self.head_dim = head_dim
        self.cumulative_length = 0
        self._k = _Role(RoleStore("k", k_bits, k_quantizer, quantizers, head_dim, layer_idx, rotary, params=params))
        self._v = _Role(RoleStore("v", v_bits, v_quantizer, quantizers, head_dim, layer_idx, params=params))
        self._pad: torch.Tensor | None = None  # (B,) leading padding tokens per row; None: no row is padded
        self.packed = False  # decode steps attend from the codes (`rateq.runtime.attention`): set by the cache
        self._visible_from = 0  # first position the current step's query sees
        self._pending_forget: int | None = None
        self._reset_positions()

    def __repr__(self):
        return f"{type(self).__name__}(layer={self.layer_idx}, tokens={self.cumulative_length})"

    def _reset_positions(self) -> None:
        S = self.policy.sinks
        for role in (self._k, self._v):
            role.q_start = role.q_end = S
            role.start = 0
        self._pad = None
        self._pmin = self._pmax = 0

    # -- padding ------------------------------------------------------------------------------------------
    def set_padding(self, pad: torch.Tensor | None, shift: torch.Tensor | None = None) -> None:
        """Before the first token: row b's first `pad[b]` tokens are padding, and `shift[b]` is the model's position
        of its first real token (pre-RoPE keys). Each row is then stored exactly as it would be alone."""
        if self.is_initialized:
            raise RateQError("internal: padding is set before the first token is cached")
        self._pad = None if pad is None else pad.to("cpu", torch.long)
        self._k.store.position_shift = None if shift is None else shift.to(torch.long)
        self._spread()

    def _spread(self) -> None:
        pad = self._pad
        if pad is None or pad.numel() == 0:
            self._pad, self._pmin, self._pmax = None, 0, 0
        else:
            self._pmin, self._pmax = int(pad.min()), int(pad.max())

    def _lengths(self, n: int) -> tuple[int, int]:
        """Tokens of the shortest and longest row once `n` positions are written (padding excluded)."""
        return max(0, n - self._pmax), max(0, n - self._pmin)

    # -- transformers' layer interface --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        if H != self.num_heads or D != self.head_dim:
            raise RateQError(
                f"layer {self.layer_idx}: the model writes {H} KV heads of dim {D} but the plan has "
                f"{self.num_heads} heads of dim {self.head_dim}; load the profile made for this model"
            )
        if self._pad is not None and self._pad.numel() != B:
            raise RateQError(f"the attention mask has {self._pad.numel()} rows but the model writes a batch of {B}")
        self.dtype, self.device = key_states.dtype, key_states.device
        for role, x in ((self._k, key_states), (self._v, value_states)):
            empty = x.new_empty(B, H, 0, D)
            role.sink, role.tail = empty, empty.clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `(B, H, t, D)` new keys/values; return all held keys/values `(B, H, n, D)`, dense."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.finish_step()
        n0 = self.cumulative_length
        n = n0 + key_states.shape[-2]
        self.cumulative_length = n
        for role, x in ((self._k, key_states), (self._v, value_states)):
            self._write(role, x, n0, n)
        self._settle()
        first = self._first_returned(n0)
        if self.packed and key_states.shape[-2] == 1 and self._pad is None:
            # A decode step: attention reads the codes; what falls out of a sliding window goes after it.
            self._visible_from, self._pending_forget = first, n
            return handles(self, key_states)
        keys = self._dense(self._k, first, self.policy.quantized_keys)
        values = self._dense(self._v, first, self.policy.quantized_values)
        self._forget(n)  # after building the output: this call's queries may still see what goes now
        return keys, values

    def _write(self, role: _Role, x: torch.Tensor, n0: int, n: int) -> None:
        """Append the tokens of absolute positions `[n0, n)` to the sinks and the tail, in each row's own
        positions (0 = its first real token): padding is never stored."""
        S = self.policy.sinks
        t = x.shape[2]
        if self._pmin == self._pmax:  # every row alike (unpadded batches): one slice for all
            p = self._pmin
            x = x[:, :, min(t, max(0, p - n0)):]
            r0 = max(0, n0 - p)
            if r0 < S:
                m = min(S - r0, x.shape[2])
                role.sink = torch.cat([role.sink, x[:, :, :m]], dim=-2)
                x = x[:, :, m:]
            role.tail = torch.cat([role.tail, x], dim=-2)
            return
        # Rows differ: grow the sinks and the tail to the longest row, then copy each row's new tokens in place.
        _, longest = self._lengths(n)
        if role.start == 0:
            role.sink = _grow(role.sink, min(S, longest))
        role.tail = _grow(role.tail, max(0, longest - role.q_end))
        for b, p in enumerate(self._pad.tolist()):
            lo, hi = max(0, n0 - p), n - p
            if hi <= lo:
                continue
            src = x[b, :, t - (hi - lo):]
            if lo < S:
                m = min(S, hi) - lo
                role.sink[b, :, lo:lo + m] = src[:, :m]
                src, lo = src[:, m:], lo + m
            if hi > lo:
                role.tail[b, :, lo - role.q_end:hi - role.q_end] = src

    def _settle(self) -> None:
        """Quantize the front of each tail up to what the policy stores for the shortest row, and hold no
        position beyond the longest row."""
        n = self.cumulative_length
        shortest, longest = self._lengths(n)
        for role, target in ((self._k, self.policy.quantized_keys(shortest)),
                             (self._v, self.policy.quantized_values(shortest))):
            if role.sink is None:
                continue
            if role.sink.shape[2] > longest:
                role.sink = role.sink[:, :, :longest].clone()
            if role.tail.shape[2] > max(0, longest - role.q_end):
                role.tail = role.tail[:, :, :max(0, longest - role.q_end)].clone()
            if target > role.q_end:
                m = target - role.q_end
                role.store.append(role.tail[:, :, :m], role.q_end)
                # A copy, so that the quantized tokens' full-precision memory is really given back.
                role.tail = role.tail[:, :, m:].clone()
                role.q_end = target

    def finish_step(self) -> None:
        """After a packed decode step's attention: forget what its query was the last to see."""
        if self._pending_forget is not None:
            n, self._pending_forget = self._pending_forget, None
            self._forget(n)

    def _forget(self, n: int) -> None:
        """Drop what no later query can attend to (sliding layers only)."""

    def _first_returned(self, n0: int) -> int:
        return 0

    def _dense(self, role: _Role, first: int, stored_end) -> torch.Tensor:
        """Absolute positions `[first, n)` of a role, dense in the model's dtype: sinks + dequantized history +
        tail; padding positions are zeros (the attention mask hides them)."""
        sink, tail, Tq = role.sink, role.tail, role.store.length
        s = sink.shape[2]
        B, H, _, D = tail.shape
        held = torch.empty(B, H, s + Tq + tail.shape[2], D, dtype=self.dtype, device=tail.device)
        if s:
            held[:, :, :s] = sink
        role.store.decode_into(held[:, :, s:s + Tq])
        held[:, :, s + Tq:] = tail
        n = self.cumulative_length
        if self._pmin != self._pmax:
            # A row longer than the shortest sees in stored form what it would have stored alone: the front of
            # the shared tail, quantized on the fly by the store's own code (so with the same bits).
            end = stored_end(n - self._pmin)
            if end > role.q_end:
                lag = role.store.roundtrip(tail[:, :, :end - role.q_end], role.q_end)
                at = s + Tq
                for b, p in enumerate(self._pad.tolist()):
                    e = stored_end(n - p) - role.q_end
                    if e > 0:
                        held[b, :, at:at + e] = lag[b, :, :e]
        # `held` covers each row's positions [start, its length); the output is aligned to absolute positions.
        if self._pmin == self._pmax:
            lead = first - self._pmin - role.start
            if lead >= 0:
                return held[:, :, lead:] if lead else held
            return torch.cat([held.new_zeros(B, H, -lead, D), held], dim=-2)
        out = held.new_zeros(B, H, n - first, D)
        for b, p in enumerate(self._pad.tolist()):
            lo = max(first, p)
            if n > lo:
                out[b, :, lo - first:] = held[b, :, lo - p - role.start:n - p - role.start]
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        raise RateQError("RateQCache does not support offloading; its packed store is already small")

    def prefetch(self):
        raise RateQError("RateQCache does not support offloading; its packed store is already small")

    def reset(self) -> None:
        self._pending_forget = None
        for role in (self._k, self._v):
            role.store.clear()
            role.sink = role.tail = None
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self._reset_positions()

    # -- rollback and batch operations ---------------------------------------------------------------------
    def crop_problem(self, tokens_to_remove: int) -> str | None:
        """Why removing the last `tokens_to_remove` tokens would leave this layer unlike a fresh cache fed the
        remaining tokens (None: it would not). A fresh cache holds the last tokens in full precision; once
        they are quantized here, their full-precision values are gone."""
        if tokens_to_remove <= 0 or not self.is_initialized:
            return None
        n_new = max(0, self.cumulative_length - tokens_to_remove)
        shortest, longest = self._lengths(n_new)
        for name, role, target in (("keys", self._k, self.policy.quantized_keys(shortest)),
                                   ("values", self._v, self.policy.quantized_values(shortest))):
            if role.start > 0:
                return (f"layer {self.layer_idx} is a sliding-window layer that has already dropped tokens older "
                        f"than its window")
            # A fresh cache would hold [target, ·) in full precision; we hold full precision from q_end on.
            if target != role.q_end and target < longest:
                return (f"layer {self.layer_idx} {name} at positions [{target}, {role.q_end}) are already stored "
                        f"quantized, and a fresh cache of {n_new} tokens would hold them in full precision")
        return None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers passes a negative count). Refuses, changing
        nothing, when that would need full-precision values that have been quantized (see `crop_problem`)."""
        if tokens_to_remove > 0:
            raise RateQError("crop takes a negative number: how many of the last tokens to remove")
        k = -tokens_to_remove
        if k == 0 or not self.is_initialized:
            return
        self.finish_step()
        problem = self.crop_problem(k)
        if problem:
            raise RateQError(f"cannot crop {k} tokens: {problem}. {CROP_HINT}")
        n_new = max(0, self.cumulative_length - k)
        shortest, longest = self._lengths(n_new)
        for role, target in ((self._k, self.policy.quantized_keys(shortest)),
                             (self._v, self.policy.quantized_values(shortest))):
            if target < role.q_end:  # everything after `target` is dropped: nothing left in full precision
                role.store.keep(0, max(0, target - role.q_start))
                role.q_end = target
                role.tail = role.tail[:, :, :0].clone()
            if self._pad is not None:  # rows keep their own positions below their new length only
                for b, p in enumerate(self._pad.tolist()):
                    keep = max(0, n_new - p)
                    role.sink[b, :, keep:] = 0
                    role.tail[b, :, max(0, keep - role.q_end):] = 0
        self.cumulative_length = n_new
        self._settle()

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.finish_step()
        for role in (self._k, self._v):
            role.sink, role.tail = fn(role.sink), fn(role.tail)
            role.store.map_batch(fn)
        if self._pad is not None:
            self._pad = fn(self._pad)
            self._spread()
            self._settle()  # the shortest row may be longer now: quantize what the policy stores for it

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch of everything held (packed codes, metadata, sinks, tails) alike."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # -- accounting ---------------------------------------------------------------------------------------
    def store(self, role: str) -> RoleStore:
        """The quantized history of `role` ('k' or 'v')."""
        return {"k": self._k, "v": self._v}[role].store

    @property
    def batch_size(self) -> int:
        return 0 if self._k.tail is None else self._k.tail.shape[0]

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes held, by kind: `codes`, `metadata` (the stores' encodings), `full_precision` (sinks and residual
        tails: their whole storage, so a view that kept a larger buffer alive would show here, not hide)."""
        out = {"codes": 0, "metadata": 0, "full_precision": 0}
        for role in (self._k, self._v):
            for kind, n in role.store.nbytes_by_kind().items():
                out[kind] += n
            out["full_precision"] += sum(t.untyped_storage().nbytes() for t in role.tensors())
        return out

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor held (stores' buffers with their capacity, sinks, tails)."""
        return [t for role in (self._k, self._v) for t in role.store.buffers() + role.tensors()]

    def held_positions(self) -> dict[str, dict[str, int]]:
        """Token counts per role: sinks, quantized, full-precision tail (for accounting checks)."""
        return {name: {"sinks": 0 if r.sink is None else r.sink.shape[2], "quantized": r.store.length,
                       "tail": 0 if r.tail is None else r.tail.shape[2]}
                for name, r in (("k", self._k), ("v", self._v))}


def _grow(x: torch.Tensor, length: int) -> torch.Tensor:
    """`x (B, H, T, D)` extended with zeros to `length` positions (unchanged when it already has them)."""
    if x.shape[2] >= length:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:2], length - x.shape[2], x.shape[3])], dim=-2)


CROP_HINT = ("A RateQCache can remove only tokens whose removal un-quantizes nothing: with residual=0, the tokens "
             "after the last complete key block; with a residual window R > 0, none once values have begun to "
             "leave the window (more than sinks + R tokens). Use CachePolicy(residual=0) for rollbacks "
             "(speculative decoding), or rebuild the cache from the kept tokens")


class RateQSlidingLayer(RateQLayer):
    """A sliding-window layer: holds at most the window (plus < one key block), returns exactly the window."""

    is_sliding = True

    def __init__(self, *, sliding_window: int, **kwargs):
        super().__init__(**kwargs)
        self.sliding_window = int(sliding_window)

    def _first_returned(self, n0: int) -> int:
        # As DynamicSlidingWindowLayer: the `sliding_window - 1` tokens before this call, and the new ones.
        return max(n0 - self.sliding_window + 1, 0)

    def _forget(self, n: int) -> None:
        # The next query (position n) sees [n - W + 1, n]; in a row's own positions the earliest of these belongs
        # to the most padded (shortest) row, and everything before it can go.
        lo = self._lengths(n)[0] - self.sliding_window + 1
        S, G = self.policy.sinks, self.policy.block
        if lo <= S:
            return
        # Keys go whole blocks at a time (a key group is never split); values token by token.
        for role, cut in ((self._k, S + ((lo - S) // G) * G), (self._v, lo)):
            if cut <= role.start:
                continue
            role.sink = role.sink[:, :, :0].clone()
            drop = min(cut, role.q_end) - role.q_start
            if drop > 0:
                role.store.keep(drop, role.store.length)
                role.q_start += drop
            if cut > role.q_end:  # never-quantized tokens out of the window: they leave the tail
                role.tail = role.tail[:, :, cut - role.q_end:].clone()
                role.q_start = role.q_end = cut
            role.start = cut

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        n, W = self.cumulative_length, self.sliding_window
        kv_offset = max(n - W + 1, 0)
        kv_length = (W - 1 + query_length) if n >= W else (n + query_length)
        return kv_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window
