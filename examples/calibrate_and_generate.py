"""Calibrate a model on bundled text, solve a per-head K/V bit plan at a budget, save it, generate through it.

    python examples/calibrate_and_generate.py                  # smollm2-135m, mix 4 x 1024 tokens, 2.5 bits
    python examples/calibrate_and_generate.py --budget 3.0 --out smol-3.0.safetensors --max-new-tokens 64

Calibration is the slow step: at the defaults about 70 s on two otherwise idle CPU cores (after a one-time
conversion of the bundled model, about 20 s). The curves it writes beside the profile can be re-solved at other
budgets without the model (resolve_and_export.py); the profile runs with `rateq apply` too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rateq
from rateq.calibrate import default_quantizers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=rateq.DEFAULT_MODEL, help="alias, hub id or local folder (default %(default)s)")
    p.add_argument("--calib", default=rateq.DEFAULT_CALIBRATION_TEXT,
                   help="calibration text: bundled name or a .txt / .jsonl file (default %(default)s)")
    p.add_argument("--n-samples", type=int, default=4, help="calibration windows (default %(default)s: one of each part of mix)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration window (default %(default)s)")
    p.add_argument("--quantizers", help="comma-separated candidate quantizer ids (default: rateq's candidates for "
                   "the budget; below 2.5 bits they include learned codebooks)")
    p.add_argument("--bits", help="comma-separated candidate code widths (default: 1-6,8)")
    p.add_argument("--budget", type=float, default=2.5, help="effective bits per cached element (default %(default)s)")
    p.add_argument("--out", default="plan.safetensors", help="profile to write; curves go beside it (default %(default)s)")
    p.add_argument("--context", default=rateq.DEFAULT_EVAL_TEXT,
                   help="text whose passage precedes the prompt, so that the cache fills several key blocks")
    p.add_argument("--context-start", type=int, default=100_000, help="first character of the passage")
    p.add_argument("--context-chars", type=int, default=2000, help="characters of --context to use (0: none)")
    p.add_argument("--prompt", default="It is a truth universally acknowledged")
    p.add_argument("--max-new-tokens", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tok = rateq.load_model(args.model)

    # 1. Calibrate: one pass over the text measures, for every (layer, KV head, K or V), quantizer and bit width,
    #    the distortion the model sees.
    #    The candidates follow the budget as `rateq calibrate` chooses them: below 2.5 bits, learned codebooks too.
    kwargs = {"quantizers": args.quantizers.split(",") if args.quantizers else default_quantizers(args.budget)}
    if args.bits:
        kwargs["bits"] = [int(b) for b in args.bits.split(",")]
    curves = rateq.calibrate(model, tok, args.calib, n_samples=args.n_samples, seq_len=args.seq_len, **kwargs)

    # 2. Solve: the plan of least predicted distortion at the budget (effective bits: codes + scales + zeros).
    plan = rateq.solve(curves, budget=args.budget)
    print(plan.describe())

    # 3. Save the profile, and the curves beside it (P.curves.safetensors, as `rateq calibrate` does) so that
    #    other budgets can be solved later without the model.
    out = Path(args.out)
    curves_out = out.with_name(out.name.removesuffix(".safetensors") + ".curves.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    curves.save(curves_out)
    rateq.save_profile(plan, out)
    print(f"profile written to {out}, curves to {curves_out}")

    # 4. Generate through the plan's packed cache. Keys are stored in blocks (plan.policy.block tokens); the
    #    tokens of a block not yet full stay in full precision, so a short prompt saves nothing.
    context = rateq.load_text(args.context)[args.context_start:args.context_start + args.context_chars]
    inputs = tok(context + ("\n\n" if context else "") + args.prompt, return_tensors="pt")
    cache = rateq.RateQCache(plan, model)  # given the model, the cache takes its RoPE tables
    with torch.no_grad():
        ids = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    new = ids[0, inputs["input_ids"].shape[1]:]
    print(f"continuation: {tok.decode(new, skip_special_tokens=True)!r}")

    # Bytes the cache really holds (packed codes + scales + full-precision tail) against a DynamicCache of the
    # same tokens in fp16 and in the model's own dtype (fp32 on the CPU).
    held = cache.nbytes()
    dense = {str(dt).removeprefix("torch."): cache.dense_nbytes(dt) for dt in (torch.float16, model.dtype)}
    print(f"cache: {cache.get_seq_length()} tokens, {held} bytes held (key block {plan.policy.block} tokens); "
          + ", ".join(f"{n} bytes as {name} ({held / n:.3f}x)" for name, n in dense.items()))


if __name__ == "__main__":
    main()
