"""The KV formats serving engines store, as quantize/dequantize pairs on token groups along channels.

Each takes groups `g (..., G)` of one token's channels (G = 32 for llama.cpp's blocks, 16 for NVFP4, 1 for FP8)
and returns integer codes `(..., G)` plus fp32 metadata already rounded to its stored format, and back. The
encoders follow the engines' own reference quantizers, so the codes are what the engine would store:

- `fp8`: FP8 e4m3 (`torch.float8_e4m3fn`) with unit scale, saturating at ±448 (as vLLM's scaled FP8 conversion
  does); the code is the byte.
- `nvfp4`: FP4 e2m1 codes (sign and one of 0, 0.5, 1, 1.5, 2, 3, 4, 6), one e4m3 scale per 16 values equal to
  amax / 6, unit tensor scale (NVIDIA's NVFP4: e2m1 elements, FP8 e4m3 block scale per 16, fp32 tensor scale).
- llama.cpp (ggml-quants.c, `quantize_row_*_ref`): `q8_0` d = amax/127, q = round(x/d); `q4_0` d = max/−8 with
  `max` the signed value of largest magnitude, q = min(15, trunc(x/d + 8.5)), x̂ = (q − 8)·d; `q5_0` the same
  with 16/31/16.5; `q4_1` d = (max − min)/15, q = min(15, trunc((x − min)/d + 0.5)), x̂ = q·d + min; `iq4_nl`
  a fixed 16-level table scaled by d, d searched over 15 candidate scales and refit by weighted least squares
  (weights x², as `quantize_row_iq4_nl_impl` without importance weights). Scales (and q4_1's minimum) are
  stored in fp16; codes are computed with the fp32 scale, as ggml does.
"""

from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
FP8_MAX = 448.0

_TABLES: dict = {}


def _table(name: str, device) -> torch.Tensor:
    key = (name, str(device))
    if key not in _TABLES:
        if name == "e2m1":  # code = sign << 3 | magnitude index
            mags = torch.tensor(E2M1)
            values = torch.cat([mags, -mags])
        else:
            values = torch.tensor(IQ4NL, dtype=torch.float32)
        _TABLES[key] = values.to(device=device, dtype=torch.float32)
    return _TABLES[key]


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _trunc_u8(x: torch.Tensor, top: int) -> torch.Tensor:
    """`min(top, (int)x)` for x ≥ 0, as uint8 (C's truncating conversion)."""
    return x.trunc().clamp(0, top).to(torch.uint8)


def _signed_max(g: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each group, with its sign `(..., 1)`."""
    idx = g.abs().argmax(-1, keepdim=True)
    return g.gather(-1, idx)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def quantize(kind: str, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Groups `g (..., G)` fp32 → `codes (..., G)` uint8 and metadata `(..., 1)` fp32 (`scale`, and `zero` for q4_1)."""
    if kind == "fp8":
        codes = g.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return {"codes": codes}
    if kind == "nvfp4":
        amax = g.abs().amax(-1, keepdim=True)
        scale = (amax / 6.0).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
        y = (g * _inverse(scale)).clamp(-6.0, 6.0)
        mags = _table("e2m1", g.device)[:8]
        mag = (y.abs().unsqueeze(-1) - mags).abs().argmin(-1)  # nearest magnitude (ties to the smaller)
        codes = (mag | ((y < 0) & (mag > 0)).to(mag.dtype) << 3).to(torch.uint8)
        return {"codes": codes, "scale": scale}
    if kind == "q8_0":
        d = g.abs().amax(-1, keepdim=True) / 127.0
        q = g * _inverse(d)
        codes = (q.sign() * (q.abs() + 0.5).floor() + 128).to(torch.uint8)  # roundf, offset by 128
        return {"codes": codes, "scale": _fp16(d)}
    if kind in ("q4_0", "q5_0"):
        half = 8 if kind == "q4_0" else 16
        d = _signed_max(g) / -half
        codes = _trunc_u8(g * _inverse(d) + (half + 0.5), 2 * half - 1)
        return {"codes": codes, "scale": _fp16(d)}
    if kind == "q4_1":
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = (hi - lo) / 15.0
        codes = _trunc_u8((g - lo) * _inverse(d) + 0.5, 15)
        return {"codes": codes, "scale": _fp16(d), "zero": _fp16(lo)}
    if kind == "iq4_nl":
        return _quantize_iq4nl(g)
    raise ValueError(f"not an engine format: {kind!r}")


def _quantize_iq4nl(g: torch.Tensor) -> dict[str, torch.Tensor]:
    values = _table("iq4nl", g.device)
    # The fit's sums run in float64 (products of fp32 values are exact there), so a group's choice among near-tied
    # scales does not depend on how many tokens are quantized at once or on the CPU's vector width.
    g64 = g.double()
    w = g64 * g64
    mx = _signed_max(g)
    safe = torch.where(mx != 0, mx, torch.ones_like(mx))
    best_d, best_score, best_codes = None, None, None
    for step in range(-7, 8):  # the candidate inverse scales of ggml's search: (step + values[0]) / max
        inv = (step + values[0]) / safe
        codes = ((g * inv).unsqueeze(-1) - values).abs().argmin(-1)
        q = values[codes].double()
        sqx, sq2 = (w * q * g64).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
        d = sqx / sq2.clamp_min(1e-300)
        score = sqx * d  # the weighted error falls as sumqx²/sumq2 rises
        if best_score is None:
            best_d, best_score, best_codes = d, score, codes
        else:
            better = score > best_score
            best_d = torch.where(better, d, best_d)
            best_score = torch.where(better, score, best_score)
            best_codes = torch.where(better, codes, best_codes)
    d = torch.where(mx != 0, best_d, torch.zeros_like(best_d)).to(torch.float32)
    return {"codes": best_codes.to(torch.uint8), "scale": _fp16(d)}


def dequantize(kind: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Codes `(..., G)` and metadata `(..., 1)` → fp32 values `(..., G)`."""
    codes = parts["codes"]
    if kind == "fp8":
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    c = codes.to(torch.int64)
    if kind == "nvfp4":
        return _table("e2m1", codes.device)[c] * parts["scale"]
    if kind == "iq4_nl":
        return _table("iq4nl", codes.device)[c] * parts["scale"]
    shift = {"q8_0": 128, "q4_0": 8, "q5_0": 16, "q4_1": 0}[kind]
    x = (c - shift).to(torch.float32) * parts["scale"]
    return x + parts["zero"] if kind == "q4_1" else x


# -- formats with one static scale (per layer and role, or per KV head), calibrated offline ----------------------
# Symmetric integer ranges: INT8 as TensorRT-LLM's int8 KV cache (round, saturate to ±127), INT4 over −8..7.
STATIC_RANGES = {"int8_tensor": (-127, 127), "int8_head": (-127, 127), "int4_head": (-8, 7)}


def static_qmax(kind: str) -> float:
    """The largest magnitude a static-scale code represents at unit scale: 448 for FP8 e4m3, 127 or 7."""
    return FP8_MAX if kind.startswith("fp8") else float(STATIC_RANGES[kind][1])


def quantize_static(kind: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x (..., D)` fp32 and its scale (broadcasting) → uint8 codes: the FP8 byte of x / s (saturating), or
    round(x / s) clamped to the format's range and offset to unsigned."""
    y = x / scale
    if kind.startswith("fp8"):
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    lo, hi = STATIC_RANGES[kind]
    return (y.round().clamp(lo, hi) - lo).to(torch.uint8)


def dequantize_static(kind: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes `(..., D)` and their scale → fp32 values."""
    if kind.startswith("fp8"):
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) * scale
    return (codes.to(torch.float32) + STATIC_RANGES[kind][0]) * scale
