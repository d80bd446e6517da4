"""Solver speed and quality on a Qwen3-8B-sized problem (synthetic curves; no model needed).

36 layers × 8 KV heads × K/V = 576 units, bit widths (1, 2, 3, 4, 5, 6, 8), four quantizers → 28 candidates per
unit. Curves follow RateQuant's law D = α·β^(−b) with per-unit α (lognormal), per-quantizer β in 3.6–5.3 and
multiplicative noise (so they are monotone after `Curves.monotone` but not convex). Prints seconds per method,
a 100-point frontier, and every method's distortion against the exact optimum solved in the same process.

    python bench/solver_speed.py [--budget 2.5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import rateq
from rateq.curves import Curves
from rateq.models import ModelFingerprint
from rateq.quant.spec import QuantSpec

torch.set_num_threads(2)

QUANTIZERS = [
    QuantSpec(),  # KIVI: minmax g32, fp16 scale and zero (+1.0 bit)
    QuantSpec(group_size=64),  # +0.5 bit
    QuantSpec(group_size=128, zero="code"),  # fp16 scale + integer zero (+(16+b)/128 bit)
    QuantSpec(kind="symmetric", group_size=32),  # one fp16 scale (+0.5 bit)
]
BITS = (1, 2, 3, 4, 5, 6, 8)


def synthetic_curves(seed: int = 0, layers: int = 36, kv_heads: int = 8, head_dim: int = 128) -> Curves:
    rng = np.random.default_rng(seed)
    Q, NB = len(QUANTIZERS), len(BITS)
    alpha = rng.lognormal(0.0, 1.5, (layers, kv_heads, 2, 1, 1)) * np.array([3.0, 1.0])[None, None, :, None, None]
    quality = np.array([1.0, 1.3, 1.6, 1.1])[None, None, None, :, None]  # coarser groups err more
    beta = rng.uniform(3.6, 5.3, (1, 1, 1, Q, 1))
    noise = np.exp(rng.normal(0.0, 0.25, (layers, kv_heads, 2, Q, NB)))
    d = alpha * quality * beta ** (-np.array(BITS, dtype=np.float64)) * noise
    counts = np.full((layers, kv_heads, 2), 2048.0 * head_dim)
    fp = ModelFingerprint("qwen3-8b-synthetic", "qwen3", layers, kv_heads, head_dim)
    return Curves(torch.tensor(d), BITS, QUANTIZERS, torch.tensor(counts), "synthetic", fp, {"data": "synthetic"})


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    curves = synthetic_curves()
    L, H = curves.model.num_layers, curves.model.num_kv_heads
    lo, hi = rateq.budget_range(curves.quantizers, curves.bits)
    print(f"problem: {L} layers × {H} KV heads × K/V = {L * H * 2} units, {len(QUANTIZERS)} quantizers × "
          f"{len(BITS)} widths = {len(QUANTIZERS) * len(BITS)} candidates per unit; budgets {lo:.3f}..{hi:.3f}")
    print(f"budget {args.budget} effective bits per element; best of {args.repeats} runs\n")

    rows = {}
    for method in ("exact", "greedy", "waterfill"):
        sec, plan = best_of(lambda: rateq.solve(curves, args.budget, method=method), args.repeats)
        rows[method] = (sec, plan)
    # The same exact problem handed to HiGHS's branch and bound instead of the Pareto DP.
    rows["exact/milp"] = best_of(lambda: rateq.solve(curves, args.budget, method="exact", backend="milp"), 1)
    t_exact, exact = rows["exact"]
    d_exact = exact.solver["predicted_distortion"]
    print(f"{'method':<10} {'seconds':>9} {'vs exact':>9} {'distortion':>12} {'/ exact':>8} {'eff bits':>9} "
          f"{'nominal':>8} {'K/V bits':>10}")
    for method, (sec, plan) in rows.items():
        d = plan.solver["predicted_distortion"]
        print(f"{method:<10} {sec:>9.4f} {sec / t_exact:>8.3f}× {d:>12.5g} {d / d_exact:>8.4f} "
              f"{plan.effective_bits:>9.4f} {plan.nominal_bits:>8.3f} "
              f"{plan.mean_bits('k'):>4.2f}/{plan.mean_bits('v'):<4.2f}")
    e, m = exact.solver, rows["exact/milp"][1].solver
    print(f"\nexact: {e['backend']}, {e['status']}; Lagrangian bound {e['lower_bound']:.6g}; core "
          f"{e['core_candidates']} of {e['candidates']} candidates, {e['free_groups']} units still free, "
          f"at most {e['peak_states']} partial plans")
    print(f"exact/milp: {m['backend']}, {m['status']}, gap {m['gap']:.1e}, {m['variables']} variables, "
          f"{m['nodes']} nodes")
    g = rows["greedy"][1].solver
    print(f"greedy: LP lower bound {g['lower_bound']:.6g}, a-priori bound {g['bound']:.3g} "
          f"(largest hull step {g['max_hull_step']:.3g}), gap to LP {g['gap']:.3g}")
    w = rows["waterfill"][1].solver
    print("waterfill: median fitted β " + ", ".join(f"{k} {v:.2f}" for k, v in w["median_beta"].items())
          + f"; log-fit RMSE {w['fit_log_rmse']:.3f}")

    # Uniform baselines at the same budget: the best single (quantizer, bits) whose cost fits.
    cost = curves.cost()
    mono = curves.monotone().distortion
    best = None
    for qi, q in enumerate(curves.quantizers):
        for bi, b in enumerate(curves.bits):
            if cost[qi, bi] <= args.budget + 1e-12:
                d = float(mono[..., qi, bi].sum())
                if best is None or d < best[0]:
                    best = (d, f"uniform {q.id} {b}-bit ({float(cost[qi, bi]):.3f} eff bits)")
    if best:
        print(f"best uniform plan within budget: {best[1]}: distortion {best[0]:.5g} = "
              f"{best[0] / d_exact:.2f}× exact")

    budgets = np.linspace(lo, hi, 100)
    sec_sweep, front = best_of(lambda: rateq.frontier(curves, budgets, method="greedy"), args.repeats)
    print(f"\nfrontier, 100 budgets {lo:.3f}..{hi:.3f}, greedy: {sec_sweep:.4f} s "
          f"({sec_sweep / t_exact:.2f}× one exact solve)")
    sec_ex10, front_ex = best_of(lambda: rateq.frontier(curves, budgets[::10], method="exact"), 1)
    worst = max(fg["distortion"] / fe["distortion"] for fg, fe in zip(front[::10], front_ex))
    print(f"frontier, 10 of those budgets, exact: {sec_ex10:.3f} s; greedy/exact distortion at most {worst:.5f}")
    print(f"\ntargets: exact < 1 s: {t_exact:.3f} s {'ok' if t_exact < 1 else 'MISSED'}; "
          f"greedy < 50 ms: {rows['greedy'][0] * 1e3:.1f} ms {'ok' if rows['greedy'][0] < 0.05 else 'MISSED'}; "
          f"100-point sweep < 2 s: {sec_sweep:.3f} s {'ok' if sec_sweep < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
