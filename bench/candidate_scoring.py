"""Candidate scoring of one layer and one sequence, the calibration's hot path: the fused key kernel (CUDA) against
the torch path, in one process.

`metrics.candidate_errors` for one (layer, sequence) at a model's shapes, with as many key and value candidates as
rateq's default set scores (35 and 21 columns at 7 widths), random inputs (the cost does not depend on the values),
every 4th query row, the default metric (fisher). Prints milliseconds per call for each path, their ratio, what the
calls of a whole calibration would add up to (layers × sequences), and the fused kernel's rate in matmul TFLOP/s
(its work counted over the allowed query-key pairs: the plain and the candidate's scores twice, and one P·V).

    python bench/candidate_scoring.py --device cuda                       # Qwen3-8B's shapes, bf16, 2048 tokens
    python bench/candidate_scoring.py --device cuda --seq-len 8192
    python bench/candidate_scoring.py                                     # CPU: the torch path only, fp32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from rateq.calibrate import DEFAULT_QUERY_STRIDE, triton_scores
from rateq.calibrate.metrics import METRICS, LayerInputs, allowed_pairs, candidate_errors


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call (kernel compilation, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check(args) -> torch.device:
    """The device, after the arguments are checked: a bad one is one line on stderr and exit 2."""
    def fail(msg):
        print(f"candidate_scoring: {msg}", file=sys.stderr)
        raise SystemExit(2)

    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, …)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: cpu or cuda")
    for name in ("heads", "kv_heads", "head_dim", "seq_len", "layers", "sequences", "query_stride", "repeats",
                 "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("key_candidates", "value_candidates"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must not be negative")
    if args.heads % args.kv_heads:
        fail(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.metric not in METRICS:
        fail(f"--metric {args.metric}: one of {', '.join(METRICS)}")
    return device


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heads", type=int, default=32, help="query heads (Qwen3-8B: 32)")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads (Qwen3-8B: 8)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=36, help="layers of the model, for the whole-calibration estimate")
    ap.add_argument("--sequences", type=int, default=16, help="calibration sequences, for the estimate")
    ap.add_argument("--key-candidates", type=int, default=35)
    ap.add_argument("--value-candidates", type=int, default=21)
    ap.add_argument("--metric", default="fisher")
    ap.add_argument("--query-stride", type=int, default=DEFAULT_QUERY_STRIDE)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    device = check(args)

    torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    matmul_dtype = torch.bfloat16 if on_gpu else torch.float32
    Hq, Hkv, D, T = args.heads, args.kv_heads, args.head_dim, args.seq_len
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    q, k, v = randn(1, Hq, T, D), randn(1, Hkv, T, D, scale=2.0), randn(1, Hkv, T, D)
    k_hat = k[None] + randn(args.key_candidates, 1, Hkv, T, D, scale=0.05)
    v_hat = v[None] + randn(args.value_candidates, 1, Hkv, T, D, scale=0.05)
    grad = randn(1, T, Hq, D)
    inp = LayerInputs(q, k, v, allowed_pairs(None, T, T, 1).to(device), D ** -0.5)
    metrics = (args.metric,)

    def score():
        return candidate_errors(inp, k_hat, v_hat, metrics, grad=grad, matmul_dtype=matmul_dtype,
                                chunk_elements=(1 << 28) if on_gpu else (1 << 23), query_stride=args.query_stride)

    fused = triton_scores.runs(inp, matmul_dtype, device)
    print(f"{Hq} query heads, {Hkv} KV heads, head_dim {D}, {T} tokens, {args.key_candidates} key and "
          f"{args.value_candidates} value candidates, {args.metric}, query stride {args.query_stride}, "
          f"{str(dtype).replace('torch.', '')} on {device}")
    calls = args.layers * args.sequences
    rows = {}
    if fused:
        rows["fused key kernel"] = timed(score, device, args.repeats)
        got = score()
    saved = os.environ.get("RATEQ_KERNELS")
    os.environ["RATEQ_KERNELS"] = "torch"
    try:
        rows["torch path"] = timed(score, device, args.repeats)
        ref = score()
    finally:
        os.environ.pop("RATEQ_KERNELS")
        if saved is not None:
            os.environ["RATEQ_KERNELS"] = saved
    base = rows["torch path"]
    for name, s in rows.items():
        print(f"{name:17s} {s * 1e3:9.2f} ms per layer and sequence ({s / base:.2f}x the torch path); "
              f"{calls} calls ({args.layers} layers x {args.sequences} sequences): {s * calls:.2f} s")
    if fused:
        pairs = int(inp.allowed[0, ::args.query_stride].sum()) * Hq  # sampled rows from 0 in batch row 0
        # Per pair and candidate: q·k and q·δk in each pass (4 dots of D), one row of (p̂ − a)·V (1 dot); the base
        # log-sum-exp once per pair (1 dot). A dot of D is 2·D flops.
        flop = pairs * 2 * D * (5 * args.key_candidates + 1)
        s = rows["fused key kernel"]
        print(f"fused key kernel: {flop / 1e9:.1f} GFLOP per call, {flop / s / 1e12:.3f} TFLOP/s")
        worst = max(float(((got[m][r] - ref[m][r]).abs() / ref[m][r].abs()).max()) for m in got for r in range(2))
        print(f"largest relative difference between the paths' sums: {worst:.2e}")


if __name__ == "__main__":
    main()
