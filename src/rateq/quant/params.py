"""Learned parameters of quantizers, by name: what calibration fits per unit and curves, plans and profiles keep.

Two families have them (`QuantSpec.learned`):
- static-scale engine formats (`fp8_tensor`, `int8_head`, …): `"{id}.scale"`, one scale per unit `(L, H, 2)`, the
  same at every width (they have one), equal across a layer's heads for per-layer formats (`rateq.quant.static`);
- codebooks (`codebook-g{c}`): `"{id}.codebook{b}"` per code width b, `(L, H, 2, D/c, 2^(b·c), c)`: for every
  unit, one codebook of 2^(b·c) centroids per group of c channels (`rateq.quant.codebook`).

`check_params` is the one rule every holder applies; `unit_param` cuts what one bucket of heads needs, and
`param_nbytes` counts its bytes.
"""

from __future__ import annotations

import torch

from ..errors import RateQError
from .spec import FULL_PRECISION_BITS, QuantSpec


def param_key(spec: QuantSpec, bits: int) -> str | None:
    """The name `spec`'s learned parameter at `bits` is kept under; None when it has none."""
    if bits >= FULL_PRECISION_BITS:
        return None
    if spec.static_scale:
        return f"{spec.id}.scale"
    if spec.kind == "codebook":
        return f"{spec.id}.codebook{bits}"
    return None


def param_shape(spec: QuantSpec, bits: int, num_layers: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """The shape of `spec`'s parameter at `bits` for a model of that size."""
    if spec.static_scale:
        return (num_layers, num_kv_heads, 2)
    c = spec.group_size
    return (num_layers, num_kv_heads, 2, head_dim // c, 1 << (bits * c), c)


def check_params(params, wanted: dict, where: str) -> dict:
    """`params` checked against `wanted` (`{key: (spec, shape)}`): each present, of its shape, finite (scales
    positive, a per-layer format's equal across a layer's heads), and nothing else. Returns them as fp32 tensors;
    a one-line RateQError naming `where` otherwise."""
    if not isinstance(params, dict):
        raise RateQError(f"{where}: learned parameters are a dict of tensors, got {type(params).__name__}")
    unknown = sorted(set(params) - set(wanted))
    if unknown:
        raise RateQError(f"{where} hold parameters for no quantizer of theirs: {', '.join(unknown)}")
    missing = sorted(set(wanted) - set(params))
    if missing:
        raise RateQError(f"{where} lack the calibrated {', '.join(missing)} of their learned quantizers")
    out = {}
    for key, (spec, shape) in wanted.items():
        t = torch.as_tensor(params[key])
        if not t.is_floating_point() or tuple(t.shape) != tuple(shape):
            raise RateQError(f"{where}: {key} must be real numbers of shape {tuple(shape)}, got "
                             f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise RateQError(f"{where}: {key} holds NaN or infinite values")
        if spec.static_scale:
            if not bool((t > 0).all()):
                raise RateQError(f"{where}: {key} scales must be positive finite numbers")
            if spec.static_scale == "tensor" and not bool((t == t[:, :1]).all()):
                raise RateQError(f"{where}: {spec.id} keeps one scale per layer and role, but a layer's heads differ")
        out[key] = t
    return out


def wanted_params(pairs, num_layers: int, num_kv_heads: int, head_dim: int) -> dict:
    """`{key: (spec, shape)}` for the (spec, bits) `pairs` that have learned parameters."""
    out = {}
    for spec, bits in pairs:
        key = param_key(spec, int(bits))
        if key is not None:
            out[key] = (spec, param_shape(spec, int(bits), num_layers, num_kv_heads, head_dim))
    return out


def param_nbytes(spec: QuantSpec, param: torch.Tensor | None) -> int:
    """Bytes of one bucket's `param` (from `unit_param`) as profiles keep it: codebooks in fp16, scales in fp32,
    a per-layer format's one scale once (its heads hold copies)."""
    if param is None:
        return 0
    if spec.static_scale == "tensor":
        return 4
    return param.numel() * (4 if spec.static_scale else 2)


def unit_param(params: dict, spec: QuantSpec, bits: int, layer: int, role: str, heads) -> torch.Tensor | None:
    """What a codec needs for `heads` of `layer`'s `role` under `spec` at `bits`: scales `(h,)`, codebooks
    `(h, D/c, 2^(b·c), c)`; None for quantizers without learned parameters."""
    key = param_key(spec, bits)
    if key is None:
        return None
    if key not in params:
        raise RateQError(f"no calibrated {key} for layer {layer} {'keys' if role == 'k' else 'values'}")
    return params[key][layer, :, "kv".index(role)][torch.as_tensor(heads, dtype=torch.long)]
