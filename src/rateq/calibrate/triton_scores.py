"""Key candidates' attention errors on CUDA, fused: what `metrics.candidate_errors` computes for the key units,
without forming any (rows × candidates × keys) tensor.

For one batch row, one KV head `h` and one key candidate `c`, a program takes a block of sampled query rows (every
query head of the group at `P` consecutive sampled positions) and walks the keys they may attend, flash-attention
style, twice:

1. `ŝ = s + δs` with `s = q·k` and `δs = q·(k̂_c − k)` (the difference through the matmul dtype, as the torch path's
   difference form), masked by the allowed pairs: the running maximum and sum of `exp(ŝ)` give `ŝ`'s
   log-sum-exp; the `score` metric's `Σ δs²` is summed on the way;
2. `e = Σ_j (p̂_j − a_j) v_j` with `p̂ = exp(ŝ − lse(ŝ))`, `a = exp(s − lse(s))` (the base log-sum-exp made once per
   row by the same kernel with `BASE`): the output error of the head with only that key unit at candidate `c`,
   the difference again rounded to the matmul dtype (the torch path's `(P̂ − A)·V`), then `Σ e²` (`output`) and
   `Σ (e·|g|)²` (`fisher`, g = ∂loss/∂attention output) over the block's rows.

Each program writes its block's sums; torch adds the blocks up in a fixed order (deterministic). The work is the
scores of an attention forward per candidate (two passes over the keys, one `P·V`), in registers: memory traffic
is the K, K̂ and V tiles, where the torch path writes and reads the softmax of every candidate over every key.

`runs(inp, matmul_dtype, device)` says when it is used: on a CUDA device (or on the CPU when asked for, with
`RATEQ_KERNELS=triton` under Triton's interpreter, `TRITON_INTERPRET=1`: how the tests check it against the torch
path, in fp32 and fp16, the interpreter having no bf16 dot), Triton importable, no reference plan (`key_base`), no
logit soft-capping, head_dim up to 256 (128 with fp32 operands); `RATEQ_KERNELS=torch` turns it off. `launch_config`
keeps a block's shared memory within what every CUDA GPU since sm_80 gives; the tests compile the kernel for sm_86
and sm_90 with Triton's compiler to check it.
"""

from __future__ import annotations

import os

import torch

from ..runtime.kernels.triton_decode import available, interpreting

_NEG = -1e30  # as metrics._NEG: a finite "minus infinity" for masked pairs
BLOCK_ROWS = 64  # query rows (query heads × sampled positions) per program
_state: dict = {}


def runs(inp, matmul_dtype: torch.dtype, device) -> bool:
    """Whether the key candidates of this layer's inputs are scored by the fused kernel on `device`."""
    mode = os.environ.get("RATEQ_KERNELS", "").lower()
    if mode == "torch":
        return False
    kind = torch.device(device).type
    if not (kind == "cuda" or (kind == "cpu" and interpreting() and mode == "triton")):
        return False
    if inp.key_base is not None or inp.value_base is not None or inp.softcap or inp.query.shape[-1] > 256:
        return False
    if _wide(inp.query.dtype, matmul_dtype) and inp.query.shape[-1] > 128:  # fp32 tiles past 99 KB of shared memory
        return False
    if kind == "cpu" and torch.bfloat16 in (inp.query.dtype, matmul_dtype):  # the interpreter has no bf16 dot
        return False
    return matmul_dtype in (torch.float32, torch.bfloat16, torch.float16) and available()


def _wide(dtype: torch.dtype, matmul_dtype: torch.dtype) -> bool:
    """Whether the kernel's dot operands are fp32 (twice the shared memory of 16-bit ones)."""
    return torch.float32 in (dtype, matmul_dtype)


def launch_config(D_PAD: int, dtype: torch.dtype, matmul_dtype: torch.dtype) -> dict:
    """Key tile and pipeline depth: shared memory within 99 KB, what every CUDA GPU since sm_80 gives a block
    (sm_86/sm_89 allow 99 KB, sm_80 163 KB, sm_90 227 KB). 16-bit operands: 64 keys per tile up to head_dim 128,
    32 at 256 (64 KB and 96 KB on sm_90); fp32 ones: 32 keys, one stage (96 KB at head_dim 128; 256 is not taken)."""
    if _wide(dtype, matmul_dtype):
        return dict(BLOCK_N=32, num_stages=1)
    return dict(BLOCK_N=64 if D_PAD <= 128 else 32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _kernel():
    """The jitted kernel, defined on first use (see `runtime.kernels.triton_decode._kernels` for why)."""
    global tl, _add, _larger, _key_errors_kernel
    if "kernel" in _state:
        return _state["kernel"]
    import triton
    import triton.language as tl

    # Reductions through `tl.reduce` with the combine functions of `tl.sum` and `tl.max`: the interpreter reduces
    # those with numpy (any other combine function element by element in Python), and `tl.sum`/`tl.max` themselves
    # are jitted helpers that run in the interpreter only if TRITON_INTERPRET was set before triton was imported.
    _add = tl.standard._sum_combine
    _larger = tl.standard._elementwise_max

    @triton.jit
    def _key_errors_kernel(q, qs_h, qs_t, k, ks_h, ks_s, kh, khs_c, khs_h, khs_s, v, vs_h, vs_s, g, gs_t, gs_h,
                           allowed, as_t, lo, hi, lse, out, scaling, first, stride, n_rows, groups, D, n_blocks,
                           BASE: tl.constexpr, SCORE: tl.constexpr, OUT: tl.constexpr, FISHER: tl.constexpr,
                           GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                           DOT: tl.constexpr, S_IEEE: tl.constexpr, D_IEEE: tl.constexpr):
        """One (row block, candidate, KV head). BASE: write the rows' log-sum-exp of the plain scores to `lse`
        and nothing else. Otherwise `out[metric, h, c, block]` = this block's Σ δs² (SCORE), Σ e² (OUT),
        Σ (e·|g|)² (FISHER), with `lse` the base log-sum-exp per row."""
        blk = tl.program_id(0)
        c = tl.program_id(1).to(tl.int64)
        h = tl.program_id(2).to(tl.int64)
        P: tl.constexpr = BLOCK_M // GP
        i = tl.arange(0, BLOCK_M)
        ti = blk * P + i // GP  # sampled position index
        j = i % GP  # query head within the group
        valid = (ti < n_rows) & (j < groups)
        t = (first + ti * stride).to(tl.int64)
        hq = h * groups + j
        d = tl.arange(0, D_PAD)
        dm = d < D
        qv = tl.load(q + hq[:, None] * qs_h + t[:, None] * qs_t + d[None, :], mask=valid[:, None] & dm[None, :],
                     other=0.0)
        qd = (qv.to(tl.float32) * scaling).to(DOT)  # the scaled query through the matmul dtype (δs)
        k0 = tl.load(lo + blk)
        k1 = tl.load(hi + blk)
        kb = k + h * ks_h
        khb = kh + c * khs_c + h * khs_h
        vb = v + h * vs_h
        row = blk * BLOCK_M + i  # this row's slot in `lse`
        m_run = tl.full((BLOCK_M,), -1e30, tl.float32)
        l_run = tl.full((BLOCK_M,), 0.0, tl.float32)
        sq = tl.full((BLOCK_M,), 0.0, tl.float32)
        # Pass 1: log-sum-exp of the scores (the candidate's, or the plain ones for BASE); Σ δs² for `score`.
        for n0 in range(k0, k1, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < k1
            km = nm[:, None] & dm[None, :]
            kt = tl.load(kb + n[:, None] * ks_s + d[None, :], mask=km, other=0.0)
            ok = tl.load(allowed + t[:, None] * as_t + n[None, :], mask=valid[:, None] & nm[None, :], other=0) != 0
            if S_IEEE:
                s = tl.dot(qv, tl.trans(kt), input_precision="ieee") * scaling
            else:
                s = tl.dot(qv, tl.trans(kt)) * scaling
            if not BASE:
                kc = tl.load(khb + n[:, None] * khs_s + d[None, :], mask=km, other=0.0)
                dk = (kc.to(tl.float32) - kt.to(tl.float32)).to(DOT)
                if D_IEEE:
                    ds = tl.dot(qd, tl.trans(dk), input_precision="ieee")
                else:
                    ds = tl.dot(qd, tl.trans(dk))
                if SCORE:
                    sq += tl.reduce(tl.where(ok, ds * ds, 0.0), 1, _add)
                s = s + ds
            s = tl.where(ok, s, -1e30)
            m_new = tl.maximum(m_run, tl.reduce(s, 1, _larger))
            grown = tl.reduce(tl.where(ok, tl.exp(s - m_new[:, None]), 0.0), 1, _add)
            l_run = l_run * tl.exp(m_run - m_new) + grown
            m_run = m_new
        # A row that attends something sums at least exp(0) = 1; one that attends nothing (0) reads no key below.
        lse_row = m_run + tl.log(tl.maximum(l_run, 1e-30))
        if BASE:
            tl.store(lse + h * n_blocks * BLOCK_M + row, lse_row)
        else:
            base = n_blocks * 3
            slot = (h * tl.num_programs(1) + c) * base + blk
            if SCORE:
                tl.store(out + slot, tl.reduce(tl.where(valid, sq, 0.0), 0, _add))
            if OUT or FISHER:
                lse0 = tl.load(lse + h * n_blocks * BLOCK_M + row)
                e = tl.full((BLOCK_M, D_PAD), 0.0, tl.float32)
                # Pass 2: e = Σ (p̂ − a) v, the difference through the matmul dtype.
                for n0 in range(k0, k1, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    nm = n < k1
                    km = nm[:, None] & dm[None, :]
                    kt = tl.load(kb + n[:, None] * ks_s + d[None, :], mask=km, other=0.0)
                    kc = tl.load(khb + n[:, None] * khs_s + d[None, :], mask=km, other=0.0)
                    ok = tl.load(allowed + t[:, None] * as_t + n[None, :], mask=valid[:, None] & nm[None, :],
                                 other=0) != 0
                    dk = (kc.to(tl.float32) - kt.to(tl.float32)).to(DOT)
                    if S_IEEE:
                        s = tl.dot(qv, tl.trans(kt), input_precision="ieee") * scaling
                    else:
                        s = tl.dot(qv, tl.trans(kt)) * scaling
                    if D_IEEE:
                        ds = tl.dot(qd, tl.trans(dk), input_precision="ieee")
                    else:
                        ds = tl.dot(qd, tl.trans(dk))
                    # Masked pairs at the finite minus infinity before exp (no overflow), then no weight at all.
                    p_hat = tl.exp(tl.where(ok, s + ds, -1e30) - lse_row[:, None])
                    a = tl.exp(tl.where(ok, s, -1e30) - lse0[:, None])
                    dp = tl.where(ok, p_hat - a, 0.0).to(DOT)
                    vt = tl.load(vb + n[:, None] * vs_s + d[None, :], mask=km, other=0.0).to(DOT)
                    if D_IEEE:
                        e += tl.dot(dp, vt, input_precision="ieee")
                    else:
                        e += tl.dot(dp, vt)
                if OUT:
                    tl.store(out + n_blocks + slot, tl.reduce(tl.reduce(e * e, 1, _add), 0, _add))
                if FISHER:
                    gv = tl.load(g + t[:, None] * gs_t + hq[:, None] * gs_h + d[None, :],
                                 mask=valid[:, None] & dm[None, :], other=0.0).to(tl.float32)
                    eg = e * tl.abs(gv)
                    tl.store(out + 2 * n_blocks + slot, tl.reduce(tl.reduce(eg * eg, 1, _add), 0, _add))

    _state["kernel"] = _key_errors_kernel
    return _key_errors_kernel


def _rows(d: torch.Tensor) -> torch.Tensor:
    """`d` with unit stride along its last dim (the kernel's assumption), copied only when it is not."""
    return d if d.stride(-1) == 1 else d.contiguous()


def key_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor, allowed: torch.Tensor,
               grad: torch.Tensor | None, scaling: float, first: int, stride: int, metrics,
               matmul_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`{metric: (Hkv, Ck) float64}` for one batch row: the key candidates' sums over the sampled query rows
    `first, first + stride, …` (not yet scaled to every row), for the metrics among `score`, `output`, `fisher`.

    `q` `(Hq, T, D)`, `k`/`v` `(Hkv, S, D)`, `k_hat` `(Ck, Hkv, S, D)`, `allowed` `(T, S)` bool, `grad` `(T, Hq, D)`
    (fisher only); any dtype the model computes in, any strides with unit stride along D."""
    metrics = set(metrics) & {"score", "output", "fisher"}
    Hq, T, D = q.shape
    Hkv, S = k.shape[0], k.shape[1]
    Ck = k_hat.shape[0]
    groups = Hq // Hkv
    n_rows = len(range(first, T, stride))
    dev = q.device
    zero = {m: torch.zeros(Hkv, Ck, dtype=torch.float64, device=dev) for m in metrics}
    if not metrics or Ck == 0 or n_rows == 0:
        return zero
    GP = _next_pow2(groups)
    BLOCK_M = max(BLOCK_ROWS, GP)
    P = BLOCK_M // GP
    n_blocks = -(-n_rows // P)
    D_PAD = max(16, _next_pow2(D))
    from .metrics import visible_band  # (metrics imports this module)

    # Each block's band of keys: from the first key any of its rows may attend to one past the last.
    lo_row, hi_row = visible_band(allowed[first::stride][:n_rows])  # rows (n_rows,)
    pad = n_blocks * P - n_rows
    lo = torch.nn.functional.pad(lo_row, (0, pad), value=S).view(n_blocks, P).amin(-1).to(torch.int32)
    hi = torch.nn.functional.pad(hi_row, (0, pad), value=0).view(n_blocks, P).amax(-1).to(torch.int32)
    lo = torch.minimum(lo, hi)
    q, k, v, k_hat = _rows(q), _rows(k), _rows(v), _rows(k_hat)
    mask = _rows(allowed.to(torch.uint8))
    if "fisher" in metrics:
        g = _rows(grad)
    else:
        g = q.new_zeros(1, 1, 1)
    kernel = _kernel()  # defines `tl`
    dot = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[matmul_dtype]
    lse = torch.empty(Hkv, n_blocks * BLOCK_M, dtype=torch.float32, device=dev)
    out = torch.zeros(Hkv, Ck, 3, n_blocks, dtype=torch.float32, device=dev)
    common = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), k_hat, k_hat.stride(0), k_hat.stride(1),
              k_hat.stride(2), v, v.stride(0), v.stride(1), g, g.stride(0), g.stride(1), mask, mask.stride(0), lo, hi,
              lse, out, float(scaling), first, stride, n_rows, groups, D, n_blocks)
    meta = dict(GP=GP, BLOCK_M=BLOCK_M, D_PAD=D_PAD, DOT=dot, S_IEEE=q.dtype == torch.float32,
                D_IEEE=matmul_dtype == torch.float32, **launch_config(D_PAD, q.dtype, matmul_dtype))
    kernel[(n_blocks, 1, Hkv)](*common, BASE=True, SCORE=False, OUT=False, FISHER=False, **meta)
    kernel[(n_blocks, Ck, Hkv)](*common, BASE=False, SCORE="score" in metrics, OUT="output" in metrics,
                                FISHER="fisher" in metrics, **meta)
    sums = out.double().sum(-1)  # blocks added in a fixed order
    return {m: sums[:, :, ("score", "output", "fisher").index(m)] for m in metrics}
