"""Attention straight from a codec's parts: scores `q·k̂` and outputs `Σ p v̂` without forming `k̂` or `v̂`.

`scores(codec, enc, bits, shape, q)` gives `(B, h, r, T)` for queries `q (B, h, r, D)` (the `r` query heads
that share each of the `h` KV heads: GQA without repeating K), `mix(codec, enc, bits, shape, p)` gives
`(B, h, r, D)` for attention weights `p (B, h, r, T)`, where `enc` is the stored form (`Codec.encode`'s parts,
or a slice of them along tokens). Both equal attention on `codec.decode(enc)` up to fp32 rounding (the sums run
in another order), and cost one pass over the codes, which are read from their packed bytes straight into the
values they stand for (`rateq.quant.pack.unpack_levels`):

- uniform grids fold their metadata into the query or the weights. Keys per channel over G tokens (KIVI):
  `q·(s⊙c + z) = (q⊙s)·c + q·z`, one `(q⊙s)` per key block. Per-token groups (values): `Σ_t p_t s_t c_t` is
  a matmul of the codes with `p⊙s`, plus `Σ_t p_t z_t`. Integer zero-points and symmetric grids shift `c`.
- rotations (Walsh–Hadamard, orthonormal `R`) move to the query and the output once: `q·Rᵀk' = (Rq)·k'`,
  `Σ p Rᵀv' = Rᵀ Σ p v'`.
- Lloyd–Max codebooks: the codes index the level table, scaled per group by the stored norm; the QJL sketch
  adds `‖r‖·sqrt(π/2)/m·⟨S q, sign(S r)⟩` per group (TurboQuant-prod's estimator, with `S q` computed once).
- what has no such form here (pre-RoPE keys, which need each position's rotation; sparse outliers; engine
  formats; 16-bit units) is dequantized — a chunk at a time by the caller — and multiplied.
"""

from __future__ import annotations

import torch

from . import lloydmax, qjl
from .pack import identity_levels
from .rope import Rope
from .spec import FULL_PRECISION_BITS

_SIGNS: dict = {}


def _signs(device) -> torch.Tensor:
    """The levels of a QJL sign bit: 0 → −1, 1 → +1."""
    key = str(device)
    if key not in _SIGNS:
        _SIGNS[key] = torch.tensor([-1.0, 1.0], device=device)
    return _SIGNS[key]


def _direct(codec, bits: int) -> bool:
    """Whether the codes are read without dequantizing first."""
    s = codec.spec
    return (bits < FULL_PRECISION_BITS and s.kind in ("minmax", "symmetric", "lloydmax") and not s.outlier_frac
            and not s.prerope)


def _read(codec, enc: dict, bits: int, role: str, shape):
    """The layout's parts by name, and a reader: `meta(name)` fp32 values, `values(name, levels)` codes as levels."""
    B, h, T, D = shape
    layout = {p.name: p for p in codec.layout(bits, role, D)}

    def meta(name):
        p = layout[name]
        return p.unpack(enc[name], p.rows(T))

    def values(name, levels):
        p = layout[name]
        return p.unpack_levels(enc[name], p.rows(T), levels)

    return meta, values


def _grid(codec, meta, bits: int):
    """A uniform grid as `k = (c − shift)·s + add`: (scale, shift, add), shift/add None when absent."""
    s = codec.spec
    scale = meta("scale").clamp_min(1e-12)  # stored scales below 1e-12 (fp16 underflow) are used as 1e-12
    if s.kind == "symmetric":
        return scale, ((1 << bits) - 1) / 2.0, None
    if s.zero == "code":
        return scale, meta("zero"), None
    return scale, None, meta("zero")


def _group_dots(vals: torch.Tensor, q: torch.Tensor, G: int) -> torch.Tensor:
    """`Σ_{d ∈ group k} vals[t, d] · q[r, d]` → `(B, h, T, K, r)` for `vals (B, h, T, D)`, `q (B, h, r, D)`."""
    B, h, T, D = vals.shape
    K = D // G
    if K == 1:
        return (vals @ q.transpose(-1, -2)).unsqueeze(3)
    return torch.einsum("bhtkg,bhrkg->bhtkr", vals.view(B, h, T, K, G), q.view(B, h, -1, K, G))


def _group_mix(vals: torch.Tensor, w: torch.Tensor, G: int) -> torch.Tensor:
    """`Σ_t w[r, t, k] · vals[t, d]` for d in group k → `(B, h, r, D)`, for `w (B, h, r, T, K)`."""
    B, h, T, D = vals.shape
    K = D // G
    if K == 1:
        return w[..., 0] @ vals
    return torch.einsum("bhrtk,bhtkg->bhrkg", w, vals.view(B, h, T, K, G)).reshape(B, h, -1, D)


def scores(codec, enc: dict, bits: int, shape, q: torch.Tensor, *, rope: Rope | None = None) -> torch.Tensor:
    """`q (B, h, r, D)` fp32 · every stored key `(B, h, T, D)` → `(B, h, r, T)`."""
    B, h, T, D = shape
    if not _direct(codec, bits):
        k = codec.decode(enc, bits, "k", shape, rope=rope)
        return q @ k.transpose(-1, -2)
    s = codec.spec
    G = s.group_size
    meta, values = _read(codec, enc, bits, "k", shape)
    q = codec.rotate(q)
    r = q.shape[2]
    if s.kind == "lloydmax":
        out = torch.zeros(B, h, T, r, device=q.device)
        base = s.base_bits(bits)
        if base >= 1:
            levels = lloydmax.codebook_tensors(base, G, q.device)[0]
            out += (_group_dots(values("codes", levels), q, G) * meta("norm")[..., None]).sum(3)
        if s.qjl:
            S = qjl.matrix(G, G, s.seed, q.device)
            sq = (q.view(B, h, r, D // G, G) @ S.T).reshape(B, h, r, D)  # the query's sketch, once
            est = _group_dots(values("qjl", _signs(q.device)), sq, G)
            out += (est * meta("rnorm")[..., None]).sum(3) * (qjl.SCALE / G)
        return out.transpose(-1, -2)
    codes = values("codes", identity_levels(bits, q.device))  # (B, h, T, D): the integer codes, in fp32
    scale, shift, add = _grid(codec, meta, bits)
    if s.axis_for("k") == "tokens":  # per channel over blocks of G tokens: one (q ⊙ s) per block
        nb = T // G
        qs = q[:, :, None] * scale[:, :, :, None]  # (B, h, nb, r, D)
        out = qs @ codes.view(B, h, nb, G, D).transpose(-1, -2)  # (B, h, nb, r, G)
        bias = None if add is None else add @ q.transpose(-1, -2)  # (B, h, nb, r)
        if shift is not None:
            sh = (qs * shift[:, :, :, None]).sum(-1) if torch.is_tensor(shift) else qs.sum(-1) * shift
            bias = -sh if bias is None else bias - sh
        if bias is not None:
            out = out + bias[..., None]
        return out.permute(0, 1, 3, 2, 4).reshape(B, h, r, T)
    # per token over groups of G channels: k = (c − shift)·s + add, groups k of G channels
    dots = _group_dots(codes, q, G)  # (B, h, T, K, r)
    qsum = q.view(B, h, r, D // G, G).sum(-1).transpose(-1, -2)  # (B, h, K, r)
    if shift is not None:
        dots = dots - (shift[..., None] if torch.is_tensor(shift) else shift) * qsum[:, :, None]
    out = (dots * scale[..., None]).sum(3)
    if add is not None:
        out = out + (add[..., None] * qsum[:, :, None]).sum(3)
    return out.transpose(-1, -2)


def mix(codec, enc: dict, bits: int, shape, p: torch.Tensor) -> torch.Tensor:
    """Weights `p (B, h, r, T)` fp32 × every stored value `(B, h, T, D)` → `(B, h, r, D)`."""
    B, h, T, D = shape
    if not _direct(codec, bits):
        return p @ codec.decode(enc, bits, "v", shape)
    s = codec.spec
    G = s.group_size
    meta, values = _read(codec, enc, bits, "v", shape)
    if s.kind == "lloydmax":
        out = p.new_zeros(B, h, p.shape[2], D)
        base = s.base_bits(bits)
        if base >= 1:
            levels = lloydmax.codebook_tensors(base, G, p.device)[0]
            out += _group_mix(values("codes", levels), p[..., None] * meta("norm")[:, :, None], G)
        if s.qjl:
            S = qjl.matrix(G, G, s.seed, p.device)
            u = _group_mix(values("qjl", _signs(p.device)), p[..., None] * meta("rnorm")[:, :, None], G)
            out += (u.view(B, h, -1, D // G, G) @ S).reshape(B, h, -1, D) * (qjl.SCALE / G)
        return codec.rotate(out, inverse=True)
    # values: per token over groups of G channels (the runtime refuses values grouped along tokens)
    codes = values("codes", identity_levels(bits, p.device))
    scale, shift, add = _grid(codec, meta, bits)
    w = p[..., None] * scale[:, :, None]  # (B, h, r, T, K)
    out = _group_mix(codes, w, G)
    bias = None
    if shift is not None:
        bias = -(w * shift[:, :, None]).sum(3) if torch.is_tensor(shift) else -w.sum(3) * shift  # (B, h, r, K)
    if add is not None:
        a = p @ add
        bias = a if bias is None else bias + a
    if bias is not None:
        out = (out.view(B, h, -1, D // G, G) + bias[..., None]).reshape(B, h, -1, D)
    return codec.rotate(out, inverse=True)
