"""Bytes RateQCache holds vs an fp16 DynamicCache, at 1k/4k/16k tokens and effective budgets 2, 2.5, 3, 4.

Plans are solved (greedy solver) on a model's shape from synthetic distortion curves D = a_u · 4^(−b) with a
random sensitivity a_u per unit (keys 4× more sensitive on average), over four quantizers with different
storage (KIVI's fp16 scale + zero-point per 32; fp16 scale + packed integer zero-point per 64; pre-RoPE
rotated keys per 128 tokens; Lloyd–Max codes with one fp16 norm per 64 channels), so plans mix bit widths,
quantizers, bucket kinds and K/V allocations. Keys and values are synthetic (memory does not depend on
their values) in fp16, written as one prefill plus a few decode steps.

Each row compares what `nbytes()` reports with what the plan predicts: effective bits × quantized elements
(keys: whole blocks out of the residual window; values: everything out of it) + the residual window and key
tail in fp16. Held must be within 2% of predicted.

    python bench/cache_memory.py
    python bench/cache_memory.py --model qwen3-8b --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig

import rateq
from rateq import CachePolicy, Curves, QuantSpec, RateQCache
from rateq.models import ModelFingerprint, known_models

SPECS = [QuantSpec(group_size=32), QuantSpec(group_size=64, zero="code"),
         rateq.parse_spec("minmax-g128-rhadamard-fp16-prerope"), rateq.parse_spec("lloydmax-g64-rhadamard-fp16")]


def synthetic_rotary(head_dim: int, theta: float = 10000.0):
    """Standard RoPE tables for pre-RoPE keys (memory does not depend on the angles)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def tables(like, position_ids, layer):
        ang = position_ids[..., None].to(torch.float32) * inv.to(like.device)
        emb = torch.cat([ang, ang], -1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    return tables


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a built-in alias (its shape is all that is used)")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--budgets", default="2,2.5,3,4")
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--decode", type=int, default=5, help="decode steps after the prefill")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def shape_of(alias: str):
    cfg = dict(known_models()[alias]["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    fp = rateq.fingerprint(config, name=alias)
    return config, fp


def synthetic_curves(fp: ModelFingerprint, seed: int = 0) -> Curves:
    L, H = fp.num_layers, fp.num_kv_heads
    g = torch.Generator().manual_seed(seed)
    bits = (1, 2, 3, 4, 5, 6, 8)
    a = torch.rand(L, H, 2, generator=g, dtype=torch.float64) * 10 + 0.1
    a[:, :, 0] *= 4  # keys are more sensitive
    b = torch.tensor(bits, dtype=torch.float64)
    penalty = torch.tensor([1.0, 1.15, 0.9, 0.8], dtype=torch.float64)
    dist = a[..., None, None] * penalty[:, None] * 4.0 ** (-b)  # (L, H, 2, Q, NB)
    dist[:, :, 1, 2] = float("inf")  # 128-token key groups cannot hold values
    counts = torch.ones(L, H, 2, dtype=torch.float64)
    return Curves(dist, bits, SPECS, counts, "synthetic", fp)


def predicted_nbytes(plan, policy: CachePolicy, n: int, fp: ModelFingerprint, itemsize: int) -> float:
    bpe = plan.unit_bits_per_element()  # (L, H, 2) effective bits of every unit
    qk, qv = policy.quantized_keys(n) - policy.sinks, policy.quantized_values(n) - policy.sinks
    D = fp.head_dim
    quantized = (bpe[..., 0].sum() * qk + bpe[..., 1].sum() * qv) * D / 8
    full = fp.num_layers * fp.num_kv_heads * D * ((n - qk) + (n - qv)) * itemsize
    return float(quantized) + full


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    config, fp = shape_of(args.model)
    curves = synthetic_curves(fp)
    policy = CachePolicy(residual=args.residual, block=args.block)
    tokens = [int(t) for t in args.tokens.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    g = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for budget in budgets:
        plan = rateq.solve(curves, budget, method="greedy", policy=policy)
        for n in tokens:
            cache = RateQCache(plan, config, policy=policy, rotary=synthetic_rotary(D))
            prefill = n - args.decode
            for t, count in [(0, prefill)] + [(prefill + i, 1) for i in range(args.decode)]:
                for layer in range(L):
                    kv = torch.randn(2, 1, H, count, D, generator=g, device=args.device, dtype=torch.float16)
                    cache.update(kv[0], kv[1], layer)
            held = cache.nbytes()
            kinds = cache.nbytes_by_kind()
            fp16 = cache.dense_nbytes(torch.float16)
            predicted = predicted_nbytes(plan, policy, n, fp, 2)
            rows.append({"budget": budget, "effective_bits": plan.effective_bits, "nominal_bits": plan.nominal_bits,
                         "k_bits": plan.mean_bits("k"), "v_bits": plan.mean_bits("v"), "tokens": n, "nbytes": held,
                         **{f"nbytes_{k}": v for k, v in kinds.items()}, "fp16_dynamic_nbytes": fp16,
                         "ratio_to_fp16": held / fp16, "predicted_nbytes": predicted,
                         "held_vs_predicted": held / predicted - 1})
            del cache
    ok = all(abs(r["held_vs_predicted"]) <= 0.02 for r in rows)
    if args.json:
        print(json.dumps({"model": args.model, "policy": policy.to_dict(), "rows": rows, "within_2pct": ok}, indent=2))
        return
    print(f"{args.model} shape ({L} layers × {H} KV heads × {D}), fp16 K/V, policy {policy.to_dict()}; "
          f"solved plans over {', '.join(s.id for s in SPECS)}")
    print(f"{'budget':>6s} {'eff':>6s} {'nom':>6s} {'K/V bits':>9s} {'tokens':>7s} {'held MiB':>9s} "
          f"{'fp16 MiB':>9s} {'× fp16':>7s} {'predicted':>9s} {'Δ':>7s}")
    for r in rows:
        print(f"{r['budget']:6.2f} {r['effective_bits']:6.3f} {r['nominal_bits']:6.3f} "
              f"{r['k_bits']:4.2f}/{r['v_bits']:4.2f} {r['tokens']:7d} {r['nbytes'] / 2**20:9.2f} "
              f"{r['fp16_dynamic_nbytes'] / 2**20:9.2f} {r['ratio_to_fp16']:7.3f} "
              f"{r['predicted_nbytes'] / 2**20:9.2f} {100 * r['held_vs_predicted']:+6.2f}%")
    print("held within 2% of the plan's prediction everywhere" if ok else "NOT within 2% of the prediction")


if __name__ == "__main__":
    main()
