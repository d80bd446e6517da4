"""Dense-and-sparse outliers (KVQuant): the `k` largest-magnitude entries of each group are kept exactly (fp16)
with their position, and the dense quantizer never sees them.

A group's range (min-max, absmax) is set by its extremes, so removing them shrinks every other entry's step.
What the dense quantizer sees in their place (`fill`) must not undo that: for a plain uniform grid the entry
is replaced by 0 clipped into the range of the remaining entries (so it widens nothing); before a rotation it is
replaced by 0 (the dense part really is zero there, and zero energy is cheapest to rotate and quantize).
On decode the kept values overwrite whatever the dense quantizer reconstructed at their positions.
"""

from __future__ import annotations

import torch


def split(groups: torch.Tensor, k: int, fill: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(..., G)` fp32 → (dense `(..., G)`, values `(..., k)` rounded to fp16, indices `(..., k)` int64).

    `fill`: `range` (0 clipped into the remaining entries' [min, max]) or `zero`.
    """
    idx = groups.abs().topk(k, dim=-1).indices  # (..., k)
    values = groups.gather(-1, idx).to(torch.float16).to(torch.float32)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter(-1, idx, False)  # True on the dense entries
    if fill == "zero":
        fill_value = torch.zeros_like(values)
    else:
        inf = torch.tensor(float("inf"), device=groups.device)
        lo = torch.where(keep, groups, inf).amin(-1, keepdim=True)
        hi = torch.where(keep, groups, -inf).amax(-1, keepdim=True)
        fill_value = torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi).expand_as(values)
    dense = groups.scatter(-1, idx, fill_value)
    return dense, values, idx


def merge(dense: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Put the kept values back at their positions: `(..., G)`."""
    return dense.scatter(-1, idx.to(torch.int64), values.to(dense.dtype))
