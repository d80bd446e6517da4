"""Decode attention straight from a bucket's packed codes, on CUDA: the Triton counterpart of `decode.c`.

`scores(bucket, q, out)` and `mix(bucket, p, out)` compute what `rateq.runtime.kernels.scores/mix` compute (and
`Bucket.scores/mix`, the torch path, `rateq.quant.attend`): `q·k̂` for every stored key, `Σ p v̂` over every
stored value, with nothing of the dense history formed. Each program takes one (batch row, KV head) and a tile
of tokens, reads the tile's packed bytes, unpacks the codes with shifts and masks (any width 1..8: code `d` of a
row sits at bit `d·bits`, little-endian, straddling two bytes at 3, 5, 6, 7 bits), looks them up in the
Lloyd–Max levels or takes them as integers, applies the metadata, per (token, group of G channels) or per
(block of G tokens, channel), and multiplies with the `r` query heads of that KV head at once (GQA without
repeating K or V). Integer zero-points are unpacked in the kernel too, from packed rows or from a stream. Learned
codebooks store one code of b·c bits per group of c channels and nothing else: each channel reads its group's
code and looks its coordinate up in the head's centroids (`(h, D/c, 2^(b·c), c)` fp32, moved to the device
with the bucket's first append).

Rotated buckets (Walsh–Hadamard) rotate the query once before the scores kernel and unrotate the output once
after the mix kernel, in torch (`Codec.rotate`). The mix kernel splits the tokens of a head across programs,
each writing its partial sums to a workspace that torch adds up in a fixed order: deterministic.

Pre-RoPE keys re-apply RoPE to each row at its own position, in the scores kernel, with the tables of the stored
positions (`bucket.span`: `(cos, sin)` `(length, D)`, shared by every batch row). Rotate-half needs each channel's
partner `(d + D/2) % D`: plain keys dequantize the tile a second time at the partner channels (dequantization is
elementwise in (token, channel)); rotated keys are unrotated per row in the kernel, `k = x·M` with
`M = H·diag(s)/sqrt(D)`, and the partner is `x·M'` with `M'` the columns of `M` permuted — two `tl.dot`s over
chunks of channels, with the matrices built once per (D, seed, device) in torch. Then
`k[d] = k[d]·cos[d] ∓ k'[d]·sin[d]` (− on the first half) and the scores as for any other key.

`runs(bucket, device)` says which buckets run here: uniform grids (min-max or symmetric, float or integer
zero-points, groups along tokens or channels), Lloyd–Max codebooks and learned codebooks (codes in whole rows),
rotated or not, keys pre- or post-RoPE (pre-RoPE: when the store gives the tables, `bucket.span`), head_dim a
multiple of 8 up to 256 (a power of two when rotated), on a CUDA device — or on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1`), which is how the tests check these kernels against the torch path. Where
the tables differ by row (`span` gives None: a position shift, RoPE that depends on the length) `scores` computes
the torch path itself. QJL sketches, sparse outliers and 16-bit buckets use the torch path; `RATEQ_KERNELS=torch`
forces it. Triton is imported on first use only, so rateq never needs it.
"""

from __future__ import annotations

import os

import torch

from ...quant import hadamard, lloydmax
from . import MAX_R, codebook_family, fused_family

TILE_ELEMENTS = 4096  # a tile holds at most this many dequantized values (64 tokens up to head_dim 64)
TARGET_PROGRAMS = 512  # mix splits each head's tokens so that about this many programs run
ROPE_TILE_ELEMENTS = 2048  # pre-RoPE keys hold about four tiles at once (rows, partners, cos, sin): smaller tiles
MAT_ELEMENTS = 4096  # rotated pre-RoPE keys read the unrotation matrices this many entries (KC rows) at a time

_state: dict = {}


def available() -> bool:
    """Whether Triton can be imported."""
    if "available" not in _state:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _state["available"] = True
        except Exception:  # not installed, or a build that does not load here
            _state["available"] = False
    return _state["available"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors), `TRITON_INTERPRET=1`."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def runs(bucket, device) -> bool:
    """Whether `bucket`'s family and shape run in the Triton kernels on `device`."""
    if os.environ.get("RATEQ_KERNELS", "").lower() == "torch":
        return False
    kind = torch.device(device).type
    if not (kind == "cuda" or (kind == "cpu" and interpreting())):
        return False
    if bucket.prerope and bucket.span is None:  # no shared tables to re-apply RoPE with: the torch path
        return False
    return (fused_family(bucket) or codebook_family(bucket)) and available()


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile(D_PAD: int, elements: int | None = None) -> int:
    """Tokens per tile: 16 to 64, fewer for wider heads, so that a tile stays in registers."""
    return max(16, min(64, (TILE_ELEMENTS if elements is None else elements) // D_PAD))


def _kernels():
    """The two jitted kernels (`scores`, `mix`), defined on first use."""
    # Module globals, not closures: the interpreter and the compiler both resolve a kernel's names (`tl`, the
    # helpers it calls) in its module's globals. The kernels call triton.language's builtins only (`tl.full`, not
    # the jitted `tl.zeros`): those helpers run in the interpreter only if TRITON_INTERPRET was set before triton
    # was first imported, and torch imports it early; the kernels themselves read it here, on first use.
    global tl, _unpack, _dequant, _scores_kernel, _mix_kernel
    if "kernels" in _state:
        return _state["kernels"]
    import triton
    import triton.language as tl

    @triton.jit
    def _unpack(base, idx, mask, BITS: tl.constexpr):
        """Codes number `idx` of the packed bytes at `base` (8 codes per BITS bytes, little-endian), as int32."""
        pos = idx * BITS
        byte = pos >> 3
        sh = pos & 7
        w = tl.load(base + byte, mask=mask, other=0).to(tl.int32)
        if 8 % BITS != 0:  # 3, 5, 6, 7 bits: a code may run into the next byte
            hi = tl.load(base + byte + 1, mask=mask & (sh + BITS > 8), other=0).to(tl.int32)
            w = w | (hi << 8)
        return (w >> sh) & ((1 << BITS) - 1)

    @triton.jit
    def _dequant(codes, cs2, scale, ss2, ss3, zero, zs2, zs3, levels, shift_const, t, d, T, D,
                BITS: tl.constexpr, G: tl.constexpr, AXIS_TOKENS: tl.constexpr, LEVELS: tl.constexpr,
                CLAMP: tl.constexpr, SYM: tl.constexpr, ZERO: tl.constexpr, ZSTREAM: tl.constexpr,
                ZX: tl.constexpr, BOOK: tl.constexpr):
        """Tokens `t` (BLOCK,) × channels `d` (D_PAD,) of one head, dequantized in the stored basis (zero
        outside the history and the head): `A·(L[c] − S) + Z`, pointers already at the (batch row, head); or,
        BOOK = c > 0, coordinate d % c of the centroid that channel group d // c's code names in the head's
        codebooks `levels` (D/c, 2^BITS, c)."""
        mask = (t < T)[:, None] & (d < D)[None, :]
        if BOOK:
            grp = d[None, :] // BOOK
            c = _unpack(codes + t[:, None] * cs2, grp, mask, BITS)
            x = tl.load(levels + ((grp << BITS) + c) * BOOK + d[None, :] % BOOK, mask=mask, other=0.0)
        else:
            c = _unpack(codes + t[:, None] * cs2, d[None, :], mask, BITS)
            if LEVELS:
                v = tl.load(levels + c, mask=mask, other=0.0)
            else:
                v = c.to(tl.float32)
            if AXIS_TOKENS:  # per (block of G tokens, channel)
                row = t[:, None] // G
                col = d[None, :]
            else:  # per (token, group of G channels)
                row = t[:, None]
                col = d[None, :] // G
            a = tl.load(scale + row * ss2 + col * ss3, mask=mask, other=1.0).to(tl.float32)
            if CLAMP:  # grids use stored scales below 1e-12 (fp16 underflow) as 1e-12
                a = tl.maximum(a, 1e-12)
            if SYM:
                v = v - shift_const
            if ZERO == 2:  # integer zero-points, packed at the code width: rows, or one stream per head
                if ZSTREAM:
                    z = _unpack(zero, row * ZX + col, mask, BITS)
                else:
                    z = _unpack(zero + row * zs2, col, mask, BITS)
                v = v - z.to(tl.float32)
            x = a * v
            if ZERO == 1:  # float zero: added
                x = x + tl.load(zero + row * zs2 + col * zs3, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, x, 0.0)

    @triton.jit
    def _scores_kernel(codes, cs0, cs1, cs2, scale, ss0, ss1, ss2, ss3, zero, zs0, zs1, zs2, zs3, levels,
                      ls, shift_const, q, qs0, qs1, qs2, qs3, out, os0, os1, os2, os3, heads, h, T, r, D,
                      cos, sin, rs, mat, matp,
                      BITS: tl.constexpr, G: tl.constexpr, AXIS_TOKENS: tl.constexpr, LEVELS: tl.constexpr,
                      CLAMP: tl.constexpr, SYM: tl.constexpr, ZERO: tl.constexpr, ZSTREAM: tl.constexpr,
                      ZX: tl.constexpr, BOOK: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr,
                      R_PAD: tl.constexpr,
                      ROPE: tl.constexpr, ROT: tl.constexpr, KC: tl.constexpr):
        """out[b, heads[i], j, t] = q[b, i, j] · k̂_t for one (b, i) and one tile of tokens, every j < r.
        ROPE: k̂ stored before RoPE, re-rotated here with the tables `cos, sin` (row stride `rs`, row t = stored
        row t); ROT: stored in a rotated basis too, unrotated by `mat` (D, D) (and `matp`, its columns
        permuted by (d + D/2) % D, for the rotate-half partner)."""
        pid = tl.program_id(0)
        b = (pid // h).to(tl.int64)
        i = (pid % h).to(tl.int64)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, D_PAD)
        j = tl.arange(0, R_PAD)
        cb = codes + b * cs0 + i * cs1
        sb = scale + b * ss0 + i * ss1
        zb = zero + b * zs0 + i * zs1
        lv = levels + i * ls  # a codebook bucket's head i's codebooks; the shared levels otherwise (ls = 0)
        if ROPE:
            half = D // 2
            dm = d < D
            if ROT:  # unrotate each row: k = x·M, and its partner x·M' (M' = M[:, (d + D/2) % D])
                x = tl.full((BLOCK, D_PAD), 0.0, tl.float32)
                xp = tl.full((BLOCK, D_PAD), 0.0, tl.float32)
                for kc in tl.static_range(0, D_PAD, KC):
                    kd = kc + tl.arange(0, KC)
                    xc = _dequant(cb, cs2, sb, ss2, ss3, zb, zs2, zs3, lv, shift_const, t, kd, T, D,
                                  BITS, G, AXIS_TOKENS, LEVELS, CLAMP, SYM, ZERO, ZSTREAM, ZX, BOOK)
                    mm = (kd < D)[:, None] & dm[None, :]
                    at = kd[:, None] * D + d[None, :]
                    x += tl.dot(xc, tl.load(mat + at, mask=mm, other=0.0), input_precision="ieee")
                    xp += tl.dot(xc, tl.load(matp + at, mask=mm, other=0.0), input_precision="ieee")
            else:  # the partner channels dequantized a second time (elementwise in (t, d))
                dp = tl.where(dm, (d + half) % D, d)
                x = _dequant(cb, cs2, sb, ss2, ss3, zb, zs2, zs3, lv, shift_const, t, d, T, D,
                             BITS, G, AXIS_TOKENS, LEVELS, CLAMP, SYM, ZERO, ZSTREAM, ZX, BOOK)
                xp = _dequant(cb, cs2, sb, ss2, ss3, zb, zs2, zs3, lv, shift_const, t, dp, T, D,
                              BITS, G, AXIS_TOKENS, LEVELS, CLAMP, SYM, ZERO, ZSTREAM, ZX, BOOK)
            rm = (t < T)[:, None] & dm[None, :]
            at = t[:, None].to(tl.int64) * rs + d[None, :]
            c = tl.load(cos + at, mask=rm, other=0.0)
            sn = tl.load(sin + at, mask=rm, other=0.0)
            sign = tl.where(d < half, -1.0, 1.0)
            x = x * c + sign[None, :] * xp * sn
        else:
            x = _dequant(cb, cs2, sb, ss2, ss3, zb, zs2, zs3, lv, shift_const, t, d, T, D,
                         BITS, G, AXIS_TOKENS, LEVELS, CLAMP, SYM, ZERO, ZSTREAM, ZX, BOOK)
        qm = (j < r)[:, None] & (d < D)[None, :]
        qv = tl.load(q + b * qs0 + i * qs1 + j[:, None] * qs2 + d[None, :] * qs3, mask=qm, other=0.0)
        s = tl.dot(qv, tl.trans(x), input_precision="ieee")  # (R_PAD, BLOCK)
        head = tl.load(heads + i)
        om = (j < r)[:, None] & (t < T)[None, :]
        tl.store(out + b * os0 + head * os1 + j[:, None] * os2 + t[None, :] * os3, s, mask=om)

    @triton.jit
    def _mix_kernel(codes, cs0, cs1, cs2, scale, ss0, ss1, ss2, ss3, zero, zs0, zs1, zs2, zs3, levels,
                   ls, shift_const, p, ps0, ps1, ps2, ps3, part, h, T, r, D, tiles,
                   BITS: tl.constexpr, G: tl.constexpr, AXIS_TOKENS: tl.constexpr, LEVELS: tl.constexpr,
                   CLAMP: tl.constexpr, SYM: tl.constexpr, ZERO: tl.constexpr, ZSTREAM: tl.constexpr,
                   ZX: tl.constexpr, BOOK: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr,
                   R_PAD: tl.constexpr):
        """part[b, i, split, j] = Σ p[b, i, j, t] v̂_t over `tiles` tiles of tokens, for one (b, i) and split."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        b = (pid // h).to(tl.int64)
        i = (pid % h).to(tl.int64)
        d = tl.arange(0, D_PAD)
        j = tl.arange(0, R_PAD)
        acc = tl.full((R_PAD, D_PAD), 0.0, tl.float32)
        lv = levels + i * ls
        for k in range(0, tiles):
            t = (split * tiles + k) * BLOCK + tl.arange(0, BLOCK)
            x = _dequant(codes + b * cs0 + i * cs1, cs2, scale + b * ss0 + i * ss1, ss2, ss3,
                        zero + b * zs0 + i * zs1, zs2, zs3, lv, shift_const, t, d, T, D,
                        BITS, G, AXIS_TOKENS, LEVELS, CLAMP, SYM, ZERO, ZSTREAM, ZX, BOOK)
            pm = (j < r)[:, None] & (t < T)[None, :]
            pv = tl.load(p + b * ps0 + i * ps1 + j[:, None] * ps2 + t[None, :] * ps3, mask=pm, other=0.0)
            acc += tl.dot(pv, x, input_precision="ieee")
        om = (j < r)[:, None] & (d < D)[None, :]
        dst = part + ((pid * splits + split) * r + j[:, None]) * D + d[None, :]
        tl.store(dst, acc, mask=om)

    _state["kernels"] = (_scores_kernel, _mix_kernel)
    return _state["kernels"]


_META_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _float_meta(t: torch.Tensor) -> torch.Tensor:
    """Metadata the kernels read as is (fp32, fp16, bf16), else converted to fp32 (fp8)."""
    return t if t.dtype in _META_DTYPES else t.to(torch.float32)


def _strides4(t: torch.Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2), t.stride(3)]


def _args(bucket, like: torch.Tensor) -> tuple[list, dict]:
    """The kernels' arguments that describe `bucket`'s stored form (pointers and strides), and the constexprs."""
    s, D = bucket.spec, bucket.head_dim
    bits = s.base_bits(bucket.bits)
    parts = bucket.parts
    codes = parts["codes"].view()
    if codes.stride(-1) != 1:
        raise ValueError("internal: packed codes with a strided last dim")
    D_PAD = max(16, _next_pow2(D))
    if s.kind == "codebook":  # codes of b·c bits, one per group of c channels, against each head's codebooks
        book = _book(bucket, like.device)
        none = [codes, 0, 0, 0, 0]  # no scales, no zero-points: pointers never read
        const = dict(BITS=bucket.bits * s.group_size, G=s.group_size, AXIS_TOKENS=False, LEVELS=False, CLAMP=False,
                     SYM=False, ZERO=0, ZSTREAM=False, ZX=1, BOOK=s.group_size, BLOCK=_tile(D_PAD), D_PAD=D_PAD)
        args = [codes, codes.stride(0), codes.stride(1), codes.stride(2), *none, *none, book, book[0].numel(), 0.0]
        return args, const
    lloyd = s.kind == "lloydmax"
    scale = _float_meta(parts["norm" if lloyd else "scale"].view())
    levels = lloydmax.codebook_tensors(bits, s.group_size, like.device)[0] if lloyd else scale
    zero_kind, zstream, zx, shift_const = 0, False, 1, 0.0
    zero, zs = scale, [0, 0, 0, 0]
    if s.kind == "symmetric":
        shift_const = ((1 << bits) - 1) / 2.0
    elif s.kind == "minmax":
        rows = parts["zero"]
        zero = rows.view()
        if s.zero == "code":
            zero_kind, zstream, zx = 2, rows.part.stream, rows.part.cols
            zs = [zero.stride(0), zero.stride(1), 0 if zstream else zero.stride(2), 1]
        else:
            zero_kind = 1
            zero = _float_meta(zero)
            zs = _strides4(zero)
    const = dict(BITS=bits, G=s.group_size, AXIS_TOKENS=s.axis_for(bucket.role) == "tokens", LEVELS=lloyd,
                 CLAMP=not lloyd, SYM=s.kind == "symmetric", ZERO=zero_kind, ZSTREAM=zstream, ZX=zx, BOOK=0,
                 BLOCK=_tile(D_PAD), D_PAD=D_PAD)
    args = [codes, codes.stride(0), codes.stride(1), codes.stride(2), scale, *_strides4(scale), zero, *zs, levels,
            0, shift_const]
    return args, const


def _book(bucket, device) -> torch.Tensor:
    """A codebook bucket's learned codebooks `(h, D/c, 2^(b·c), c)` as the kernels read them: fp32, contiguous, on
    `device` (where the bucket's first append moved them: no copy here)."""
    book = bucket.codec.param_for(bucket.bits, len(bucket.head_list), bucket.head_dim)
    return book.to(device, torch.float32).contiguous()


def _check(x: torch.Tensor, out: torch.Tensor) -> int:
    if x.dtype != torch.float32 or out.dtype != torch.float32:
        raise ValueError("internal: the kernels take fp32 tensors")
    r = x.shape[2]
    if r > MAX_R:
        raise ValueError(f"internal: {r} query heads per KV head, more than the kernels take ({MAX_R})")
    return r


_MATRICES: dict = {}


def _unrotation(D: int, rotation: str, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`M = H·diag(s)/sqrt(D)` (D, D) fp32, so that a stored row `x` (row vector) unrotates to `x·M`
    (`hadamard.unrotate`), and `M'` = `M` with its columns permuted by (d + D/2) % D: the rotate-half partners.
    One pair per (D, rotation, seed, device)."""
    key = (D, rotation, seed if rotation == "rhadamard" else 0, str(device))
    if key not in _MATRICES:
        m = hadamard.matrix(D).to(torch.float32)
        if rotation == "rhadamard":
            m = m * hadamard.signs(D, seed)[None, :]
        perm = (torch.arange(D) + D // 2) % D
        _MATRICES[key] = (m.contiguous().to(device), m[:, perm].contiguous().to(device))
    return _MATRICES[key]


def _into(bucket, out: torch.Tensor, y: torch.Tensor) -> None:
    """`out[:, heads] = y` for the bucket's heads."""
    if bucket.head_slice is not None:
        out[:, bucket.head_slice] = y
    else:
        out.index_copy_(1, bucket.heads(out.device), y)


def scores(bucket, q: torch.Tensor, out: torch.Tensor) -> None:
    """`out[:, heads, :, :length] = q[:, heads] · every stored key of `bucket`` for `q (B, H, r, D)` fp32 and
    `out (B, H, r, length)` fp32, `heads` the bucket's KV heads. Pre-RoPE keys whose tables differ by row
    (`bucket.span` gives None) are computed by the torch path, `Bucket.scores`."""
    r = _check(q, out)
    T, h, D = bucket.length, len(bucket.head_list), bucket.head_dim
    B = q.shape[0]
    if T == 0 or B == 0:
        return
    args, const = _args(bucket, q)
    rope = [q, q, 0, q, q]  # unused pointers where the keys are post-RoPE
    rot = False
    if bucket.prerope:
        tables = bucket.span(q, bucket.pos0, T) if bucket.span is not None else None
        if tables is None:  # tables that differ by row: the torch path
            _into(bucket, out, bucket.scores(bucket.select(q)))
            return
        cos, sin = tables
        if any(t.dtype != torch.float32 or t.stride(-1) != 1 for t in tables) or cos.stride(0) != sin.stride(0):
            cos, sin = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()  # fp32 rows
        rot = bucket.spec.rotation != "none"
        mat = _unrotation(D, bucket.spec.rotation, bucket.spec.seed, q.device) if rot else (q, q)
        rope = [cos, sin, cos.stride(0), *mat]
        x = bucket.select(q)  # keys come back in the model's basis: the query as it is
        const["BLOCK"] = _tile(const["D_PAD"], ROPE_TILE_ELEMENTS)
    else:
        x = bucket.codec.rotate(bucket.select(q))  # keys are stored in the rotated basis: rotate the query once
    D_PAD = const["D_PAD"]
    KC = max(16, min(D_PAD, MAT_ELEMENTS // D_PAD))
    grid = (B * h, -(-T // const["BLOCK"]))
    _kernels()[0][grid](*args, x, *_strides4(x), out, *_strides4(out), bucket.heads(q.device), h, T, r, D, *rope,
                        R_PAD=max(16, _next_pow2(r)), ROPE=bool(bucket.prerope), ROT=rot, KC=KC, **const)


def mix(bucket, p: torch.Tensor, out: torch.Tensor) -> None:
    """`out[:, heads] = p[:, heads] × every stored value of `bucket`` for weights `p (B, H, r, length)` fp32 and
    `out (B, H, r, D)` fp32."""
    r = _check(p, out)
    if bucket.prerope:
        raise ValueError("internal: pre-RoPE keys have no outputs to mix")
    T, h, D = bucket.length, len(bucket.head_list), bucket.head_dim
    B = p.shape[0]
    x = bucket.select(p)
    if T == 0 or B == 0:
        y = x.new_zeros(B, h, r, D)
    else:
        args, const = _args(bucket, p)
        tiles = -(-T // const["BLOCK"])
        splits = min(tiles, max(1, TARGET_PROGRAMS // (B * h)))
        per = -(-tiles // splits)
        splits = -(-tiles // per)
        part = torch.empty(B, h, splits, r, D, dtype=torch.float32, device=p.device)
        _kernels()[1][(B * h, splits)](*args, x, *_strides4(x), part, h, T, r, D, per,
                                       R_PAD=max(16, _next_pow2(r)), **const)
        y = part.sum(2) if splits > 1 else part[:, :, 0]  # a fixed order: deterministic
        y = bucket.codec.rotate(y, inverse=True)  # values are stored in the rotated basis: unrotate once
    _into(bucket, out, y)
