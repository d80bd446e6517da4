"""Native decode kernels: attention scores and outputs read straight from a bucket's packed codes.

`decode.c` (next to this file) computes, for one bucket, `q·k̂` for every stored key and `Σ p v̂` over every
stored value in one pass over the packed bytes — unpack, dequantize, unrotate and re-apply RoPE for pre-RoPE
keys, dot or accumulate — row by row in registers, split across the threads torch uses. Nothing of the dense
history is formed, and no per-step temporary grows with the context beyond the scores themselves.

It is compiled on first use with the system's C compiler (`cc`, or `$CC`), for this CPU, into rateq's cache folder
(`rateq.paths.cache_dir()/kernels`), keyed by the source and the machine, and loaded with `ctypes`; later
processes load the built library (`rateq.native` builds and loads it). Where no compiler is found or the build
fails, `library()` is None and the runtime uses its torch path (`rateq.quant.attend`), which computes the same
thing in chunks; `RATEQ_KERNELS=torch` forces that path. `runs(bucket, device)` says whether a bucket's family
runs here: uniform grids (min-max, symmetric, float or integer zero-points), Lloyd–Max codebooks and learned
(coupled) codebooks, rotated or not, keys pre- or post-RoPE; QJL sketches, sparse outliers, engine formats and
16-bit buckets use the torch path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ... import native
from ...quant import hadamard, lloydmax
from ...quant.spec import FULL_PRECISION_BITS

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_D, MAX_R = 256, 64

_state: dict = {}


class _Meta(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("stride", ctypes.c_int64 * 3), ("dtype", ctypes.c_int32),
                ("present", ctypes.c_int32)]


class Unit(ctypes.Structure):
    """One bucket's stored form as `decode.c` reads it (see its header)."""

    _fields_ = [("codes", ctypes.c_void_p), ("cstride", ctypes.c_int64 * 3), ("bits", ctypes.c_int32),
                ("D", ctypes.c_int32), ("G", ctypes.c_int32), ("axis_tokens", ctypes.c_int32),
                ("levels", ctypes.c_void_p), ("scale", _Meta), ("shift", _Meta), ("add", _Meta),
                ("shift_const", ctypes.c_float), ("has_shift_const", ctypes.c_int32), ("signs", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("book", ctypes.c_void_p),
                ("book_c", ctypes.c_int32)]


def _machine_key() -> str:
    """What the built library depends on besides its source: architecture, CPU model and flags, compiler."""
    return native.machine_key(FLAGS, _compiler())


def _compiler() -> str | None:
    return native.compiler()


def _build() -> Path | None:
    cc = _compiler()
    if cc is None:
        return None
    return native.build(SOURCE, FLAGS, _state, cc=cc, key=_machine_key())


def _declare(lib) -> None:
    i64p = ctypes.POINTER(ctypes.c_int64)
    args = [ctypes.POINTER(Unit), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, i64p, ctypes.c_void_p, i64p, ctypes.c_int]
    for fn in (lib.rq_scores, lib.rq_mix):
        fn.argtypes, fn.restype = args, ctypes.c_int


def library():
    """The loaded kernels (`ctypes.CDLL`), or None: no compiler, a failed build, or `RATEQ_KERNELS=torch`."""
    return native.load(_state, _build, _declare)


def build_error() -> str | None:
    """Why `library()` is None after a failed build (the compiler's last line), if it failed."""
    return native.build_error(_state)


def runs(bucket, device) -> bool:
    """Whether `bucket`'s family and shape run in the native kernels on `device` (decided once per bucket)."""
    if torch.device(device).type != "cpu":
        return False
    if bucket.native is None:
        bucket.native = {"ok": _eligible(bucket) and library() is not None, "key": None}
    return bucket.native["ok"]


def fused_family(bucket) -> bool:
    """Whether a fused kernel (native or Triton) can read `bucket` at all: a uniform grid or Lloyd–Max codebook
    below 16 bits, without QJL sketches or sparse outliers (engine formats and those use the torch path), codes
    packed in whole rows, head_dim a multiple of 8 up to `MAX_D` (a power of two when rotated)."""
    s, D = bucket.spec, bucket.head_dim
    if bucket.bits >= FULL_PRECISION_BITS or s.qjl or s.outlier_frac:
        return False
    if s.kind not in ("minmax", "symmetric", "lloydmax"):
        return False
    if D > MAX_D or D % 8 or (s.rotation != "none" and D & (D - 1)):
        return False
    return not bucket.parts["codes"].part.stream


def codebook_family(bucket) -> bool:
    """Whether a fused kernel (native or Triton) can read a learned-codebook bucket: below 16 bits, codes packed in
    whole rows, head_dim a multiple of 8 up to `MAX_D` (a power of two when rotated)."""
    s, D = bucket.spec, bucket.head_dim
    return (s.kind == "codebook" and bucket.bits < FULL_PRECISION_BITS and not s.static_scale and D <= MAX_D
            and D % 8 == 0 and (s.rotation == "none" or D & (D - 1) == 0) and not bucket.parts["codes"].part.stream)


def _eligible(bucket) -> bool:
    s, D = bucket.spec, bucket.head_dim
    if s.kind == "codebook":  # the native kernels read rows of whole bytes of 8 codes
        return codebook_family(bucket) and D % (8 * s.group_size) == 0
    # the native kernels also read whole channel groups per 8 lanes
    return fused_family(bucket) and not (s.axis_for(bucket.role) == "channels" and s.group_size % 8)


_CONST: dict = {}


def _const(kind: str, D: int, seed: int = 0) -> torch.Tensor:
    """Per-process constants the units point to: rotation signs, all-ones signs."""
    key = (kind, D, seed)
    if key not in _CONST:
        _CONST[key] = hadamard.signs(D, seed).contiguous() if kind == "signs" else torch.ones(D)
    return _CONST[key]


def _meta(t: torch.Tensor | None) -> _Meta:
    m = _Meta()
    if t is None:
        return m
    m.ptr, m.dtype, m.present = t.data_ptr(), _DTYPES[t.dtype], 1
    m.stride[:] = [t.stride(0), t.stride(1), t.stride(2)]
    return m


def _direct(t: torch.Tensor) -> bool:
    """Metadata the kernel reads where it is stored (fp32, fp16, bf16 with a contiguous last dim)."""
    return t.dtype in _DTYPES and t.stride(-1) == 1


def _unit(bucket) -> tuple[Unit, list, bool]:
    """The `Unit` of `bucket`'s stored form, the tensors it points into beyond the store's buffers (kept alive
    with it), and whether it points only into those buffers and constants (so it holds until a buffer is
    replaced)."""
    s, bits, D = bucket.spec, bucket.bits, bucket.head_dim
    parts = bucket.parts
    keep: list = []
    stable = True

    def meta(name: str, as_float=False) -> _Meta:
        nonlocal stable
        t = parts[name].view()
        if as_float or not _direct(t):  # integer zero-points, fp8: converted for this call (metadata is small)
            t = (parts[name].values() if as_float else t).to(torch.float32).contiguous()
            keep.append(t)
            stable = False
        return _meta(t)

    u = Unit()
    codes = parts["codes"].view()
    u.codes = codes.data_ptr()
    u.cstride[:] = [codes.stride(0), codes.stride(1), codes.stride(2)]
    u.bits, u.D, u.G = s.base_bits(bits), D, s.group_size
    u.axis_tokens = int(s.axis_for(bucket.role) == "tokens")
    if s.kind == "codebook":  # codes of b·c bits, one per group of c channels, against the heads' centroids
        book = bucket.codec.param_for(bits, len(bucket.head_list), D).to(torch.float32).contiguous()
        keep.append(book)
        u.bits, u.axis_tokens, u.book, u.book_c = bits * s.group_size, 0, book.data_ptr(), s.group_size
    elif s.kind == "lloydmax":
        levels = lloydmax.codebook_tensors(u.bits, s.group_size)[0]
        keep.append(levels)
        u.levels = levels.data_ptr()
        u.scale = meta("norm")
    else:
        u.scale = meta("scale")
        if s.kind == "symmetric":
            u.shift_const, u.has_shift_const = ((1 << bits) - 1) / 2.0, 1
        elif s.zero == "code":
            u.shift = meta("zero", as_float=True)
        else:
            u.add = meta("zero")
    if s.rotation != "none":
        signs = _const("signs", D, s.seed) if s.rotation == "rhadamard" else _const("ones", D)
        keep.append(signs)
        u.signs = signs.data_ptr()
    return u, keep, stable


def _prepared(bucket) -> tuple[Unit, list]:
    state = bucket.native
    key = tuple((rows.buf.data_ptr(), rows.buf.shape) if rows.buf is not None else None
                for rows in bucket.parts.values())
    if state.get("key") != key:
        u, keep, stable = _unit(bucket)
        if not stable:
            return u, keep
        state["key"], state["unit"], state["keep"] = key, u, keep
    return state["unit"], state["keep"]


def scores(bucket, q: torch.Tensor, out: torch.Tensor) -> bool:
    """`out[:, heads, :, :length] = q[:, heads] · every stored key of `bucket`` for `q (B, H, r, D)` fp32 and
    `out (B, H, r, length)` fp32 (last dims contiguous), `heads` the bucket's KV heads. False (nothing done) when
    pre-RoPE keys' tables differ by row: the caller uses the torch path."""
    rope = None
    if bucket.prerope:
        rope = bucket.span(q, bucket.pos0, bucket.length) if bucket.span is not None else None
        if rope is None or rope[0].dtype != torch.float32 or not rope[0].is_contiguous():
            return False
    _call("rq_scores", bucket, q, out, rope)
    return True


def mix(bucket, p: torch.Tensor, out: torch.Tensor) -> bool:
    """`out[:, heads] = p[:, heads] × every stored value of `bucket`` for weights `p (B, H, r, length)` fp32 and
    `out (B, H, r, D)` fp32 (last dims contiguous)."""
    _call("rq_mix", bucket, p, out, None)
    return True


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _call(name: str, bucket, x: torch.Tensor, out: torch.Tensor, rope) -> None:
    if x.dtype != torch.float32 or out.dtype != torch.float32:
        raise ValueError("internal: the kernels take fp32 tensors with a contiguous last dim")
    u, keep = _prepared(bucket)
    if rope is not None:
        u.cos, u.sin = rope[0].data_ptr(), rope[1].data_ptr()
    heads = bucket.heads(x.device)
    rc = getattr(library(), name)(ctypes.byref(u), x.shape[0], len(bucket.head_list), bucket.length, x.shape[2],
                                  heads.data_ptr(), x.data_ptr(), _strides(x), out.data_ptr(), _strides(out),
                                  torch.get_num_threads())
    u.cos = u.sin = None  # `keep` and `rope` held what the unit points to until here
    if rc:
        raise ValueError(f"internal: {name} refused the bucket ({bucket.spec.id} at {bucket.bits} bits)")
