"""What calibration learns before it prices: static scales and codebooks (`rateq.quant.params`).

One pass over windows held out from the priced ones (`calibration_ids(..., held_out=True)`; the priced windows
themselves only when the text is too short for both, or the ids came as windows, and the calibration facts say
so) collects, per unit, what each learned candidate is fitted to:

- static scales: the running maximum magnitude and a bounded sample of post-RoPE keys and values
  (`rateq.quant.static.ScaleStats`);
- codebooks: a bounded sample of whole head vectors — keys before RoPE for pre-RoPE candidates — with each
  element's Fisher weight, the squared gradient of the loss with respect to it (one backward per batch: the
  diagonal Fisher approximation of the loss a rounding error costs, which KVQuant and Coupled Quantization
  minimise by weighted k-means). Rotated candidates are fitted in their rotated basis, weights rotated alike
  (squared: the diagonal of the rotated Fisher matrix is approximated by rotating the gradient).

Pricing on the fitting windows would flatter the learned candidates (a scale of amax / qmax never clips on the
data it came from, a codebook sits on its own points); the curves are measured on the other windows.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..errors import RateQError
from ..hooks import attention_hook, plain_attention
from ..models import input_device
from ..quant.codec import codec_for
from ..quant.kmeans import learn_unit_codebooks
from ..quant.params import param_key
from ..quant.rope import capture_rope, invert_rope
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec
from ..quant.static import ScaleStats

CODEBOOK_TOKENS = 2048  # tokens kept per unit for codebook learning
CODEBOOK_ITERS = 15  # Lloyd steps at most (each problem stops earlier once it gains < 1e-4 of its error)


class VectorSamples:
    """Per (layer, view) a bounded sample `(H, n, D)` of head vectors and their Fisher weights (same shape).

    Views: `k` (post-RoPE keys), `kpre` (keys before RoPE), `v`. Tokens are kept at a stride fixed by the first
    batch and thinned by halves beyond `cap`, so the sample is deterministic and spread over every batch."""

    def __init__(self, cap: int = CODEBOOK_TOKENS):
        self.cap = cap
        self.x: dict[tuple[int, str], torch.Tensor] = {}
        self.w: dict[tuple[int, str], torch.Tensor] = {}

    def pick(self, t: int) -> torch.Tensor:
        """The token rows (of `t`, batch rows flattened) one batch contributes."""
        stride = max(1, t // max(1, self.cap // 4))
        return torch.arange(0, t, stride)

    def add(self, layer: int, view: str, x: torch.Tensor, w: torch.Tensor | None) -> None:
        """`x (H, m, D)` picked rows of one batch, `w` their weights (None: 1)."""
        key = (layer, view)
        w = torch.ones_like(x) if w is None else w
        for store, t in ((self.x, x), (self.w, w)):
            store[key] = t if key not in store else torch.cat([store[key], t], 1)
        while self.x[key].shape[1] > self.cap:
            self.x[key], self.w[key] = self.x[key][:, ::2], self.w[key][:, ::2]

    def units(self, layer: int, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (layer, view) not in self.x:
            raise RateQError(f"no {view} vectors seen for layer {layer}: cannot learn codebooks")
        return self.x[(layer, view)], self.w[(layer, view)]


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`(B, H, T, D)` → `(H, m, D)` fp32 on the CPU: the picked rows of the flattened batch × tokens."""
    H, D = x.shape[1], x.shape[3]
    return x.detach().transpose(0, 1).reshape(H, -1, D)[:, idx.to(x.device)].to(torch.float32).cpu()


def fit_codebooks(spec: QuantSpec, bits, samples: VectorSamples, num_layers: int, seed: int,
                  fitted: dict | None = None) -> dict:
    """`{param_key: (L, H, 2, D/c, 2^(b·c), c)}` for every width of `bits` `spec` is stored at, fitted per unit by
    Fisher-weighted k-means, centroids rounded to fp16 (what a profile stores). `fitted`: codebooks already
    learned for other specs, by (layer, view, rotation, c, b) — values of a pre-RoPE spec are its twin's."""
    codec = codec_for(spec)
    fitted = {} if fitted is None else fitted
    out = {}
    for b in bits:
        if b >= FULL_PRECISION_BITS or not spec.allows_bits(b):
            continue
        per_layer = []
        for layer in range(num_layers):
            roles = []
            for view in ("kpre" if spec.prerope else "k", "v"):
                key = (layer, view, spec.rotation, spec.seed, spec.group_size, b)
                if key not in fitted:
                    x, w = samples.units(layer, view)
                    if spec.rotation != "none":
                        x, w = codec.rotate(x), codec.rotate(w.sqrt()).square()
                    fitted[key] = learn_unit_codebooks(x, b, spec.group_size, w, seed=seed + layer,
                                                       iters=CODEBOOK_ITERS)
                roles.append(fitted[key])
            per_layer.append(torch.stack(roles, 1))  # (H, 2, G, K, c)
        out[param_key(spec, b)] = torch.stack(per_layer).to(torch.float16).to(torch.float32)
    return out


def learn_params(model, specs: list[QuantSpec], held_out, priced: torch.Tensor, *, bits, num_layers: int,
                 num_kv_heads: int, batch_size: int = 1, seed: int = 0, report=None) -> tuple[dict, dict]:
    """`({param_key: tensor}, facts)` for the learned candidates among `specs` at `bits`; `({}, {})` when there
    are none. `held_out`: a callable giving the held-out windows `(n, T)` (or raising RateQError when the text has
    none), `priced`: the windows the curves are measured on, used only then. `report`: called with progress
    events `{"event": "learn", "stage": "tokens" | "fit", "done", "total", "seconds"}`."""
    report = report or (lambda event: None)
    learned = [q for q in specs if q.learned]
    if not learned:
        return {}, {}
    try:
        ids, windows = held_out(), "held out"
    except RateQError as exc:
        ids, windows = priced, f"the priced windows ({exc})"
    stats = ScaleStats(num_layers, num_kv_heads) if any(q.static_scale for q in learned) else None
    books = [q for q in learned if q.kind == "codebook"]
    samples = VectorSamples() if books else None
    prerope = any(q.prerope for q in books)

    def observe(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        if stats is not None:
            stats.observe(layer, "k", key)
            stats.observe(layer, "v", value)
        if samples is not None:
            idx = samples.pick(key.shape[0] * key.shape[2])
            tables = rope.for_layer(layer) if prerope else None
            # (tensor, {view: map from the tensor, or from its gradient, to that view})
            for t, views in ((key, {"k": None, **({"kpre": tables} if prerope else {})}), (value, {"v": None})):
                rows = {v: _rows(t if tab is None else invert_rope(t.detach(), tab), idx) for v, tab in views.items()}
                if not t.requires_grad:
                    for v, r in rows.items():
                        samples.add(layer, v, r, None)
                    continue

                def on_grad(g, layer=layer, views=views, rows=rows):  # the Fisher weights arrive with the gradient
                    for v, tab in views.items():  # RoPE is orthogonal: the pre-RoPE gradient is the inverse rotation
                        samples.add(layer, v, rows[v], _rows(g if tab is None else invert_rope(g, tab), idx).square())

                t.register_hook(on_grad)
        return plain_attention(module, query, key, value, attention_mask, **kwargs)

    t0 = time.perf_counter()

    def progress(stage, done, total):
        report({"event": "learn", "stage": stage, "done": done, "total": total,
                "seconds": time.perf_counter() - t0})

    emb = model.get_input_embeddings()
    device = input_device(model)  # the embedding's execution device, also when its weights are offloaded
    with attention_hook(model, observe), (capture_rope(model) if prerope else contextlib.nullcontext()) as rope:
        progress("tokens", 0, ids.numel())
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size].to(device)
            if samples is None:
                with torch.no_grad():
                    model.base_model(input_ids=batch, use_cache=False)
            else:
                with torch.enable_grad():  # Fisher weights: gradients of the loss reach every layer's K and V
                    x = emb(batch).detach().requires_grad_(True)
                    logits = model(inputs_embeds=x, use_cache=False).logits
                    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                      batch[:, 1:].flatten().to(logits.device),
                                                      reduction="sum").backward()
            progress("tokens", min(ids.shape[0], i + batch_size) * ids.shape[1], ids.numel())
    params, fitted = {}, {}
    for n, q in enumerate(learned):
        progress("fit", n, len(learned))
        if q.static_scale:
            params[param_key(q, q.fixed_bits)] = stats.fit(q)
        else:
            params.update(fit_codebooks(q, bits, samples, num_layers, seed, fitted))
    progress("fit", len(learned), len(learned))
    facts = {"windows": windows, "tokens": int(ids.numel()), "quantizers": [q.id for q in learned],
             "seconds": round(time.perf_counter() - t0, 3)}  # reading the windows and fitting
    return params, facts
