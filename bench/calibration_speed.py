"""Calibration cost as a ratio: calibrate() time / one plain pass of the model over the same tokens, in one process.

The baseline for forward-only metrics (mse, score, output) is one no-grad forward with logits; for `fisher` it is
forward + backward (activation gradients only, as calibration computes them). Target: ≤ 3×.

    python bench/calibration_speed.py                                  # smollm2-135m, CPU, fp32, 2 × 1024
    python bench/calibration_speed.py --metric all --n 1
    python bench/calibration_speed.py --model qwen3-8b --random-weights --device cuda --dtype bf16 --n 16 --seq-len 2048
"""

from __future__ import annotations

import argparse
import time

import torch

import rateq
from rateq.calibrate import DEFAULT_METRIC, METRICS, calibrate_metrics


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def plain_pass(model, ids, batch_size: int, backward: bool) -> float:
    """Seconds for one forward (and backward) of the model over `ids` in batches, as calibration batches them."""
    device = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i:i + batch_size].to(device)
            if backward:
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                         reduction="sum")
                del logits
                loss.backward()
            else:
                with torch.no_grad():
                    model(x, use_cache=False)
        sync(device)
        return time.perf_counter() - t0
    finally:
        for p, r in frozen:
            p.requires_grad_(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true", help="the alias's architecture with random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    ap.add_argument("--n", type=int, default=2, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--metric", default=DEFAULT_METRIC, help=f"one of {', '.join(METRICS)}, or 'all'")
    ap.add_argument("--reference", default=None, help="measure around a uniform plan, e.g. K2V2")
    ap.add_argument("--quantizers", default="minmax-g32-fp16",
                    help="candidate quantizer ids, comma-separated, or 'default' (rateq's DEFAULT_QUANTIZERS)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from rateq.calibrate import DEFAULT_QUANTIZERS

    specs = [rateq.parse_spec(q) for q in (DEFAULT_QUANTIZERS if args.quantizers == "default"
                                           else args.quantizers.split(","))]
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = rateq.load_model(args.model, dtype=args.dtype, device=args.device, random_weights=args.random_weights)
    fp = rateq.fingerprint(model)
    print(f"{fp.name}: {fp.num_layers} layers, {fp.num_kv_heads} KV heads, head_dim {fp.head_dim}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.dtype} on {args.device} "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    if tok is None:  # random weights come without a tokenizer: random token ids, seeded
        ids = torch.randint(0, model.config.get_text_config().vocab_size, (args.n, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    else:
        ids = rateq.text_windows(tok, "austen-emma", args.n, args.seq_len, seed=0)
    tokens = ids.numel()
    reference = None
    if args.reference:
        reference = rateq.Plan.uniform(fp, int(args.reference[1]), int(args.reference[3]))
    metrics = list(METRICS) if args.metric == "all" else [args.metric]

    # Warm-up: first-call costs (allocator, kernels, lazy imports) belong to neither side.
    warm = ids[:1, : min(args.seq_len, 256)]
    plain_pass(model, warm, 1, backward=True)
    calibrate_metrics(model, None, warm, metrics=("fisher",), batch_size=1, quantizers=specs)

    for metric in metrics:
        backward = metric == "fisher"
        base = plain_pass(model, ids, args.batch_size, backward)
        if str(args.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        curves = calibrate_metrics(model, None, ids, metrics=(metric,), batch_size=args.batch_size,
                                   reference=reference, quantizers=specs)[metric]
        sync(args.device)
        cal = time.perf_counter() - t0
        base2 = plain_pass(model, ids, args.batch_size, backward)  # again after: load on a shared machine drifts
        base = (base + base2) / 2
        peak = ""
        if str(args.device).startswith("cuda"):
            peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        what = "forward+backward" if backward else "forward"
        print(f"{metric:7s} {tokens} tokens: calibrate {cal:8.2f} s ({tokens / cal:,.0f} tok/s) | plain {what} "
              f"{base:8.2f} s ({tokens / base:,.0f} tok/s) | ratio {cal / base:.2f}x "
              f"(target <= 3x){peak}; curves {tuple(curves.shape)} ({len(specs)} quantizers)")


if __name__ == "__main__":
    main()
