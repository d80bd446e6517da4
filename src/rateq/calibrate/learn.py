"""What calibration learns before it prices: the static scales of formats that store no per-token metadata.

A forward-only pass over windows held out from the priced ones (`calibration_ids(..., held_out=True)`; the
priced windows themselves only when the text is too short for both, or the ids came as windows, and the
calibration facts say so) folds every layer's post-RoPE keys and values into a `ScaleStats`; each static-scale
candidate's scales are then fitted (`rateq.quant.static`). Pricing on the fitting windows would flatter them:
on those, a scale of amax / qmax never clips.
"""

from __future__ import annotations

import torch

from ..errors import RateQError
from ..hooks import attention_hook, plain_attention
from ..quant.spec import QuantSpec
from ..quant.static import ScaleStats, scale_key


def learn_scales(model, specs: list[QuantSpec], held_out, priced: torch.Tensor, *, num_layers: int,
                 num_kv_heads: int, batch_size: int = 1) -> tuple[dict, dict]:
    """`({scale_key: (L, H, 2) scales}, facts)` for the static-scale formats among `specs`; `({}, {})` when
    there are none. `held_out`: a callable giving the held-out windows `(n, T)` (or raising RateQError when the
    text has none), `priced`: the windows the curves are measured on, used only then."""
    static = [q for q in specs if q.static_scale]
    if not static:
        return {}, {}
    try:
        ids, windows = held_out(), "held out"
    except RateQError as exc:
        ids, windows = priced, f"the priced windows ({exc})"
    stats = ScaleStats(num_layers, num_kv_heads)

    def observe(module, query, key, value, attention_mask, **kwargs):
        stats.observe(module.layer_idx, "k", key)
        stats.observe(module.layer_idx, "v", value)
        return plain_attention(module, query, key, value, attention_mask, **kwargs)

    device = model.get_input_embeddings().weight.device
    with attention_hook(model, observe), torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            model.base_model(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
    params = {scale_key(q): stats.fit(q) for q in static}
    facts = {"windows": windows, "tokens": int(ids.numel()), "formats": [q.id for q in static]}
    return params, facts
