"""Load stored distortion curves, re-solve them at several budgets, print the frontier, export one plan as JSON.

    python examples/resolve_and_export.py                          # the shipped smollm2-135m curves
    python examples/resolve_and_export.py --curves smol-2.5.curves.safetensors --budgets 2 2.5 3 4 --export 3.0

No model is needed: the curves (written beside every profile by `rateq calibrate`, or by
calibrate_and_generate.py) hold each unit's measured distortion at every candidate quantizer and bit width,
so any budget in their feasible range solves in milliseconds to seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import rateq

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "smollm2-135m-b2.5.curves.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--curves", default=str(SHIPPED), help="a .curves.safetensors file (default: the shipped one)")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0, 5.0],
                   help="effective-bit budgets of the frontier (default %(default)s)")
    p.add_argument("--method", default="exact", choices=["exact", "greedy", "waterfill"],
                   help="solver for the frontier and the exported plan (default %(default)s)")
    p.add_argument("--export", type=float, default=2.5, help="budget of the plan to export (default %(default)s)")
    p.add_argument("--out", default="plan.json", help="JSON file to write, '-' for stdout (default %(default)s)")
    p.add_argument("--profile", help="also save the exported plan as a profile (.safetensors) here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    curves = rateq.Curves.load(args.curves)
    lo, hi = rateq.budget_range(curves.quantizers, curves.bits)
    print(f"{curves.model.name}: curves ({curves.metric}) for {len(curves.quantizers)} quantizers x bits "
          f"{list(curves.bits)}; candidates cost {lo:g}-{hi:g} effective bits per element")

    # The frontier: predicted distortion and mean code bits per budget (infeasible budgets say so).
    print(f"{'budget':>7} {'effective':>9} {'nominal':>8} {'K bits':>6} {'V bits':>6} {'distortion':>12}")
    for row in rateq.frontier(curves, args.budgets, method=args.method):
        if not row["feasible"]:
            print(f"{row['budget']:7.2f}  infeasible")
            continue
        print(f"{row['budget']:7.2f} {row['effective_bits']:9.3f} {row['nominal_bits']:8.3f} {row['k_bits']:6.2f} "
              f"{row['v_bits']:6.2f} {row['distortion']:12.5g}")

    # One plan, exported as JSON: per layer, each KV head's K and V bits and quantizer id.
    plan = rateq.solve(curves, budget=args.export, method=args.method)
    print(f"exported: {plan.describe()}")
    text = json.dumps(rateq.plan_to_json(plan), indent=1)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
        print(f"plan JSON written to {args.out}")
    if args.profile:
        rateq.save_profile(plan, args.profile)
        print(f"profile written to {args.profile}")


if __name__ == "__main__":
    main()
