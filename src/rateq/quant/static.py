"""Static scales: the one scale per layer and role (or per KV head) of the formats that store no per-token
metadata (`QuantSpec.static_scale`), learned from K/V seen in calibration.

Engines compute an FP8 KV scale as amax / 448 over calibration data (ModelOpt's and vLLM's `k_scale` /
`v_scale`); an integer grid wastes most of its levels on rare extremes that way. `ScaleStats` keeps, per unit,
the running maximum magnitude and a bounded sample of values (each batch's largest magnitudes always among
them), and `fit` picks for each unit (or each layer and role, pooled over heads) the clipping ratio
c ∈ {1, 0.975, …, 0.3} whose scale c · amax / qmax gives the least squared error on the sample — FP8 included,
where c = 1 is the engines' own choice and usually wins.

    stats = ScaleStats(num_layers, num_kv_heads)
    stats.observe(layer, "k", key)               # (B, H, T, D), every forward of the learning windows
    scale = stats.fit(parse_spec("int8_head"))   # (L, H, 2) fp32, positive
"""

from __future__ import annotations

import torch

from ..errors import RateQError
from .engine_formats import dequantize_static, quantize_static, static_qmax
from .params import param_key
from .spec import QuantSpec

CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(29))  # 1.0 down to 0.3
SAMPLE_CAP = 1 << 15  # values kept per unit
TOP_PER_BATCH = 16  # each batch's largest magnitudes per unit, always kept (they decide whether clipping pays)


def scale_key(spec: QuantSpec) -> str:
    """The name a static-scale format's scales are kept under in curves, plans and profiles."""
    return param_key(spec, spec.fixed_bits)


class ScaleStats:
    """Per-unit maximum magnitude and a bounded deterministic sample of K/V values."""

    def __init__(self, num_layers: int, num_kv_heads: int, *, cap: int = SAMPLE_CAP):
        self.shape = (num_layers, num_kv_heads, 2)
        self.cap = cap
        self.amax = torch.zeros(self.shape, dtype=torch.float32)
        self.samples: dict[tuple[int, int], torch.Tensor] = {}  # (layer, role) → (H, n)

    def observe(self, layer: int, role: str, x: torch.Tensor) -> None:
        """Fold in `x (B, H, T, D)`, the keys (post-RoPE) or values of `layer` in one forward."""
        r = "kv".index(role)
        H = x.shape[1]
        flat = x.detach().to(torch.float32).transpose(0, 1).reshape(H, -1).cpu()
        self.amax[layer, :, r] = torch.maximum(self.amax[layer, :, r], flat.abs().amax(-1))
        stride = max(1, flat.shape[1] // (self.cap // 4))
        top = flat.gather(1, flat.abs().topk(min(TOP_PER_BATCH, flat.shape[1]), -1).indices)
        new = torch.cat([flat[:, ::stride], top], 1)
        old = self.samples.get((layer, r))
        kept = new if old is None else torch.cat([old, new], 1)
        while kept.shape[1] > self.cap:  # thin evenly, keeping each batch's share
            kept = kept[:, ::2]
        self.samples[(layer, r)] = kept

    def fit(self, spec: QuantSpec) -> torch.Tensor:
        """`(L, H, 2)` scales of `spec` (a static-scale format): per unit, or per layer and role shared by its
        heads (`static_scale == "tensor"`), each the least-squares choice among `CLIP_RATIOS` · amax / qmax."""
        if not spec.static_scale:
            raise RateQError(f"{spec.id} has no static scale to learn")
        L, H, _ = self.shape
        missing = [(l, "KV"[r]) for l in range(L) for r in range(2) if (l, r) not in self.samples]
        if missing:
            raise RateQError(f"no K/V seen for layer {missing[0][0]} {missing[0][1]}: cannot learn {spec.id} scales")
        qmax = static_qmax(spec.kind)
        out = torch.empty(self.shape, dtype=torch.float32)
        ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32).view(-1, 1, 1)
        for (l, r), sample in self.samples.items():
            amax = self.amax[l, :, r].clone()
            if spec.static_scale == "tensor":
                amax = amax.max().expand(H)
                sample = sample.reshape(1, -1).expand(H, -1)
            amax = torch.where(amax > 0, amax, torch.ones_like(amax))
            scales = ratios * (amax / qmax).view(1, H, 1)  # (C, H, 1)
            x = sample.unsqueeze(0)  # (1, H, n)
            err = ((dequantize_static(spec.kind, quantize_static(spec.kind, x, scales), scales) - x) ** 2).sum(-1)
            best = err.argmin(0)  # (H,): the first (largest) ratio among ties
            out[l, :, r] = scales.squeeze(-1).gather(0, best.view(1, H)).squeeze(0)
        return out

