"""Distortion of every candidate of every unit of one layer: pure tensor math, no model, no hooks.

A layer's units are its KV heads' keys (role 0) and values (role 1). For each unit and each candidate
`c` (a quantizer at a bit width) the metrics are sums over the batch's tokens and over the query heads that
read the unit:

- `mse`    Σ ‖k − k̂‖² (or v) over stored positions;
- `score`  keys: Σ over allowed (query t, key j) pairs of (scaling · q_t·(k_j − k̂_j))²; values: the
           attention-weighted error Σ A_tj² ‖v_j − v̂_j‖² (HeadQ's A² weighting);
- `output` ‖softmax(q K̂ᵀ) V − softmax(q Kᵀ) V‖² for keys, ‖A (V̂ − V)‖² for values: the head's attention
           output with only that unit quantized;
- `fisher` the same output error weighted element-wise by g², g = ∂loss/∂(head attention output): a diagonal
           empirical-Fisher estimate of the loss increase (×2).

Heads of one layer never read each other's K/V, so quantizing every head's keys at once and reading each
query head's error gives exactly the "only that unit quantized" error of every unit in one batched pass.

Around a reference plan (`key_base`/`value_base` = the plan's stored K/V), the K unit's candidates are
measured with the head's values in their reference form and vice versa: the delta of moving that one unit
from full precision to the candidate while the rest of the model runs as the plan says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METRICS = ("mse", "score", "output", "fisher")
ATTENTION_METRICS = ("score", "output", "fisher")  # need the (query, key) scores
_NEG = -1e30


@dataclass
class LayerInputs:
    """What one attention call hands the calibration, batch-first as transformers passes it."""

    query: torch.Tensor  # (B, Hq, T, D) post-RoPE
    key: torch.Tensor  # (B, Hkv, S, D) full precision (as this forward computed it)
    value: torch.Tensor  # (B, Hkv, S, D)
    allowed: torch.Tensor  # (B, T, S) bool: query t may attend key j (causal, padding, sliding window)
    scaling: float
    key_base: torch.Tensor | None = None  # (B, Hkv, S, D) reference plan's stored keys (None: = key)
    value_base: torch.Tensor | None = None  # (B, Hkv, S, D)
    softcap: float | None = None  # logit soft-capping (Gemma 2 style), applied as the model does
    rope: tuple | None = None  # (cos, sin) of the positions, for pre-RoPE key quantizers


def allowed_pairs(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> torch.Tensor:
    """`(B, T, S)` bool from the additive (or boolean) mask transformers passes; None means plain causal."""
    if attention_mask is None:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        return causal.expand(batch, q_len, kv_len)
    m = attention_mask[:, 0, :, :kv_len]  # masks are (B, 1, T, S); one head row serves all heads
    if m.dtype == torch.bool:
        return m
    # Additive masks hold 0 where allowed and the dtype's minimum (or -inf) where not.
    return m > torch.finfo(m.dtype).min / 2


def candidate_errors(inp: LayerInputs, k_hat: torch.Tensor, v_hat: torch.Tensor, metrics, *,
                     grad: torch.Tensor | None = None, chunk_elements: int = 1 << 23,
                     matmul_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Per-metric `(2, Hkv, C)` float64 sums for one layer and batch.

    `k_hat`, `v_hat`: `(C, B, Hkv, S, D)` stored form of the keys/values under every candidate (positions the
    policy keeps in full precision equal `key`/`value`). `grad`: `(B, T, Hq, D)` ∂loss/∂attention output,
    needed for `fisher`. `chunk_elements` bounds the largest temporary (candidates × query heads × query
    rows × keys), so memory does not grow with the candidates or the sequence.

    `matmul_dtype` below fp32 (bf16 on GPUs) switches the candidate matmuls to the difference form: only the
    small deltas (q·δk, (P̂ − P)·V, A·δV) go through the low-precision matmul, so its rounding is relative to the
    quantization error, not to the scores or outputs themselves; softmax and sums stay in fp32.
    """
    metrics = set(metrics)
    if "fisher" in metrics and grad is None:
        raise ValueError("the fisher metric needs the gradient of the attention output")
    q, k, v = inp.query, inp.key, inp.value
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    C = k_hat.shape[0]
    groups = Hq // Hkv
    dev = q.device
    out = {m: torch.zeros(2, Hkv, C, dtype=torch.float64, device=dev) for m in metrics}

    if "mse" in metrics:
        for r, (x, xh) in enumerate(((k, k_hat), (v, v_hat))):
            # (C, B, Hkv, S, D) → (C, Hkv)
            out["mse"][r] = (xh.float() - x.float()).pow(2).sum((1, 3, 4)).T.double()
    if not metrics & set(ATTENTION_METRICS):
        return out

    want_out = bool(metrics & {"output", "fisher"})
    kb = k if inp.key_base is None else inp.key_base
    vb = v if inp.value_base is None else inp.value_base
    same_base = inp.key_base is None
    lowp = matmul_dtype != torch.float32
    # Query rows per chunk: bounded by `chunk_elements` for the widest temporary (Hkv, groups·rows, C, keys),
    # and at most T/16 so that causal chunks skip most of the masked upper triangle.
    rows = max(1, min(T, chunk_elements // max(1, Hq * C * S), max(32, -(-T // 16))))

    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            ok = inp.allowed[b, t0:t1]  # (Tc, S)
            cols = ok.any(0).nonzero()
            if cols.numel() == 0:
                continue
            # Causal and sliding-window masks: only a band of keys is visible to this block of queries.
            ks, ke = int(cols[0]), int(cols[-1]) + 1
            ok = ok[:, ks:ke]
            Tc, Sc = t1 - t0, ke - ks
            # Each KV head's query heads stacked along rows: (Hkv, groups·Tc, D), no K/V repetition needed.
            qg = q[b, :, t0:t1].float().reshape(Hkv, groups * Tc, D)
            # Masked pairs sit in a narrow band of columns (the diagonal block for causal masks): only that band
            # is touched, in place. A finite "minus infinity" keeps fully masked rows free of nan.
            banned = (~ok).repeat(groups, 1)  # (groups·Tc, Sc)
            band = banned.any(0).nonzero()
            m0, m1 = (int(band[0]), int(band[-1]) + 1) if band.numel() else (0, 0)
            banned = banned[:, m0:m1]
            # Rows that attend nothing (left padding) would get uniform weights: they contribute no error.
            live = None if bool(ok.any(-1).all()) else ok.any(-1).float().repeat(groups)[:, None]
            kc, vc = k[b, :, ks:ke].float(), v[b, :, ks:ke].float()  # (Hkv, Sc, D)
            kbc, vbc = (kc, vc) if same_base else (kb[b, :, ks:ke].float(), vb[b, :, ks:ke].float())
            g2 = None
            if "fisher" in metrics:
                g2 = grad[b, t0:t1].float().permute(1, 0, 2).reshape(Hkv, groups * Tc, D).pow(2)

            def logits(keys):  # (Hkv, n, D) → (Hkv, groups·Tc, n) scaled scores, unmasked
                return (qg * inp.scaling) @ keys.transpose(-1, -2)

            def probs(raw, inplace=False):  # raw scores (…, Sc) → attention weights, capped and masked as the model
                if inp.softcap:
                    raw = torch.tanh(raw / inp.softcap) * inp.softcap
                elif not inplace:
                    raw = raw.clone()
                if m1 > m0:
                    raw[..., m0:m1].masked_fill_(banned if raw.dim() == 3 else banned[:, None], _NEG)
                return torch.softmax(raw, dim=-1)

            s = logits(kc)  # (Hkv, groups·Tc, Sc)
            a_base = probs(s if same_base else logits(kbc))  # weights the value units are measured under
            if live is not None:
                a_base = a_base * live

            # --- key units: every candidate's scores in one matmul, candidates folded into the key axis
            kh = k_hat[:, b, :, ks:ke].float().transpose(0, 1).reshape(Hkv, C * Sc, D)
            if lowp:
                dk = (kh.view(Hkv, C, Sc, D) - kc[:, None]).view(Hkv, C * Sc, D).to(matmul_dtype)
                ds = ((qg * inp.scaling).to(matmul_dtype) @ dk.transpose(-1, -2)).float().view(Hkv, groups * Tc, C, Sc)
                s_hat = ds + s[:, :, None]
            else:
                s_hat = logits(kh).view(Hkv, groups * Tc, C, Sc)
                ds = s_hat - s[:, :, None] if "score" in metrics else None
            if "score" in metrics:
                ds[..., m0:m1].masked_fill_(banned[:, None], 0.0)
                out["score"][0] += ds.square_().sum((1, 3)).double()
            del ds
            if want_out:
                a = a_base if same_base else probs(s)
                p_hat = probs(s_hat, inplace=True)  # (Hkv, groups·Tc, C, Sc)
                del s_hat
                if lowp:
                    dp = p_hat.sub_(a[:, :, None]).to(matmul_dtype).view(Hkv, groups * Tc * C, Sc)
                    e = (dp @ vbc.to(matmul_dtype)).float().view(Hkv, groups * Tc, C, D)
                    del dp
                else:
                    o_ref = a @ vbc  # (Hkv, groups·Tc, D): key unit at full precision, values as the base has them
                    e = (p_hat.view(Hkv, groups * Tc * C, Sc) @ vbc).view(Hkv, groups * Tc, C, D) - o_ref[:, :, None]
                del p_hat
                e = e.square_() if live is None else e.square_() * live[None, :, :, None]
                if "output" in metrics:
                    out["output"][0] += e.sum((1, 3)).double()
                if g2 is not None:
                    out["fisher"][0] += (e * g2[:, :, None]).sum((1, 3)).double()
                del e
            s_hat = None

            # --- value units: A (V̂ − V) for every candidate, candidates folded into the channel axis
            dv = v_hat[:, b, :, ks:ke].float() - vc[None]  # (C, Hkv, Sc, D)
            if "score" in metrics:
                w = a_base.pow(2).sum(1)  # (Hkv, Sc): Σ over query heads and rows of A²
                out["score"][1] += (dv.pow(2).sum(-1) * w[None]).sum(-1).T.double()
            if want_out:
                dvc = dv.permute(1, 2, 0, 3).reshape(Hkv, Sc, C * D)
                e = (a_base.to(matmul_dtype) @ dvc.to(matmul_dtype)).float()  # (Hkv, groups·Tc, C·D)
                e = e.view(Hkv, groups * Tc, C, D).square_()
                if "output" in metrics:
                    out["output"][1] += e.sum((1, 3)).double()
                if g2 is not None:
                    out["fisher"][1] += (e * g2[:, :, None]).sum((1, 3)).double()
    return out
