"""Which cached tokens are stored quantized, shared by the runtime cache and the one-pass evaluation.

With `n` tokens in the cache (KIVI's policy, plus optional sinks):
- the first `sinks` tokens stay full precision for good;
- values are quantized per token as they leave the full-precision residual window of the last `residual`
  tokens: positions `[sinks, n - residual)` are quantized;
- keys are quantized per channel over blocks of `block` tokens (blocks counted from `sinks`), once a block
  lies wholly outside the residual window. At most `residual + block - 1` keys are full precision.
Stored codes are never re-quantized: the quantized prefix only grows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import RateQError


@dataclass(frozen=True)
class CachePolicy:
    residual: int = 0
    block: int = 32
    sinks: int = 0

    def __post_init__(self):
        if self.residual < 0 or self.sinks < 0 or self.block < 1:
            raise RateQError("residual and sinks must be ≥ 0 and block ≥ 1")

    @classmethod
    def from_dict(cls, d: dict) -> "CachePolicy":
        return cls(**{k: int(d[k]) for k in ("residual", "block", "sinks") if k in d})

    @classmethod
    def for_quantizers(cls, quantizers, *, residual: int = 0, sinks: int = 0, block: int | None = None) -> "CachePolicy":
        """A policy whose key block (default: the least multiple of 32 that holds whole key groups of every
        quantizer grouping keys along tokens) fits `quantizers`."""
        if block is None:
            block = 32
            for q in quantizers:
                if q.axis_for("k") == "tokens":
                    block = block * q.group_size // math.gcd(block, q.group_size)
        return cls(residual=residual, block=block, sinks=sinks)

    def check_key_group(self, spec) -> None:
        """The key-block rule: keys are quantized a whole block at a time, so a quantizer grouping keys along
        tokens (`spec.axis_for("k") == "tokens"`) needs a key block that is a multiple of its group. Raises a
        RateQError naming the block, the quantizer, its group and the fix; does nothing for a spec that groups
        keys along channels. Callers check the specs of quantized units only (16-bit units store no groups)."""
        group = spec.group_size
        if spec.axis_for("k") != "tokens" or self.block % group == 0:
            return
        fit = -(-self.block // group) * group  # the least multiple of the group at or above the block
        raise RateQError(f"key block {self.block} is not a multiple of quantizer {spec.id}'s group of {group} "
                         f"tokens (keys are quantized a whole block at a time); use a block that is a multiple of "
                         f"{group}: CachePolicy(block={fit}) in Python, --block {fit} on the command line")

    def to_dict(self) -> dict:
        return asdict(self)

    def quantized_values(self, n: int) -> int:
        """End (exclusive) of the quantized value range `[sinks, ·)` with `n` tokens cached."""
        return max(self.sinks, n - self.residual)

    def quantized_keys(self, n: int) -> int:
        """End (exclusive) of the quantized key range `[sinks, ·)`: whole blocks out of the residual window."""
        span = max(0, n - self.residual - self.sinks)
        return self.sinks + (span // self.block) * self.block

    def view_lengths(self, q_len: int, prefill: int | None = None) -> torch.Tensor:
        """Cache length each query position sees: a prefill of `prefill` tokens is written at once (every query
        inside it sees the cache after the whole prefill); later tokens arrive one by one."""
        pos = torch.arange(q_len)
        if prefill is None:
            prefill = q_len
        return torch.maximum(pos + 1, torch.full_like(pos, min(prefill, q_len)))

    def quantized_masks(self, q_len: int, kv_len: int | None = None, prefill: int | None = None):
        """Boolean `(q_len, kv_len)` masks: True where query i sees key/value j in its quantized form."""
        kv_len = q_len if kv_len is None else kv_len
        n = self.view_lengths(q_len, prefill)  # (q_len,)
        j = torch.arange(kv_len)
        kend = torch.tensor([self.quantized_keys(int(v)) for v in n])
        vend = torch.tensor([self.quantized_values(int(v)) for v in n])
        kmask = (j[None, :] >= self.sinks) & (j[None, :] < kend[:, None])
        vmask = (j[None, :] >= self.sinks) & (j[None, :] < vend[:, None])
        return kmask, vmask


def left_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Leading padding tokens per row `(B,)` of a 2-D attention mask (1 = token, 0 = padding); None when no row is
    padded (or the mask is not 2-D). Rows must be left-padded, as `generate` pads them; a row whose padding
    comes after its tokens is refused, since its cached tokens would depend on where the padding sits."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    real = attention_mask != 0
    if bool(real.all()):
        return None
    pad = (~real).to(torch.int32).cumprod(dim=1).sum(dim=1)
    if not torch.equal(real.sum(dim=1), real.shape[1] - pad):
        raise RateQError("the attention mask pads some row after its tokens; rateq's cache and one-pass evaluation "
                         "take left padding only (tokenizer.padding_side = 'left', as for generate)")
    return pad.to("cpu", torch.long)
