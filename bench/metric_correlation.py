"""Which calibration metric predicts real damage: Spearman rank correlation, over many mixed-bit plans, between
a plan's predicted distortion Σ_u D_u(b_u) and its measured increase of NLL.

    python bench/metric_correlation.py                      # smollm2-135m, Emma 2×1024 → Pride and Prejudice 2×1024
    python bench/metric_correlation.py --references K2V2,K3V3 --cache /tmp/dnll.json

Curves: every metric from one calibration pass around the full-precision model, plus `output`/`fisher` measured
around each reference plan (`calibrate(reference=…)`). Plans: structured (K/V splits, layer splits), shuffled
multisets of bit widths, and each metric's own greedy-optimal plan at two budgets (the plans a solver would
pick, where a metric that under-prices low bits is caught). Measured: one-pass fake-quant NLL (R = 0) on the
evaluation windows, minus the full-precision NLL on the same windows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

import rateq
from rateq.calibrate import DEFAULT_METRIC, calibrate_metrics


def nll(model, ids: torch.Tensor, batch: int) -> float:
    """Mean next-token NLL (nats) of `ids (n, T)`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch]
            logits = model(x, use_cache=False).logits
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                             reduction="sum"))
            count += x[:, 1:].numel()
    return total / count


def make_plan(fp, k_bits, v_bits) -> rateq.Plan:
    k_bits, v_bits = torch.as_tensor(k_bits).long(), torch.as_tensor(v_bits).long()
    zeros = torch.zeros_like(k_bits)
    return rateq.Plan(k_bits, v_bits, zeros, zeros, [rateq.KIVI], fp)


def uniform(fp, k, v):
    L, H = fp.num_layers, fp.num_kv_heads
    return make_plan(fp, torch.full((L, H), k), torch.full((L, H), v))


def structured_plans(fp, seed: int) -> dict[str, rateq.Plan]:
    L, H = fp.num_layers, fp.num_kv_heads
    gen = torch.Generator().manual_seed(seed)
    plans = {}
    for k, v in ((3, 1), (4, 2), (5, 3), (1, 3), (2, 4), (3, 5)):
        plans[f"K{k}V{v}"] = uniform(fp, k, v)
    first = torch.arange(L)[:, None].expand(L, H) < L // 2
    for hi, lo in ((3, 1), (4, 2), (5, 3)):
        plans[f"layers {hi}|{lo}"] = make_plan(fp, torch.where(first, hi, lo), torch.where(first, hi, lo))
        plans[f"layers {lo}|{hi}"] = make_plan(fp, torch.where(first, lo, hi), torch.where(first, lo, hi))

    def shuffled(values):  # a multiset of bit widths spread at random over all 2·L·H units
        n = 2 * L * H
        pool = torch.tensor(values).repeat(n // len(values) + 1)[:n]
        bits = pool[torch.randperm(n, generator=gen)].view(L, H, 2)
        return make_plan(fp, bits[..., 0], bits[..., 1])

    for name, values in (("shuffle {2,3}", (2, 3)), ("shuffle {1,2,3,4}", (1, 2, 3, 4)), ("shuffle {2,4}", (2, 4)),
                         ("shuffle {1,3,5}", (1, 3, 5)), ("shuffle {3,4}", (3, 4)), ("shuffle {1,4}", (1, 4)),
                         ("shuffle {2,3,4,5,6}", (2, 3, 4, 5, 6)), ("shuffle {1,2}", (1, 2))):
        plans[name] = shuffled(values)
    return plans


def predicted(curves: rateq.Curves, plan: rateq.Plan) -> float:
    """Σ_u D_u(b_u) on the monotone curves."""
    d = curves.monotone().distortion[..., 0, :]  # (L, H, 2, NB), one quantizer
    index = {b: i for i, b in enumerate(curves.bits)}
    total = 0.0
    for r, role in enumerate(("k", "v")):
        idx = plan.bits(role).clone().apply_(lambda b: index[b])  # (L, H)
        total += float(d[:, :, r].gather(-1, idx[..., None]).sum())
    return total


def plan_key(plan: rateq.Plan) -> str:
    return json.dumps([plan.k_bits.tolist(), plan.v_bits.tolist()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="austen-emma")
    ap.add_argument("--calib-n", type=int, default=2)
    ap.add_argument("--eval", dest="eval_text", default="austen-pp")
    ap.add_argument("--eval-n", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--metrics", default="mse,score,output,fisher")
    ap.add_argument("--references", default="K2V2,K3V3", help="uniform plans to measure output/fisher around")
    ap.add_argument("--solve-budgets", default="3.0,3.5", help="effective-bit budgets of each metric's own plan")
    ap.add_argument("--cache", default=None, help="JSON file remembering measured ΔNLL per plan")
    ap.add_argument("--curves-dir", default=None, help="keep curves here and reuse them on the next run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the table as JSON too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = rateq.load_model(args.model)
    fp = rateq.fingerprint(model)
    calib = rateq.text_windows(tok, args.calib, args.calib_n, args.seq_len, seed=0)
    evals = rateq.text_windows(tok, args.eval_text, args.eval_n, args.seq_len, seed=None, char_start=100_000)

    # ---- curves
    curves: dict[str, rateq.Curves] = {}
    keep = Path(args.curves_dir) if args.curves_dir else None
    tag = f"{args.model}-{args.calib}-{args.calib_n}x{args.seq_len}"

    def measure(names, reference=None, suffix=""):
        files = {m: keep / f"{tag}-{m}{suffix}.safetensors" for m in names} if keep else {}
        if keep and all(f.is_file() for f in files.values()):
            curves.update({m + suffix: rateq.Curves.load(f) for m, f in files.items()})
            return
        t0 = time.perf_counter()
        got = calibrate_metrics(model, tok, calib, metrics=names, reference=reference, quantizers=[rateq.KIVI],
                                progress=True)
        extra = f" (NLL under {suffix[1:]}: {got['fisher'].calibration['nll']:.4f})" if "fisher" in got and suffix else ""
        print(f"calibrated {','.join(names)}{' around ' + suffix[1:] if suffix else ''} on {calib.numel()} tokens "
              f"in {time.perf_counter() - t0:.1f} s{extra}")
        for m, c in got.items():
            curves[m + suffix] = c
            if keep:
                keep.mkdir(parents=True, exist_ok=True)
                c.save(files[m])

    measure(args.metrics.split(","))
    for ref in filter(None, args.references.split(",")):
        measure(["output", "fisher"], reference=uniform(fp, int(ref[1]), int(ref[3])), suffix=f"@{ref}")

    # ---- plans
    plans = structured_plans(fp, seed=0)
    for name, c in curves.items():
        for budget in map(float, filter(None, args.solve_budgets.split(","))):
            try:
                plan = rateq.solve(c, budget, method="greedy")
            except rateq.RateQError as exc:
                print(f"no {name} plan at {budget}: {exc}")
                continue
            plans[f"best {name} @{budget:g}"] = plan

    # ---- measured damage
    cache = {}
    if args.cache and Path(args.cache).is_file():
        cache = json.loads(Path(args.cache).read_text())
    base_key = f"fp|{args.eval_text}|{args.eval_n}x{args.seq_len}"
    if base_key not in cache:
        cache[base_key] = nll(model, evals, batch=1)
    base = cache[base_key]
    print(f"full-precision NLL {base:.4f} (PPL {np.exp(base):.2f}) on {evals.numel()} tokens of {args.eval_text}")
    rows = []
    for name, plan in plans.items():
        key = f"{base_key}|{plan_key(plan)}"
        if key not in cache:
            t0 = time.perf_counter()
            with rateq.simulate_plan(model, plan, rateq.CachePolicy(residual=0)):
                cache[key] = nll(model, evals, batch=1)
            if args.cache:
                Path(args.cache).write_text(json.dumps(cache))
            print(f"  {name:28s} {plan.nominal_bits:.2f} nominal bits  PPL {np.exp(cache[key]):8.2f}  "
                  f"ΔNLL {cache[key] - base:+.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append({"plan": name, "nominal_bits": plan.nominal_bits, "effective_bits": plan.effective_bits,
                     "ppl": float(np.exp(cache[key])), "dnll": cache[key] - base,
                     **{m: predicted(c, plan) for m, c in curves.items()}})
    if args.cache:
        Path(args.cache).write_text(json.dumps(cache))

    # ---- report
    print(f"\n{'plan':30s} {'nominal':>7s} {'PPL':>8s} {'ΔNLL':>8s}")
    for r in sorted(rows, key=lambda r: r["dnll"]):
        print(f"{r['plan']:30s} {r['nominal_bits']:7.2f} {r['ppl']:8.2f} {r['dnll']:+8.4f}")
    dnll = np.array([r["dnll"] for r in rows])
    print(f"\nrank correlation with measured ΔNLL over {len(rows)} plans "
          f"({min(r['nominal_bits'] for r in rows):.2f}–{max(r['nominal_bits'] for r in rows):.2f} nominal bits):")
    print(f"{'metric':16s} {'spearman':>9s} {'pearson(log)':>13s}")
    summary = {}
    for m in curves:
        pred = np.array([r[m] for r in rows])
        rho = spearmanr(pred, dnll).statistic
        lin = pearsonr(np.log(pred), np.log(np.clip(dnll, 1e-6, None))).statistic
        summary[m] = {"spearman": float(rho), "pearson_log": float(lin)}
        print(f"{m:16s} {rho:9.3f} {lin:13.3f}")
    best = max(summary, key=lambda m: summary[m]["spearman"])
    print(f"best: {best}; calibrate's default metric: {DEFAULT_METRIC}")
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary, "base_nll": base}, indent=1))


if __name__ == "__main__":
    main()
