"""Calibration cost as a ratio: calibrate() time / one plain pass of the model over the same tokens, in one process.

The baseline for forward-only metrics (mse, score, output) is one no-grad forward with logits; for `fisher` it is
forward + backward (activation gradients only, as calibration computes them), over every token calibration reads:
the priced windows and, when some candidate learns parameters (codebooks, static scales), the windows held out to
fit them. Target: ≤ 3×. Each line also gives
the seconds for the N × T tokens and the peak memory per device of the calibration (`peak_bytes` of its summary:
the process's resident peak for `cpu`, torch's allocator peak for each GPU) and of the plain pass.

    python bench/calibration_speed.py                                  # smollm2-135m, CPU, fp32, 4 × 1024 of mix
    python bench/calibration_speed.py --quantizers default,codebook-g2-prerope  # + learned codebooks
    python bench/calibration_speed.py --metric all --n 1
    python bench/calibration_speed.py --random-weights --config '{"num_hidden_layers": 2}' --n 1 --seq-len 256
    python bench/calibration_speed.py --device cuda --model qwen3-8b --random-weights     # bf16, 16 × 2048
    python bench/calibration_speed.py --device-map auto --model llama-3.1-70b --random-weights
    python bench/calibration_speed.py --device cuda --model qwen3-8b --random-weights --profile  # where time goes

Defaults follow the device, as `rateq calibrate` does: 16 × 2048 tokens in bf16 on CUDA (or a device map over
GPUs), 4 × 1024 in fp32 on the CPU; the candidates are rateq's default set (`--quantizers default`, which may be
listed with others: `default,codebook-g2`), scored on every 4th query row (`--query-stride`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rateq
from rateq.calibrate import (DEFAULT_METRIC, DEFAULT_QUANTIZERS, DEFAULT_QUERY_STRIDE, METRICS, calibrate_metrics,
                             calibration_ids, default_windows)
from rateq.text import DEFAULT_CALIBRATION_TEXT
from rateq.memory import PeakMemory, format_bytes
from rateq.models import compute_device, input_device, weight_devices


def cuda_devices(model) -> list[str]:
    return [d for d in weight_devices(model) + [str(input_device(model))] if d.startswith("cuda")]


def sync(model):
    for d in dict.fromkeys(cuda_devices(model)):
        torch.cuda.synchronize(d)


def plain_pass(model, ids, batch_size: int, backward: bool) -> float:
    """Seconds for one forward (and backward) of the model over `ids` in batches, as calibration batches them."""
    device = input_device(model)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        sync(model)
        t0 = time.perf_counter()
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i:i + batch_size].to(device)
            if backward:
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits
                y = x.to(logits.device)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(),
                                                         reduction="sum")
                del logits
                loss.backward()
            else:
                with torch.no_grad():
                    model(x, use_cache=False)
        sync(model)
        return time.perf_counter() - t0
    finally:
        for p, r in frozen:
            p.requires_grad_(r)


def peaks(found: dict) -> str:
    return ", ".join(f"{d} {format_bytes(b)}" for d, b in found.items())


def profile_sequence(model, tok, texts, specs, metric: str, seq_len: int, query_stride) -> None:
    """`--profile`: one more sequence calibrated under torch's profiler (its overhead included): the wall time, the
    device's kernel time and share of the wall (where that share is low, the GPU waits on the host: launches or
    read-backs), aten calls on the host, and the top operations by device time (host time on a CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = bool(cuda_devices(model))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        calibrate_metrics(model, tok, texts, n_samples=1, seq_len=seq_len, metrics=(metric,), quantizers=specs,
                          query_stride=query_stride)
        sync(model)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    host_ops = sum(e.count for e in events if e.device_type == DeviceType.CPU and (e.key or "").startswith("aten::"))
    line = (f"profile, 1 x {seq_len} tokens under the profiler: {wall:.2f} s wall, {host_ops} aten calls on the host "
            "(nested ones included)")
    if on_gpu:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        line += (f"; {sum(e.count for e in kernels)} kernels, {busy:.2f} s of device time ({busy / wall:.0%} of the "
                 f"wall)")
    print(line)
    print(events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=12))


def config_overrides(text: str | None) -> dict:
    """`--config`: JSON text or a JSON file of config fields that replace the alias's (random weights only)."""
    if not text:
        return {}
    path = Path(text)
    data = json.loads(path.read_text() if path.is_file() else text)
    if not isinstance(data, dict):
        raise SystemExit("--config must be a JSON object of config fields")
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true", help="the alias's architecture with random weights")
    ap.add_argument("--config", default=None,
                    help="with --random-weights: JSON object (or file) of config fields replacing the alias's, "
                         "e.g. '{\"num_hidden_layers\": 2}' for a shallow stand-in")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--device-map", default=None,
                    help="spread the model with accelerate instead of --device: auto, balanced, sequential or a "
                         "JSON file {module: device}")
    ap.add_argument("--max-memory", default=None, help="with --device-map: e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    ap.add_argument("--offload-folder", default=None, help="with --device-map: where disk-offloaded weights go")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16")
    ap.add_argument("--n", type=int, default=None, help="calibration sequences (default 16 on CUDA, 2 on CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048 on CUDA, 1024 on CPU)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--metric", default=DEFAULT_METRIC, help=f"one of {', '.join(METRICS)}, or 'all'")
    ap.add_argument("--reference", default=None, help="measure around a uniform plan, e.g. K2V2")
    ap.add_argument("--quantizers", default="default",
                    help="candidate quantizer ids, comma-separated, or 'default' (rateq's DEFAULT_QUANTIZERS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=DEFAULT_CALIBRATION_TEXT, help="calibration text (real weights; default mix)")
    ap.add_argument("--query-stride", type=int, default=None,
                    help=f"score every N-th query row (default {DEFAULT_QUERY_STRIDE}; 1: every row)")
    ap.add_argument("--profile", action="store_true",
                    help="then one more sequence under torch's profiler: device time, its share of the wall, top ops")
    args = ap.parse_args()

    names = [x for q in args.quantizers.split(",") for x in (DEFAULT_QUANTIZERS if q == "default" else [q])]
    specs = [rateq.parse_spec(q) for q in dict.fromkeys(names)]
    torch.set_num_threads(args.threads)
    overrides = config_overrides(args.config)
    if overrides and not args.random_weights:
        raise SystemExit("--config changes an alias's architecture: it needs --random-weights")
    computes_on = compute_device(args.device, rateq.models.check_device_map(args.device_map))
    n_default, t_default = default_windows(computes_on)
    n, seq_len = args.n or n_default, args.seq_len or t_default

    t0 = time.perf_counter()
    placement = {}
    if args.device_map is not None:
        placement = dict(device_map=args.device_map, max_memory=args.max_memory, offload_folder=args.offload_folder)
    if args.random_weights:
        model, tok = rateq.models.random_model(args.model, dtype=args.dtype, device=args.device, **placement,
                                               **overrides), None
    else:
        model, tok = rateq.load_model(args.model, dtype=args.dtype, device=args.device, **placement)
    fp = rateq.fingerprint(model)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    where = args.device if args.device_map is None else f"{args.device_map} over {', '.join(weight_devices(model))}"
    print(f"{fp.name}: {fp.num_layers} layers, {fp.num_kv_heads} KV heads, head_dim {fp.head_dim}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {dtype} on {where} "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    if tok is None:  # random weights come without a tokenizer: a seeded stream of random token ids
        texts = torch.randint(0, model.config.get_text_config().vocab_size, (2 * n * seq_len,),
                              generator=torch.Generator().manual_seed(0))
    else:
        texts = args.data
    ids = calibration_ids(tok, texts, n, seq_len, seed=0)[0]
    # Learned candidates (codebooks, static scales) are fitted on as many windows again, held out from the priced
    # ones: calibration reads those tokens too.
    learned = any(q.learned for q in specs)
    read = torch.cat([ids, calibration_ids(tok, texts, n, seq_len, seed=0, held_out=True)[0]]) if learned else ids
    tokens = ids.numel()
    reference = None
    if args.reference:
        reference = rateq.Plan.uniform(fp, int(args.reference[1]), int(args.reference[3]))
    metrics = list(METRICS) if args.metric == "all" else [args.metric]

    # Warm-up: first-call costs (allocator, kernels, lazy imports) belong to neither side.
    warm = ids[:1, : min(seq_len, 256)]
    plain_pass(model, warm, 1, backward=True)
    calibrate_metrics(model, None, warm, metrics=("fisher",), batch_size=1, quantizers=specs)

    on_gpu = bool(cuda_devices(model))
    for metric in metrics:
        backward = metric == "fisher"
        plain_peak = PeakMemory(cuda_devices(model))
        base = plain_pass(model, read, args.batch_size, backward)
        plain_bytes = plain_peak.read()
        t0 = time.perf_counter()
        curves = calibrate_metrics(model, tok, texts, n_samples=n, seq_len=seq_len, metrics=(metric,),
                                   batch_size=args.batch_size, reference=reference, quantizers=specs,
                                   query_stride=args.query_stride)[metric]
        sync(model)
        cal = time.perf_counter() - t0
        base2 = plain_pass(model, read, args.batch_size, backward)  # again after: load on a shared machine drifts
        base = (base + base2) / 2
        if learned:
            print(f"        learned candidates fitted on {curves.calibration['learned']['windows']} windows "
                  f"({curves.calibration['learned']['tokens']} tokens): the plain pass below runs over those and "
                  f"the {tokens} priced tokens")
        peak = f", peak memory {peaks(curves.calibration['peak_bytes'])}"
        what = "forward+backward" if backward else "forward"
        target = "target <= 3x" + (" and < 30 s" if on_gpu else "")
        print(f"{metric:7s} {read.numel()} tokens: calibrate {cal:8.2f} s ({tokens / cal:,.0f} tok/s) | plain {what} "
              f"{base:8.2f} s ({tokens / base:,.0f} tok/s) | ratio {cal / base:.2f}x "
              f"({target}){peak}; curves {tuple(curves.shape)} ({len(specs)} quantizers)")
        print(f"        {n} x {seq_len} tokens priced, query stride {curves.calibration['query_stride']}, batch "
              f"{args.batch_size}; plain {what} peak memory {peaks(plain_bytes)}")
        if args.profile:
            profile_sequence(model, tok, texts, specs, metric, seq_len, args.query_stride)


if __name__ == "__main__":
    main()
