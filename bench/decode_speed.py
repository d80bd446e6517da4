"""Decode step time at long contexts: RateQCache (packed attention and the dense path) vs DynamicCache vs
transformers' QuantizedCache (quanto, hqq).

Caches: the shipped 2.5-bit profile of the default model (its mix of pre-RoPE, rotated, Lloyd–Max and plain
buckets; on another model, the same mix drawn unit by unit, seeded: each (layer, KV head) takes the bits and
quantizer of a random unit of the profile, K and V apart), a uniform KIVI plan at `--bits` with groups of
`--group` (2 bits, groups of 64: 2.5 effective bits, the profile's), learned codebooks at `--bits` on every unit
(`--codebook`, centroids drawn at random: the decode path's cost does not depend on their values), each decoding
from the packed codes (`packed`) and through the dense path (`dense`: the dequantized history handed to the
model's attention); DynamicCache; QuantizedCache at the same bits, group and residual window. All start from the
same prefill (one forward fills a DynamicCache; its keys and values are written into the others), then decode
the same tokens, taking turns step by step so that load from other processes hits them alike. QuantizedCache
re-quantizes its whole history every `residual` steps, so the default `--steps` equals the residual window and
its mean includes that once, as a long generation would. Each row also gives the seconds the cache took to take
in the prefill (quantize, pack and store every layer's history: what a long prompt adds to the model's own
forward) and the peak bytes a decode step allocates beyond what was held before it (torch's profiler, CPU only),
as a share of one layer's dense fp32 history.

QuantizedCache needs its backends installed (`pip install optimum-quanto hqq`); rows for missing ones say so.

    python bench/decode_speed.py                                   # smollm2-135m, CPU, 1k/4k/16k tokens
    python bench/decode_speed.py --device cuda --model qwen3-8b --random-weights
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

import rateq
from rateq import CachePolicy, Plan, QuantSpec, RateQCache, fingerprint
from rateq.quant.params import param_key
from rateq.runtime.run import peak_allocated

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-b2.5.safetensors"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-weights", action="store_true", help="build the architecture with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--contexts", default="1024,4096,16384", help="context lengths (comma list)")
    p.add_argument("--profile", default=str(PROFILE), help="the profile measured beside the uniform plan")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (default: --residual)")
    p.add_argument("--bits", type=int, default=2, help="nominal bits of the uniform plans and of QuantizedCache")
    p.add_argument("--codebook", default="codebook-g4",
                   help="the learned-codebook quantizer of a uniform plan at --bits ('' leaves it out)")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--backends", default="quanto,hqq", help="QuantizedCache backends to compare (comma list)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_mix(profile: Plan, fp, seed: int = 0) -> Plan:
    """The profile's mix on the model `fp`: every (layer, KV head) takes the (bits, quantizer) of a unit of the
    profile drawn at random, K and V apart — the same families, and in expectation the same bits."""
    if profile.params:
        raise ValueError("a profile with learned parameters fits its own model only")
    g = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, fp.num_kv_heads)
    k = torch.randint(0, profile.k_bits.numel(), shape, generator=g)
    v = torch.randint(0, profile.v_bits.numel(), shape, generator=g)
    return Plan(profile.k_bits.flatten()[k], profile.v_bits.flatten()[v], profile.k_quantizer.flatten()[k],
                profile.v_quantizer.flatten()[v], list(profile.quantizers), fp, policy=profile.policy)


def codebook_plan(sid: str, fp, bits: int, seed: int = 0) -> Plan:
    """Every unit in the learned-codebook quantizer `sid` at `bits`, one codebook per (layer, head, K/V, group),
    centroids drawn at random."""
    spec = rateq.parse_spec(sid)
    c = spec.group_size
    g = torch.Generator().manual_seed(seed)
    books = torch.randn(fp.num_layers, fp.num_kv_heads, 2, fp.head_dim // c, 1 << (bits * c), c, generator=g)
    return Plan.uniform(fp, bits, spec=spec, params={param_key(spec, bits): books})


def held_nbytes(cache) -> int | None:
    if isinstance(cache, RateQCache):
        return cache.nbytes()
    if isinstance(cache, DynamicCache) and not isinstance(cache, QuantizedCache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return None


@torch.no_grad()
def measure(model, args, context: int, steps: int, plans: dict, skipped: dict) -> list[dict]:
    config, dev = model.config, args.device
    g = torch.Generator().manual_seed(context)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, context + steps + 1), generator=g).to(dev)
    prefill = DynamicCache(config=config)
    model(ids[:, :context], past_key_values=prefill, use_cache=True)
    makers = {"DynamicCache": lambda: DynamicCache(config=config)}
    for label, (plan, policy) in plans.items():
        makers[f"RateQ {label} packed"] = lambda p=plan, pol=policy: RateQCache(p, model, policy=pol, packed=True)
        makers[f"RateQ {label} dense"] = lambda p=plan, pol=policy: RateQCache(p, model, policy=pol, packed=False)
    for backend in [b for b in args.backends.split(",") if b]:
        name = f"QuantizedCache {backend} {args.bits}-bit g{args.group}"
        try:
            QuantizedCache(backend, config, nbits=args.bits, q_group_size=args.group, residual_length=args.residual)
        except (ImportError, ValueError) as exc:
            skipped[name] = str(exc).splitlines()[0]
            continue
        makers[name] = (lambda b=backend: QuantizedCache(b, config, nbits=args.bits, q_group_size=args.group,
                                                         residual_length=args.residual))
    caches = {}
    fill = {}
    for name, make in makers.items():
        cache = make()
        sync(dev)
        t = time.perf_counter()
        for i, layer in enumerate(prefill.layers):
            cache.update(layer.keys, layer.values, i)
        sync(dev)
        fill[name] = time.perf_counter() - t
        caches[name] = cache
    del prefill
    times = {name: [] for name in caches}
    for step in range(steps + 1):  # step 0 warms up (kernel builds, first-call set-up) and is not timed
        pos = torch.tensor([[context + step]], device=dev)
        for name, cache in caches.items():
            sync(dev)
            t = time.perf_counter()
            model(ids[:, context + step:context + step + 1], past_key_values=cache, position_ids=pos, use_cache=True)
            sync(dev)
            if step:
                times[name].append(time.perf_counter() - t)
    fp = fingerprint(model)
    layer_dense = 2 * fp.num_kv_heads * fp.head_dim * (context + steps + 1) * 4
    rows = []
    base = statistics.mean(times["DynamicCache"])
    for name, ts in times.items():
        cache = caches[name]
        peak = None
        if dev == "cpu":
            at = context + steps + 1
            step_ids, pos = ids[:, at - 1:at], torch.tensor([[at]], device=dev)
            peak = peak_allocated(lambda: model(step_ids, past_key_values=cache, position_ids=pos, use_cache=True))
        rows.append({"context": context, "cache": name, "fill_s": fill[name], "mean_ms": 1e3 * statistics.mean(ts),
                     "median_ms": 1e3 * statistics.median(ts), "vs_dynamic": statistics.mean(ts) / base,
                     "nbytes": held_nbytes(cache), "step_peak_bytes": peak,
                     "step_peak_vs_layer_history": None if peak is None else peak / layer_dense})
    return rows


def main() -> None:
    args = parse_args()
    if args.codebook:  # checked before the weights load: one line, exit 2
        try:
            book = rateq.parse_spec(args.codebook)
        except rateq.RateQError as exc:
            book, why = None, str(exc)
        else:
            why = f"not a learned-codebook quantizer that stores {args.bits} bits"
        if book is None or book.kind != "codebook" or not book.allows_bits(args.bits):
            print(f"--codebook {args.codebook}: {why}", file=sys.stderr)
            raise SystemExit(2)
    torch.set_num_threads(args.threads)
    steps = args.steps or args.residual
    model, _ = rateq.load_model(args.model, dtype=args.dtype, device=args.device, random_weights=args.random_weights)
    fp = fingerprint(model)
    dtype = next(model.parameters()).dtype
    spec = QuantSpec(group_size=args.group)
    uniform = Plan.uniform(fp, args.bits, spec=spec)
    window = CachePolicy(residual=args.residual, block=args.group)
    plans = {f"K{args.bits}V{args.bits} g{args.group}": (uniform, window)}
    if args.codebook:
        plans[f"{args.codebook} K{args.bits}V{args.bits}"] = (codebook_plan(args.codebook, fp, args.bits), window)
    if Path(args.profile).exists():
        profile = rateq.load_profile(args.profile)
        if not profile.model.mismatches(fp):
            plans = {f"profile {profile.effective_bits:.2f}b": (profile, profile.policy), **plans}
        else:
            mix = profile_mix(profile, fp)
            plans = {f"profile mix {mix.effective_bits:.2f}b": (mix, mix.policy), **plans}
    skipped: dict = {}
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        rows += measure(model, args, context, steps, plans, skipped)
    result = {"model": args.model, "random_weights": args.random_weights, "device": args.device, "dtype": str(dtype),
              "threads": args.threads, "steps": steps, "bits": args.bits, "group": args.group,
              "residual": args.residual, "rows": rows, "skipped": skipped}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} ({'random' if args.random_weights else 'real'} weights, {dtype}) on {args.device}, "
          f"{args.threads} threads: {steps} decode steps per context; uniform plans and QuantizedCache at "
          f"{args.bits} bits, group {args.group}, residual {args.residual}")
    print(f"{'tokens':>6s} {'cache':34s} {'fill s':>7s} {'mean ms':>9s} {'median':>9s} {'× Dynamic':>10s} "
          f"{'MiB held':>9s} {'step peak':>10s}")
    for r in rows:
        held = f"{r['nbytes'] / 2**20:9.1f}" if r["nbytes"] is not None else f"{'-':>9s}"
        peak = f"{100 * r['step_peak_vs_layer_history']:9.1f}%" if r["step_peak_bytes"] is not None else f"{'-':>10s}"
        print(f"{r['context']:6d} {r['cache']:34s} {r['fill_s']:7.2f} {r['mean_ms']:9.2f} {r['median_ms']:9.2f} "
              f"{r['vs_dynamic']:10.3f} {held} {peak}")
    print("fill: seconds to take in the prefill's keys and values (quantize, pack, store); step peak: bytes a decode "
          "step allocates beyond what is held, as a share of one layer's fp32 K+V history")
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")


if __name__ == "__main__":
    main()
