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

from dataclasses import dataclass

import torch

from . import triton_scores

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
    allowed_host: torch.Tensor | None = None  # `allowed` on the CPU, where the caller holds a copy (else made here)


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


def visible_band(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `(..., S)` → per row, the first True column and one past the last (`S` and 0 where there is none)."""
    S = m.shape[-1]
    some = m.any(-1)
    lo = torch.where(some, m.to(torch.uint8).argmax(-1), S)
    hi = torch.where(some, S - m.flip(-1).to(torch.uint8).argmax(-1), 0)
    return lo, hi


def row_blocks(ok: torch.Tensor, rows: int) -> list[tuple[int, int, int, int, int, int, bool]]:
    """Blocks of `rows` consecutive query rows of `ok` `(n, S)` bool (the allowed pairs of the rows scored) →
    `[(r0, r1, ks, ke, m0, m1, live)]`: the block's rows `r0:r1`, the band of keys `ks:ke` any of them may attend
    (blocks that attend nothing are left out), the columns `ks + m0 : ks + m1` of that band where some row of the
    block may not attend (`m0 == m1`: none), and whether every row attends something. All blocks at once, on the
    CPU: the chunk loop then needs no value read back from a GPU."""
    ok = ok.cpu()
    n, S = ok.shape
    nb = -(-n // rows)
    real = torch.arange(nb * rows) < n  # padding rows (past n) attend nothing and ban nothing
    okp = torch.zeros(nb * rows, S, dtype=torch.bool)
    okp[:n] = ok
    cols = torch.arange(S)
    ks, ke = visible_band(okp.view(nb, rows, S).any(1))
    ban = ((~okp) & real[:, None]).view(nb, rows, S).any(1) & (cols >= ks[:, None]) & (cols < ke[:, None])
    m0, m1 = visible_band(ban)
    live = (okp.any(-1) | ~real).view(nb, rows).all(-1)
    out = []
    for i, (a, b, c, d, e) in enumerate(zip(ks.tolist(), ke.tolist(), m0.tolist(), m1.tolist(), live.tolist())):
        if b > a:
            out.append((i * rows, min(n, (i + 1) * rows), a, b, c - a if d > c else 0, d - a if d > c else 0, e))
    return out


def _sum_squares(e: torch.Tensor, dims) -> torch.Tensor:
    """Σ e² over `dims` in one pass with no temporary (a norm's reduction, squared back)."""
    return torch.linalg.vector_norm(e, dim=dims).square_().double()


def candidate_errors(inp: LayerInputs, k_hat: torch.Tensor, v_hat: torch.Tensor, metrics, *,
                     grad: torch.Tensor | None = None, chunk_elements: int = 1 << 23,
                     matmul_dtype: torch.dtype = torch.float32, row_split: int = 16, query_stride: int = 1,
                     query_offset: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per metric, float64 sums `(keys (Hkv, Ck), values (Hkv, Cv))` for one layer and batch.

    `k_hat` `(Ck, B, Hkv, S, D)`, `v_hat` `(Cv, B, Hkv, S, D)`: the stored form of the keys/values under every
    candidate of that role (positions the policy keeps in full precision equal `key`/`value`). `grad`:
    `(B, T, Hq, D)` ∂loss/∂attention output, needed for `fisher`. `chunk_elements` bounds the largest temporary
    (candidates × query heads × query rows × keys), so memory does not grow with the candidates or the sequence;
    `row_split`: the query rows are cut into at least that many chunks, each computing only the band of keys its
    rows see (causal masks: 53% of the square at 16, 62% at 4; a GPU takes 4, for each chunk's forty-odd kernel
    launches cost more there than the extra math). The chunks' bounds are read from the mask on the CPU
    (`allowed_host`, or a copy made here), so no value is read back from the device on the way.

    `query_stride` > 1 scores every `query_stride`-th query row (from `query_offset + b` in batch row b, so that a
    sequence's rows do not depend on the batch it came in) and scales the attention
    metrics by the rows there are over the rows scored: an unbiased estimate of the full sums at a fraction of
    the cost (every key and value position is still measured, by the queries sampled). `mse` uses every position.

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
    Ck, Cv = k_hat.shape[0], v_hat.shape[0]
    groups = Hq // Hkv
    dev = q.device
    out = {m: (torch.zeros(Hkv, Ck, dtype=torch.float64, device=dev),
               torch.zeros(Hkv, Cv, dtype=torch.float64, device=dev)) for m in metrics}

    if "mse" in metrics:
        for r, (x, xh) in enumerate(((k, k_hat), (v, v_hat))):
            if xh.shape[0]:  # (C, B, Hkv, S, D) → (Hkv, C)
                out["mse"][r].add_(_sum_squares(xh.float() - x.float(), (1, 3, 4)).T)
    if not metrics & set(ATTENTION_METRICS):
        return out

    want_out = bool(metrics & {"output", "fisher"})
    kb = k if inp.key_base is None else inp.key_base
    vb = v if inp.value_base is None else inp.value_base
    same_base = inp.key_base is None
    lowp = matmul_dtype != torch.float32
    # On CUDA the key candidates are scored by one fused kernel per batch row (triton_scores), the values here.
    fused = bool(Ck) and triton_scores.runs(inp, matmul_dtype, dev)
    C = max(Cv, 0 if fused else Ck, 1)  # candidates in the chunk loop's widest temporary
    for b in range(B):
        first = (query_offset + b) % query_stride  # rows first, first + stride, …: strided views, no copy
        n_rows = len(range(first, T, query_stride))
        if fused:
            keys = triton_scores.key_errors(q[b], k[b], v[b], k_hat[:, b], inp.allowed[b],
                                            None if grad is None else grad[b], inp.scaling, first, query_stride,
                                            metrics, matmul_dtype)
            for m, sums in keys.items():
                out[m][0].add_(sums, alpha=T / n_rows)
            if not Cv:
                continue
        if Cv:  # each value candidate's error δV (and its squared norm per position) once per batch row, formed in
            # place in the layout the chunks read (Hkv, S, Cv, D): one fp32 copy of the candidates, no other
            dv = torch.empty(Hkv, S, Cv, D, device=dev).copy_(v_hat[:, b].permute(1, 2, 0, 3))
            dv.sub_(v[b].float()[:, :, None])
            dv2_all = dv.pow(2).sum(-1).permute(2, 0, 1).contiguous() if "score" in metrics else None  # (Cv, Hkv, S)
            dvc_all = None
            if want_out:
                dvc_all = dv.view(Hkv, S, Cv * D)
                dvc_all = dvc_all.to(matmul_dtype) if lowp else dvc_all
            del dv
        # Query rows per chunk: bounded by `chunk_elements` for the widest temporary (Hkv, groups·rows, C, keys),
        # and by 1/row_split of the rows so that causal chunks skip most of the masked upper triangle.
        rows = max(1, min(n_rows, chunk_elements // max(1, Hq * C * S), max(32, -(-n_rows // row_split))))
        acc = {m: (torch.zeros_like(sums[0]), torch.zeros_like(sums[1])) for m, sums in out.items() if m != "mse"}
        # Causal and sliding-window masks: only a band of keys is visible to a block of queries, and its masked
        # pairs sit in a narrow band of columns (the diagonal block for causal masks). Bounds read on the CPU.
        host = inp.allowed if inp.allowed_host is None else inp.allowed_host
        # Once per batch row, sliced by the chunks: the sampled queries scaled, |∂loss/∂output| (fisher), K and V
        # in fp32.
        qs = q[b, :, first::query_stride].float() * inp.scaling  # (Hq, n_rows, D)
        ga = grad[b, first::query_stride].float().abs().permute(1, 0, 2) if "fisher" in metrics else None
        kf, vf = k[b].float(), v[b].float()  # (Hkv, S, D)
        kbf, vbf = (kf, vf) if same_base else (kb[b].float(), vb[b].float())
        for r0, r1, ks, ke, m0, m1, all_live in row_blocks(host[b, first::query_stride], rows):
            ts = slice(first + r0 * query_stride, first + (r1 - 1) * query_stride + 1, query_stride)
            ok = inp.allowed[b, ts, ks:ke]  # (Tc, Sc)
            Tc, Sc = r1 - r0, ke - ks
            # Each KV head's query heads stacked along rows: (Hkv, groups·Tc, D), no K/V repetition needed.
            qg = qs[:, r0:r1].reshape(Hkv, groups * Tc, D)
            # Only the masked band is touched, in place; a finite "minus infinity" keeps fully masked rows free of nan.
            banned = (~ok[:, m0:m1]).repeat(groups, 1)  # (groups·Tc, m1 − m0)
            # Rows that attend nothing (left padding) would get uniform weights: they contribute no error.
            live = None if all_live else ok.any(-1).float().repeat(groups)[:, None]
            kc, vc, kbc, vbc = (x[:, ks:ke] for x in (kf, vf, kbf, vbf))  # (Hkv, Sc, D)
            g = None  # |∂loss/∂output|: its square weights the output error (fisher)
            if ga is not None:
                g = ga[:, r0:r1].reshape(Hkv, groups * Tc, D)
                if live is not None:
                    g = g * live

            def logits(keys):  # (Hkv, n, D) → (Hkv, groups·Tc, n) scaled scores, unmasked
                return qg @ keys.transpose(-1, -2)

            def probs(raw, inplace=False):  # raw scores (…, Sc) → attention weights, capped and masked as the model
                if inp.softcap:
                    raw = torch.tanh(raw / inp.softcap) * inp.softcap
                elif not inplace:
                    raw = raw.clone()
                if m1 > m0:
                    raw[..., m0:m1].masked_fill_(banned if raw.dim() == 3 else banned[:, None], _NEG)
                return torch.softmax(raw, dim=-1)

            def add_output(r, e):  # e (Hkv, groups·Tc, C, D) output errors of role r's candidates → sums
                if "output" in metrics:
                    acc["output"][r].add_(_sum_squares(e if live is None else e * live[:, :, None], (1, 3)))
                if g is not None:
                    acc["fisher"][r].add_(_sum_squares(e.mul_(g[:, :, None]), (1, 3)))

            s = logits(kc)  # (Hkv, groups·Tc, Sc)
            a_base = probs(s if same_base else logits(kbc))  # weights the value units are measured under
            if live is not None:
                a_base = a_base * live

            # --- key units: every candidate's scores in one matmul, candidates folded into the key axis
            if Ck and not fused:
                kh = k_hat[:, b, :, ks:ke].float().transpose(0, 1).reshape(Hkv, Ck * Sc, D)
                if lowp:
                    dk = (kh.view(Hkv, Ck, Sc, D) - kc[:, None]).view(Hkv, Ck * Sc, D).to(matmul_dtype)
                    ds = (qg.to(matmul_dtype) @ dk.transpose(-1, -2)).float().view(
                        Hkv, groups * Tc, Ck, Sc)
                    s_hat = ds + s[:, :, None]
                else:
                    s_hat = logits(kh).view(Hkv, groups * Tc, Ck, Sc)
                    ds = s_hat - s[:, :, None] if "score" in metrics else None
                if "score" in metrics:
                    ds[..., m0:m1].masked_fill_(banned[:, None], 0.0)
                    acc["score"][0].add_(_sum_squares(ds, (1, 3)))
                del ds
                if want_out:
                    a = a_base if same_base else probs(s)
                    p_hat = probs(s_hat, inplace=True)  # (Hkv, groups·Tc, Ck, Sc)
                    del s_hat
                    if lowp:
                        dp = p_hat.sub_(a[:, :, None]).to(matmul_dtype).view(Hkv, groups * Tc * Ck, Sc)
                        e = (dp @ vbc.to(matmul_dtype)).float().view(Hkv, groups * Tc, Ck, D)
                        del dp
                    else:
                        o_ref = a @ vbc  # (Hkv, groups·Tc, D): key unit at full precision, values as the base has them
                        e = (p_hat.view(Hkv, groups * Tc * Ck, Sc) @ vbc).view(Hkv, groups * Tc, Ck, D)
                        e.sub_(o_ref[:, :, None])
                    del p_hat
                    add_output(0, e)
                    del e
                s_hat = None

            # --- value units: A (V̂ − V) for every candidate, candidates folded into the channel axis
            if Cv:
                if "score" in metrics:
                    w = a_base.pow(2).sum(1)  # (Hkv, Sc): Σ over query heads and rows of A²
                    acc["score"][1].add_((dv2_all[:, :, ks:ke] * w[None]).sum(-1).T.double())
                if want_out:
                    e = (a_base.to(matmul_dtype) @ dvc_all[:, ks:ke]).float()  # (Hkv, groups·Tc, Cv·D)
                    add_output(1, e.view(Hkv, groups * Tc, Cv, D))
                    del e
        for m in acc:  # this sequence's sums over the rows scored, scaled to all of its rows
            for r in range(2):
                out[m][r].add_(acc[m][r], alpha=T / n_rows)
    return out
