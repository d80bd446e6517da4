"""Cost of appending to RateQCache's packed store as the history grows: flat per token, bytes unchanged.

Each role of a layer keeps its quantized history in a `RoleStore` (one bucket per (bits, quantizer)). Values
are appended one token per step as they leave the residual window, keys one block per `block` steps. This
measures that append alone — quantize the new tokens, pack, write into the store — at histories of 1k to 16k
tokens, for every layer of two plans — the shipped 2.5-bit profile of smollm2-135m (its layers mix bit widths
and quantizers: plain grids, rotated, Lloyd–Max and pre-RoPE keys) and uniform KIVI-2 on the same shape, where
quantizing is cheap and storage is most of the cost — against a baseline in the same
process that stores the same encodings by concatenating the whole history at every append (the O(T) copy a
store that cannot grow in place pays). Printed per history length: µs per appended token for both, their
ratio, and bytes held by the store (which must equal the codec's encoding of the history, and do — checked
here) with the spare capacity reported apart.

    python bench/cache_append.py
    python bench/cache_append.py --tokens 1024,4096,16384,65536 --profile my.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import rateq
from rateq.quant import codec_for
from rateq.runtime.store import RoleStore

ROOT = Path(__file__).resolve().parents[1]


def synthetic_rotary(head_dim: int, theta: float = 10000.0):
    """Standard RoPE tables for pre-RoPE keys (the cost does not depend on the angles)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def tables(like, position_ids, layer):
        ang = position_ids[..., None].to(torch.float32) * inv
        emb = torch.cat([ang, ang], -1)
        return emb.cos(), emb.sin()

    return tables


class ConcatStore:
    """The baseline: the same encodings, the whole history concatenated at every append."""

    def __init__(self, store: RoleStore):
        self.buckets = [(b, {}) for b in store.buckets]
        self.rope = store._rope

    def append(self, x: torch.Tensor, start: int) -> None:
        for b, held in self.buckets:
            rope = self.rope(x, start, x.shape[2]) if b.prerope else None
            enc = codec_for(b.spec).encode(b.select(x), b.bits, b.role, rope=rope)
            for name, t in enc.items():
                held[name] = t if name not in held else torch.cat([held[name], t], dim=2 if t.dim() == 4 else -1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=str(ROOT / "profiles" / "smollm2-135m-b2.5.safetensors"))
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    p.add_argument("--steps", type=int, default=128, help="decode steps timed at each history length")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per length (the median is printed)")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def measure(plan, n: int, steps: int, repeats: int) -> dict:
    block = plan.policy.block
    H, D, L = plan.num_kv_heads, plan.model.head_dim, plan.num_layers
    rotary = synthetic_rotary(D)
    stores = [(RoleStore(r, plan.bits(r)[i], plan.quantizer_ids(r)[i], plan.quantizers, D, i, rotary), r)
              for i in range(L) for r in ("k", "v")]
    history = torch.randn(1, H, n, D)
    bases = [ConcatStore(s) for s, _ in stores]
    for (store, _), base in zip(stores, bases):  # the prefill: n tokens, stored at once
        store.append(history, 0)
        base.append(history, 0)
    timings: dict[str, list[float]] = {"store": [], "concat": []}
    at = n
    for _ in range(repeats):
        new = torch.randn(1, H, steps, D)
        for name, targets in (("store", [s for s, _ in stores]), ("concat", bases)):
            t0 = time.perf_counter()
            for target, (_, role) in zip(targets, stores):
                if role == "v":  # one token per step
                    for t in range(steps):
                        target.append(new[:, :, t:t + 1], at + t)
                else:  # one key block per `block` steps
                    for t in range(0, steps, block):
                        target.append(new[:, :, t:t + block], at + t)
            timings[name].append((time.perf_counter() - t0) / steps * 1e6)
        at += steps
    held = sum(sum(s.nbytes_by_kind().values()) for s, _ in stores)
    want = sum(codec_for(b.spec).nbytes(enc) for base in bases for b, enc in base.buckets)
    if held != want:
        raise SystemExit(f"store holds {held} bytes but the codec's encoding of the history is {want}")
    store, concat = statistics.median(timings["store"]), statistics.median(timings["concat"])
    return dict(tokens=n, store_us_per_token=store, concat_us_per_token=concat, ratio=concat / store,
                held_bytes=held, slack_bytes=sum(s.slack_nbytes() for s, _ in stores))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    profile = rateq.load_profile(args.profile)
    plans = {Path(args.profile).name: profile,
             "uniform KIVI-2": rateq.Plan.uniform(profile.model, 2, policy=profile.policy)}
    block = profile.policy.block
    steps = max(block, args.steps // block * block)  # whole key blocks
    out = {}
    for label, plan in plans.items():
        rows = [measure(plan, int(n), steps, args.repeats) for n in args.tokens.split(",")]
        out[label] = rows
        if args.json:
            continue
        print(f"{label}: {plan.num_layers} layers × K/V, {plan.num_kv_heads} KV heads of {plan.model.head_dim}; "
              f"median of {args.repeats} × {steps} decode steps per length (values one token per step, keys one "
              f"{block}-token block)")
        print(f"{'tokens':>7} {'store µs/tok':>13} {'vs 1st':>7} {'concat µs/tok':>14} {'concat/store':>13} "
              f"{'held MiB':>9} {'slack MiB':>10}")
        first = rows[0]["store_us_per_token"]
        for r in rows:
            print(f"{r['tokens']:>7} {r['store_us_per_token']:>13.1f} {r['store_us_per_token'] / first:>7.2f} "
                  f"{r['concat_us_per_token']:>14.1f} {r['ratio']:>13.2f} {r['held_bytes'] / 2**20:>9.3f} "
                  f"{r['slack_bytes'] / 2**20:>10.3f}")
        print()
    if args.json:
        print(json.dumps(dict(profile=args.profile, steps=steps, plans=out), indent=2))


if __name__ == "__main__":
    main()
