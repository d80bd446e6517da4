"""Quality metrics of a quantized KV cache against the full-precision model: NLL/PPL, KL, routing flips.

All of them are teacher-forced over whole windows. Token metrics compare next-token distributions at every
position that predicts a token of the window (positions `0..T-2`). Routing flips compare, per layer, query
head and query position, the key each query attends to most (the arg-max of its attention row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hooks import repeat_kv
from ..policy import CachePolicy


@dataclass
class TokenStats:
    """Sums over predicted tokens; `add` accumulates windows, the properties give means."""

    nll_sum: float = 0.0
    kl_sum: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref_logprobs: torch.Tensor | None) -> None:
        """`logits (B, T, V)` of a window, `targets (B, T-1)` = ids[:, 1:], `ref_logprobs (B, T-1, V)` of the
        full-precision model (None: this *is* the reference, KL 0)."""
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        self.nll_sum += float(-logp.gather(-1, targets[..., None]).sum())
        if ref_logprobs is not None:
            # KL(p_fp || p_q) = Σ_v p_fp (log p_fp − log p_q), summed over positions here, averaged later.
            self.kl_sum += float((ref_logprobs.exp() * (ref_logprobs - logp)).sum())
        self.tokens += targets.numel()

    @property
    def nll(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return float(torch.tensor(self.nll, dtype=torch.float64).exp())

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.tokens, 1)


def routing_argmax(query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """Index of the most-attended key of every query: `query (B, Hq, T, D)`, `keys (B, Hq, S, D)` (already
    repeated for GQA) → `(B, Hq, T)`. The arg-max of softmax(scores) is the arg-max of the masked scores, so no
    softmax is needed."""
    scores = (query @ keys.transpose(-1, -2)) * scaling  # (B, Hq, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : keys.shape[-2]]
    return scores.argmax(-1)


@dataclass
class FlipStats:
    """Counts of routing decisions that changed. `flips`: against the full-precision model's own routing
    (queries drift with the upstream error: what the quantized model really does differently). `key_flips`:
    same queries, stored keys vs exact keys (the damage of the layer's own key error alone)."""

    flips: int = 0
    key_flips: int = 0
    decisions: int = 0

    @property
    def flip_rate(self) -> float | None:
        return self.flips / self.decisions if self.decisions else None

    @property
    def key_flip_rate(self) -> float | None:
        return self.key_flips / self.decisions if self.decisions else None


@dataclass
class RoutingProbe:
    """Wraps an attention function to record (reference pass) or compare (quantized pass) routing decisions.

    Only arg-max indices are kept between passes — `(B, Hq, T)` integers per layer — so memory stays small;
    the `(B, Hq, T, S)` scores live only inside one layer's call. Query position 0 has a single key to attend
    to and is not counted as a decision.
    """

    layers: set[int] | None = None  # None: every layer
    reference: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → (B, Hq, T) arg-max of the fp model
    stats: FlipStats = field(default_factory=FlipStats)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def wrap(self, inner, *, stored=None, policy: CachePolicy | None = None, record: bool = False):
        """An attention function that calls `inner` and, on the side, measures routing.

        `record=True`: store the arg-max of exact attention as the reference. Otherwise compare: `stored(layer,
        role)` returns the stored (quantized) keys the evaluation just used for that layer, and `policy` says
        which (query, key) pairs saw them.
        """

        def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
            out = inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            layer = module.layer_idx
            if not self.wants(layer):
                return out
            with torch.no_grad():
                scale = query.shape[-1] ** -0.5 if scaling is None else scaling
                groups = query.shape[1] // key.shape[1]
                exact = routing_argmax(query, repeat_kv(key, groups), attention_mask, scale)  # (B, Hq, T)
                if record:
                    self.reference[layer] = exact
                    return out
                key_hat = stored(layer, "k")
                T, S = query.shape[2], key.shape[2]
                kmask, _ = (policy or CachePolicy()).quantized_masks(T, S)
                kmask = kmask.to(query.device)
                kh = repeat_kv(key_hat, groups)
                k = repeat_kv(key, groups)
                scores = torch.where(kmask, query @ kh.transpose(-1, -2), query @ k.transpose(-1, -2)) * scale
                if attention_mask is not None:
                    scores = scores + attention_mask[..., :S]
                routed = scores.argmax(-1)  # (B, Hq, T)
                ref = self.reference.get(layer)
                self.stats.key_flips += int((routed != exact)[..., 1:].sum())
                if ref is not None and ref.shape == routed.shape:
                    self.stats.flips += int((routed != ref)[..., 1:].sum())
                self.stats.decisions += routed[..., 1:].numel()
            return out

        return attention
