"""Decode step time at a long context: RateQCache vs DynamicCache vs transformers' QuantizedCache.

All caches start from the same prefill (one forward fills a DynamicCache; its keys and values are written into
the others), then decode the same tokens. Caches take turns step by step, so that load from other processes
hits them alike. QuantizedCache runs at the same nominal bits, group size and residual window as the uniform
RateQ plan; it re-quantizes its whole history every `residual` steps, so the default `--steps` equals the
residual window and the mean step time includes that once, as a long generation would.

    python bench/decode_speed.py                                   # smollm2-135m, CPU, 4096 tokens, 2 bits
    python bench/decode_speed.py --device cuda --model qwen3-8b --random-weights
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, QuantizedCache

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQCache, fingerprint


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-weights", action="store_true", help="build the architecture with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (default: --residual)")
    p.add_argument("--bits", type=int, default=2, help="nominal bits of the uniform plan and of QuantizedCache")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--backends", default="quanto,hqq", help="QuantizedCache backends to compare (comma list)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dense_nbytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or args.residual
    model, _ = rateq.load_model(args.model, dtype=args.dtype, device=args.device, random_weights=args.random_weights)
    config, fp, dev = model.config, fingerprint(model), args.device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, args.context + steps), generator=g).to(dev)

    t0 = time.perf_counter()
    prefill = DynamicCache(config=config)
    model(ids[:, :args.context], past_key_values=prefill, use_cache=True)
    sync(dev)
    prefill_s = time.perf_counter() - t0

    spec = QuantSpec(group_size=args.group)
    policy = CachePolicy(residual=args.residual, block=args.group)
    uniform = Plan.uniform(fp, args.bits, spec=spec)
    # A mixed plan at the same nominal bits: keys one bit above, values one below, in alternating heads, so every
    # layer holds several buckets with interleaved heads (the general case, not just one bucket per layer).
    L, H = fp.num_layers, fp.num_kv_heads
    alt = (torch.arange(H)[None, :] + torch.arange(L)[:, None]) % 2
    mixed = Plan((args.bits + alt).clamp(1, 8), (args.bits - alt).clamp(1, 8), torch.zeros(L, H, dtype=torch.long),
                 torch.zeros(L, H, dtype=torch.long), [spec], fp)
    makers = {
        "DynamicCache": lambda: DynamicCache(config=config),
        f"RateQCache K{args.bits}V{args.bits}": lambda: RateQCache(uniform, config, policy=policy),
    }
    if 2 <= args.bits <= 7:
        makers[f"RateQCache mixed {args.bits + 1}/{args.bits - 1}"] = lambda: RateQCache(mixed, config, policy=policy)
    skipped = {}
    for backend in [b for b in args.backends.split(",") if b]:
        name = f"QuantizedCache {backend} {args.bits}-bit"
        try:
            QuantizedCache(backend, config, nbits=args.bits, q_group_size=args.group, residual_length=args.residual)
        except (ImportError, ValueError) as exc:
            skipped[name] = str(exc).splitlines()[0]
            continue
        makers[name] = (lambda b=backend: QuantizedCache(b, config, nbits=args.bits, q_group_size=args.group,
                                                         residual_length=args.residual))

    caches = {}
    for name, make in makers.items():
        cache = make()
        for i, layer in enumerate(prefill.layers):
            cache.update(layer.keys, layer.values, i)
        caches[name] = cache
    del prefill

    times = {name: [] for name in caches}
    for step in range(steps):
        pos = torch.tensor([[args.context + step]], device=dev)
        for name, cache in caches.items():
            sync(dev)
            t = time.perf_counter()
            model(ids[:, args.context + step:args.context + step + 1], past_key_values=cache, position_ids=pos,
                  use_cache=True)
            sync(dev)
            times[name].append(time.perf_counter() - t)

    base = statistics.mean(times["DynamicCache"])
    rows = []
    for name, ts in times.items():
        cache = caches[name]
        held = cache.nbytes() if isinstance(cache, RateQCache) else (dense_nbytes(cache) if name == "DynamicCache" else None)
        rows.append({"cache": name, "mean_ms": 1e3 * statistics.mean(ts), "median_ms": 1e3 * statistics.median(ts),
                     "max_ms": 1e3 * max(ts), "vs_dynamic": statistics.mean(ts) / base, "nbytes": held})
    result = {"model": args.model, "random_weights": args.random_weights, "device": dev, "dtype": str(dtype),
              "threads": args.threads, "context": args.context, "steps": steps, "bits": args.bits,
              "group": args.group, "residual": args.residual, "prefill_seconds": prefill_s, "rows": rows,
              "skipped": skipped}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} ({'random' if args.random_weights else 'real'} weights, {dtype}) on {dev}, "
          f"{args.threads} threads: decode at {args.context} tokens, {steps} steps, {args.bits} nominal bits, "
          f"group {args.group}, residual {args.residual}")
    print(f"{'cache':34s} {'mean ms':>9s} {'median':>9s} {'max':>9s} {'× Dynamic':>10s} {'MiB held':>9s}")
    for r in rows:
        held = f"{r['nbytes'] / 2**20:9.1f}" if r["nbytes"] is not None else f"{'-':>9s}"
        print(f"{r['cache']:34s} {r['mean_ms']:9.2f} {r['median_ms']:9.2f} {r['max_ms']:9.2f} {r['vs_dynamic']:10.3f} {held}")
    rq = [r for r in rows if r["cache"].startswith("RateQCache K")][0]
    for r in rows:
        if r["cache"].startswith("QuantizedCache"):
            print(f"RateQCache K{args.bits}V{args.bits} vs {r['cache']}: {r['mean_ms'] / rq['mean_ms']:.2f}× faster")
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")


if __name__ == "__main__":
    main()
