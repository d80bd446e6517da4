"""The calibration attention function: runs the layer's real attention and streams per-unit statistics.

Registered through `rateq.hooks.attention_hook`, so it sees post-RoPE query, key and value of every layer of
every architecture transformers routes through `AttentionInterface`. Nothing outlives a batch: each layer's
candidates are built, scored and reduced to `(2, Hkv, C)` sums inside the call (or inside the backward hook of
its output, for `fisher`), so memory is one layer's K/V and one chunk of scores, whatever the data size.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from ..hooks import plain_attention
from ..plan import Plan
from ..policy import CachePolicy
from ..errors import RateQError
from ..quant.codec import fake_quantize, fake_quantize_multi
from ..quant.rope import invert_rope, slice_rope
from ..quant.spec import QuantSpec, holds_role
from ..quant.params import unit_param
from ..simulate import plan_transform
from .metrics import LayerInputs, allowed_pairs, candidate_errors


def role_columns(bits, quantizers: list[QuantSpec], role: str, head_dim: int) -> list[tuple[int, int, list[int]]]:
    """The candidates of `role` worth scoring: `[(quantizer index, width index, [curve columns it prices])]`.

    A quantizer that cannot hold the role, or a width a format is not stored at, is not scored (the curves price it
    infinite). Candidates that store the role identically are scored once: a pre-RoPE quantizer's values are its
    post-RoPE twin's (`prerope` changes keys only). Curve column of (q, b) = q · len(bits) + b."""
    seen: dict[tuple, tuple[int, int, list[int]]] = {}
    for qi, spec in enumerate(quantizers):
        if not holds_role(spec, role, head_dim):
            continue
        same = replace(spec, prerope=False) if role == "v" and spec.prerope and not spec.learned else spec
        for bi, b in enumerate(bits):
            if spec.allows_bits(b):
                seen.setdefault((same.id, b), (qi, bi, []))[2].append(qi * len(bits) + bi)
    return list(seen.values())


def stored_candidates(x: torch.Tensor, role: str, bits, quantizers: list[QuantSpec], policy: CachePolicy,
                      columns, rope=None, params: dict | None = None, layer: int = 0) -> torch.Tensor:
    """`(B, H, T, D)` → `(len(columns), B, H, T, D)`: the stored form of `x` under each candidate `(quantizer
    index, width index, …)` of `columns` (`role_columns`).

    Which positions are stored quantized follows the runtime exactly (as `plan_transform` + the one-pass
    evaluation): keys over whole `policy.block` blocks from `policy.sinks` out of the residual window, values
    per token from `policy.sinks` out of the residual window; the rest stays full precision. `rope`: this
    layer's `(cos, sin)` over all positions (pre-RoPE key quantizers only); `params`: the learned parameters of
    the candidates that have them (`rateq.quant.params`), of which this `layer`'s are used.
    """
    T = x.shape[2]
    start = policy.sinks
    end = policy.quantized_keys(T) if role == "k" else policy.quantized_values(T)
    if end <= start:
        return x.unsqueeze(0).repeat(len(columns), 1, 1, 1, 1)
    out = x.new_empty((len(columns), *x.shape))  # written once: full precision outside start:end, candidates inside
    if start:
        out[:, :, :, :start] = x[:, :, :start]
    if end < T:
        out[:, :, :, end:] = x[:, :, end:]
    seg = x[:, :, start:end]
    by_quantizer: dict[int, list[tuple[int, int]]] = {}
    for c, (qi, bi, *_) in enumerate(columns):
        by_quantizer.setdefault(qi, []).append((c, bi))
    tables = unroped = None  # pre-RoPE keys: the positions' rotary tables, and the keys with RoPE undone, once
    for qi, cols in by_quantizer.items():
        spec = quantizers[qi]
        if spec.prerope and role == "k" and tables is None:
            if rope is None:
                raise RateQError(f"{spec.id} quantizes keys before RoPE and needs the layer's rotary tables")
            tables = slice_rope(rope, start, end)
            unroped = invert_rope(seg, tables)
        if spec.learned:  # one learned parameter per width
            heads = range(x.shape[1])
            stored = [fake_quantize(seg, bits[bi], spec, role, rope=tables if spec.prerope else None,
                                    param=unit_param(params or {}, spec, bits[bi], layer, role, heads))
                      for _, bi in cols]
        else:
            pre = spec.prerope and role == "k"
            stored = fake_quantize_multi(seg, [bits[bi] for _, bi in cols], spec, role, rope=tables if pre else None,
                                         unroped=unroped if pre else None)
        first = cols[0][0]
        if isinstance(stored, torch.Tensor) and [c for c, _ in cols] == list(range(first, first + len(cols))):
            out[first:first + len(cols), :, :, start:end] = stored  # the quantizer's columns in a row: one copy
        else:
            for (c, _), xs in zip(cols, stored):
                out[c, :, :, start:end] = xs
    return out


def reference_form(transform, layer: int, role: str, x: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """`x` as the reference plan stores it, with the positions the policy keeps in full precision untouched
    (the same mixing as `rateq.simulate` for a whole-sequence prefill)."""
    T = x.shape[2]
    end = policy.quantized_keys(T) if role == "k" else policy.quantized_values(T)
    out = x.clone()
    if end > policy.sinks:
        out[:, :, policy.sinks:end] = transform(layer, role, x)[:, :, policy.sinks:end]
    return out


class Calibrator:
    """Accumulates `(L, Hkv, 2, C)` sums per metric over the batches run through `attention`."""

    def __init__(self, num_layers: int, num_kv_heads: int, bits, quantizers: list[QuantSpec], metrics,
                 policy: CachePolicy, *, reference: Plan | None = None, chunk_elements: int = 1 << 23,
                 matmul_dtype: torch.dtype = torch.float32, row_split: int = 16, params: dict | None = None,
                 query_stride: int = 1):
        self.bits = tuple(bits)
        self.quantizers = list(quantizers)
        self.metrics = tuple(metrics)
        self.policy = policy
        self.needs_grad = "fisher" in self.metrics
        self.chunk_elements = chunk_elements
        self.matmul_dtype = matmul_dtype
        self.row_split = row_split  # the fewest chunks of query rows per sequence (metrics.candidate_errors)
        self.query_stride = query_stride  # score every n-th query row (metrics.candidate_errors)
        self.sequences = 0  # sequences before the current forward: each sequence's sampled rows shift by one
        self._columns: dict[tuple[str, int, str], tuple] = {}  # (role, head_dim, device) → Calibrator.columns
        self.reference = reference
        self.params = params or {}  # learned parameters of the candidates that have them (rateq.quant.params)
        self.transform = None if reference is None else plan_transform(reference, policy)
        self.rope = None  # rope.RopeTables of the current forward, when a quantizer works before RoPE
        self._shape = (num_layers, num_kv_heads, 2, len(self.quantizers) * len(self.bits))
        # (metric, device) → (L, Hkv, 2, C) float64 sums, kept where the layers compute: read back once, at the end
        self._sums: dict[tuple[str, str], torch.Tensor] = {}
        self.windows: dict[int, int | None] = {}  # layer → sliding window (None: full attention)
        self.pending = 0  # fisher layers of the current batch whose gradient has not arrived yet
        self._batch = 0  # sequences in the current forward
        self._masks: dict = {}  # (mask id, shape, device) → (weak ref to the mask, allowed pairs)

    def set_rope(self, rope) -> None:
        """Use these per-layer rotary tables (from `rateq.quant.rope.capture_rope`) for pre-RoPE quantizers."""
        self.rope = rope
        if self.reference is not None:
            self.transform = plan_transform(self.reference, self.policy, rope)

    def _allowed(self, attention_mask, T: int, S: int, B: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The `(B, T, S)` allowed pairs of this mask on `device`, and a CPU copy where `device` is not the CPU (the
        chunk bounds are read there, with no device sync per layer), made once per mask and device: the layers of a
        forward share one mask, and fisher keeps each layer's inputs until its gradient arrives, so a copy per
        layer would grow with the depth."""
        key = (None if attention_mask is None else id(attention_mask), T, S, B, str(device))
        held = self._masks.get(key)
        if held is not None and (attention_mask is None or held[0]() is attention_mask):
            return held[1]
        self._masks = {k: v for k, v in self._masks.items() if k[0] is None or v[0]() is not None}
        allowed = allowed_pairs(attention_mask, T, S, B)
        pair = (allowed.to(device), None if torch.device(device).type == "cpu" else allowed.cpu())
        self._masks[key] = (None if attention_mask is None else weakref.ref(attention_mask), pair)
        return pair

    # The function transformers calls in place of its attention implementation.
    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        if layer == 0 and layer in self.windows:  # a new forward (layer 0 again): count the last one's sequences
            self.sequences += self._batch
        self._batch = query.shape[0]
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        self.windows[layer] = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        B, T, S = query.shape[0], query.shape[2], key.shape[2]
        key_base = value_base = None
        k_run, v_run = key, value
        if self.transform is not None:
            with torch.no_grad():
                key_base = reference_form(self.transform, layer, "k", key.detach(), self.policy)
                value_base = reference_form(self.transform, layer, "v", value.detach(), self.policy)
            # Straight-through: the forward sees the reference plan's K/V, the backward still reaches every
            # upstream layer (rounding has zero gradient and would cut those paths).
            k_run = key + (key_base - key).detach()
            v_run = value + (value_base - value).detach()
        attn_output, weights = plain_attention(module, query, k_run, v_run, attention_mask, scaling=scaling,
                                               dropout=0.0, **kwargs)
        allowed, allowed_host = self._allowed(attention_mask, T, S, B, query.device)
        inp = LayerInputs(
            query=query.detach(), key=key.detach(), value=value.detach(),
            allowed=allowed, allowed_host=allowed_host, scaling=float(scaling),
            key_base=key_base, value_base=value_base, softcap=kwargs.get("softcap"),
            rope=None if self.rope is None else self.rope.for_layer(layer),
        )

        if self.needs_grad and attn_output.requires_grad:
            self.pending += 1

            offset = self.sequences + layer

            def on_grad(grad, inp=inp, layer=layer, offset=offset):  # grad: (B, T, Hq, D), ∂loss/∂attention output
                self._accumulate(layer, inp, grad, offset)
                self.pending -= 1

            attn_output.register_hook(on_grad)
        else:
            self._accumulate(layer, inp, None, self.sequences + layer)
        return attn_output, weights

    def columns(self, role: str, head_dim: int, device="cpu") -> tuple[list, torch.Tensor, torch.Tensor]:
        """`role_columns` of `role`, and the scatter from their scores to the curves: score `src[i]` goes to curve
        column `dst[i]` (index tensors on `device`, made once per device)."""
        key = (role, head_dim, str(device))
        if key not in self._columns:
            cols = role_columns(self.bits, self.quantizers, role, head_dim)
            pairs = [(c, column) for c, (_, _, priced) in enumerate(cols) for column in priced]
            src, dst = (torch.tensor(x, dtype=torch.int64, device=device) for x in zip(*pairs)) if pairs else \
                (torch.empty(0, dtype=torch.int64, device=device),) * 2
            self._columns[key] = (cols, src, dst)
        return self._columns[key]

    @torch.no_grad()
    def _accumulate(self, layer: int, inp: LayerInputs, grad, offset: int = 0):
        D = inp.key.shape[-1]
        cols = {role: self.columns(role, D, inp.key.device) for role in ("k", "v")}
        k_hat = stored_candidates(inp.key, "k", self.bits, self.quantizers, self.policy, cols["k"][0], inp.rope,
                                  self.params, layer)  # (Ck, B, Hkv, S, D)
        v_hat = stored_candidates(inp.value, "v", self.bits, self.quantizers, self.policy, cols["v"][0],
                                  params=self.params, layer=layer)
        metrics = self.metrics if grad is not None else tuple(m for m in self.metrics if m != "fisher")
        sums = candidate_errors(inp, k_hat, v_hat, metrics, grad=grad, chunk_elements=self.chunk_elements,
                                matmul_dtype=self.matmul_dtype, row_split=self.row_split,
                                query_stride=self.query_stride, query_offset=offset)
        for m, per_role in sums.items():  # role r: (Hkv, Cr) → every curve column each candidate prices
            dev = per_role[0].device
            held = self._sums.get((m, str(dev)))
            if held is None:
                held = self._sums[(m, str(dev))] = torch.zeros(self._shape, dtype=torch.float64, device=dev)
            for r, role in enumerate(("k", "v")):
                _, src, dst = cols[role]
                held[layer, :, r].index_add_(1, dst, per_role[r][:, src])

    def sums(self, metric: str) -> torch.Tensor:
        """`(L, Hkv, 2, C)` float64 sums of `metric` on the CPU, over every batch run so far."""
        total = torch.zeros(self._shape, dtype=torch.float64)
        for (m, _), held in self._sums.items():
            if m == metric:
                total += held.cpu()
        return total
