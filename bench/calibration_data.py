"""What calibration data, query sampling and learned codebooks do to plans, on text the calibration never saw.

For each calibration setting (text, windows, query stride, candidates) in one process: calibrate smollm2-135m,
solve at each budget, and evaluate the plans with one-pass perplexity on each evaluation text (4 × 1024 tokens from
character 100000, R = 0: the README's Results protocol), beside full precision and KIVI-2 at the same effective
bits. Prints the calibration seconds, every PPL, and the share of KIVI's excess perplexity each plan removes,
1 − (PPL − fp) / (PPL_KIVI − fp).

    python bench/calibration_data.py                                     # Emma vs mix, default candidates
    python bench/calibration_data.py --settings emma:2:1,emma:2:4,emma:2:8 --budgets 2.5   # query strides
    python bench/calibration_data.py --settings mix:4:4+codebooks --budgets 2.5,2,1         # learned codebooks

A setting is TEXT:WINDOWS:STRIDE, then `+ID` for each candidate added to the default set (`+codebooks`:
`codebook-g2-prerope` and `codebook-g2`); `emma` names `austen-emma`.
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

import rateq
from rateq.calibrate import DEFAULT_QUANTIZERS, calibrate
from rateq.evaluate import Method

CODEBOOKS = ("codebook-g2-prerope", "codebook-g2")


def parse_setting(text: str) -> tuple[str, str, int, int, list[str]]:
    spec, *extra = text.split("+")
    name, n, stride = spec.split(":")
    added = [q for x in extra for q in (CODEBOOKS if x == "codebooks" else [x])]
    for q in added:
        rateq.parse_spec(q)  # a clear error for a mistyped id, before any work
    quantizers = list(dict.fromkeys([*DEFAULT_QUANTIZERS, *added]))
    return text, {"emma": "austen-emma"}.get(name, name), int(n), int(stride), quantizers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="emma:2:4,mix:4:4", help="comma-separated TEXT:WINDOWS:STRIDE[+codebooks]")
    ap.add_argument("--budgets", default="2.5", help="comma-separated effective bits")
    ap.add_argument("--eval", default="austen-pp,jargon", help="comma-separated evaluation texts")
    ap.add_argument("--kivi", default="2.5,3", help="KIVI-2 rows at these effective bits (2.5: groups of 64, 3: of 32)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [parse_setting(s) for s in args.settings.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    model, tok = rateq.load_model("smollm2-135m")

    methods, facts, first = [], [], None
    for label, text, n, stride, quantizers in settings:
        t0 = time.perf_counter()
        curves = calibrate(model, tok, text, n_samples=n, seq_len=1024, quantizers=quantizers, query_stride=stride)
        seconds = time.perf_counter() - t0
        learned = curves.calibration.get("learned")
        if first is None:
            first = (label, curves)
        elif first[1].distortion.shape == curves.distortion.shape:  # the same candidates: how alike they rank
            a, b = first[1].distortion.flatten(), curves.distortion.flatten()
            ok = a.isfinite() & b.isfinite()
            rho = spearmanr(a[ok].numpy(), b[ok].numpy()).correlation
            facts.append(f"  {label}: curves rank like {first[0]}'s with Spearman {rho:.4f}")
        facts.append(f"{label}: {n} x 1024 tokens of {text}, query stride {stride}, {len(quantizers)} candidates, "
                     f"calibrated in {seconds:.1f} s" + (f" (learned on {learned['tokens']} {learned['windows']} "
                                                          "tokens)" if learned else ""))
        for b in budgets:
            try:
                plan = rateq.solve(curves, b)
            except rateq.RateQError as exc:  # e.g. below the cheapest candidate's bits
                facts.append(f"  {label}@{b:g}: {exc}")
                continue
            methods.append(Method.from_plan(plan, f"{label}@{b:g}", budget=b))
            learned_bytes = plan.learned_nbytes()
            if learned_bytes:
                facts.append(f"  {label}@{b:g}: learned parameters {learned_bytes / 1024:.0f} KiB, "
                             f"{plan.learned_share():.2%} of the model's fp16 weights")
    for line in facts:
        print(line)
    kivi = [f"kivi@{float(b):g}" for b in args.kivi.split(",")]
    for data in args.eval.split(","):
        ev = rateq.evaluate(model, data, methods + kivi, tokenizer=tok, flips=False)
        fp = ev["fp"]["ppl"]
        print(f"\n{data}: full precision {fp:.3f}")
        for row in ev.rows[1:]:
            b = row["effective_bits"]
            ref = ev[f"kivi@{b:g}"]["ppl"] if f"kivi@{b:g}" in kivi else None
            removed = "" if ref is None or row["name"].startswith("kivi") else \
                f"  KIVI excess removed {1 - (row['ppl'] - fp) / (ref - fp):.1%}"
            print(f"  {row['name']:28s} {row['effective_bits']:5.2f} bits  PPL {row['ppl']:8.3f}{removed}")


if __name__ == "__main__":
    main()
