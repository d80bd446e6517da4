"""Evaluate a rateq plan against KIVI and other baselines at the same effective bits, and print the table.

    python examples/compare_baselines.py                               # the shipped 2.5-bit profile of smollm2-135m
    python examples/compare_baselines.py --profile smol-3.0.safetensors --baselines fp,kivi,splits
    python examples/compare_baselines.py --profile none --budget 3.0   # calibrate and solve here first

Every row runs through the same one-pass fake-quant evaluation (perplexity, KL to full precision) on the same
windows, and each baseline is built at the plan's budget in effective bits (code bits plus scales and
zero-points), so the comparison is at matched storage. Each row is one pass over every window: at the defaults
(4 x 1024 tokens, 8 rows) that takes many minutes on two CPU cores; `--windows 1 --seq-len 256` is a quick look.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import rateq
from rateq.evaluate import to_markdown

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "smollm2-135m-b2.5.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=rateq.DEFAULT_MODEL, help="alias, hub id or local folder (default %(default)s)")
    p.add_argument("--profile", default=str(SHIPPED),
                   help="profile to evaluate; 'none': calibrate on --calib and solve at --budget here")
    p.add_argument("--budget", type=float,
                   help="effective bits to match the baselines at (default: the profile's budget; 2.5 with "
                        "--profile none, where the plan is solved at it)")
    p.add_argument("--baselines", default="fp,kivi,splits,waterfill",
                   help="comma-separated baseline names (rateq.evaluate.baselines; default %(default)s)")
    p.add_argument("--data", default=rateq.DEFAULT_EVAL_TEXT, help="evaluation text (default %(default)s)")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default %(default)s)")
    p.add_argument("--char-start", type=int, default=100_000, help="first character of the windows")
    p.add_argument("--calib", default=rateq.DEFAULT_CALIBRATION_TEXT, help="calibration text (default %(default)s)")
    p.add_argument("--n-samples", type=int, default=2, help="calibration windows (default %(default)s)")
    p.add_argument("--quantizers", help="comma-separated candidate quantizer ids for --profile none")
    p.add_argument("--bits", help="comma-separated candidate code widths for --profile none")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tok = rateq.load_model(args.model)

    if args.profile == "none":
        # Calibrate and solve here (what `rateq calibrate --budget B` does).
        kwargs = {}
        if args.quantizers:
            kwargs["quantizers"] = args.quantizers.split(",")
        if args.bits:
            kwargs["bits"] = [int(b) for b in args.bits.split(",")]
        curves = rateq.calibrate(model, tok, args.calib, n_samples=args.n_samples, seq_len=args.seq_len, **kwargs)
        plan = rateq.solve(curves, budget=args.budget or 2.5)
    else:
        # A saved profile, checked against the model. Its curves (kept beside it as P.curves.safetensors by
        # `rateq calibrate`) serve the `waterfill` baseline; without them it calibrates on --calib.
        plan = rateq.load_profile(args.profile, model)
        beside = Path(args.profile).with_name(Path(args.profile).name.removesuffix(".safetensors") + ".curves.safetensors")
        curves = rateq.Curves.load(beside) if beside.exists() else rateq.load_profile_curves(args.profile)
    budget = args.budget or plan.budget_bits or round(plan.effective_bits, 3)
    print(f"plan: {plan.describe()}; baselines at {budget:g} effective bits")

    # Names without "@B" are built at every budget in `budgets`: `kivi` becomes uniform min-max at the group
    # size that costs exactly B bits, `splits` every fixed K/V split that does, `waterfill` RateQuant-style
    # reverse waterfilling on the same curves.
    methods = [plan] + args.baselines.split(",")
    res = rateq.evaluate(model, args.data, methods, tokenizer=tok, budgets=[budget], n_windows=args.windows,
                         seq_len=args.seq_len, char_start=args.char_start, calibration=args.calib, curves=curves)
    print(to_markdown(res))


if __name__ == "__main__":
    main()
