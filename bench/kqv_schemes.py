"""KV vs KQV vs QKQV on the default model at n total bits per element: MSE-optimal Lloyd–Max codebooks against
TurboQuant-prod (Lloyd–Max at n − 1 bits + a 1-bit QJL sketch of the residual) on values, or on keys and values.

    python bench/kqv_schemes.py                          # 2 x 512 tokens of Pride and Prejudice, n = 2..6
    python bench/kqv_schemes.py --windows 4 --seq-len 1024 --no-kivi

Schemes (TurboQuant family, Walsh–Hadamard rotation with random signs, one fp16 norm per head vector):
- KV:   Lloyd–Max (MSE) on keys and on values, n bits each;
- KQV:  Lloyd–Max on keys; Lloyd–Max at n − 1 bits + 1-bit QJL sketch of the residual on values;
- QKQV: Lloyd–Max at n − 1 bits + QJL on both.
Each is a uniform `rateq.Plan` with independent K and V quantizers, run through the one-pass fake-quant
evaluation (`rateq.simulate` with `rateq.plan_transform`, as `simulate_plan` does, plus a recorder of the stored
keys' error). Reported per row: effective bits (codes + norms), KL(fp ‖ quantized) of next-token distributions
per token, perplexity, and the relative MSE Σ‖K − K̂‖² / Σ‖K‖² of the stored keys (likewise values) over all
layers. The ratio column is the row's KL over KV's at the same n. KIVI (min-max g32, fp16 scale + zero) at the
same code bits is printed for scale. QJL's reconstruction is unbiased for inner products but not an MSE
reconstruction, so its key error is expected to be larger; the question is what softmax does with that (an
unbiased but noisier attention score against a biased but closer one).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import rateq
from rateq import CachePolicy, Plan, QuantSpec
from rateq.evaluate.metrics import TokenStats


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ErrorRecorder:
    """Wraps a KV transform and sums ‖x − x̂‖² and ‖x‖² per role over every layer it stores."""

    def __init__(self, transform):
        self.transform = transform
        self.err = {"k": 0.0, "v": 0.0}
        self.ref = {"k": 0.0, "v": 0.0}

    def __call__(self, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        out = self.transform(layer, role, x)
        self.err[role] += float((out.float() - x.float()).pow(2).sum())
        self.ref[role] += float(x.float().pow(2).sum())
        return out

    def rel_mse(self, role: str) -> float:
        return self.err[role] / max(self.ref[role], 1e-30)


def run(model, ids: torch.Tensor, plan: Plan, policy: CachePolicy, ref_logprobs: torch.Tensor):
    rec = ErrorRecorder(rateq.plan_transform(plan, policy))
    stats = TokenStats()
    with torch.no_grad(), rateq.simulate(model, rec, policy):
        logits = model(ids, use_cache=False).logits
    stats.add(logits, ids[:, 1:], ref_logprobs)
    return stats, rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=rateq.DEFAULT_MODEL)
    ap.add_argument("--text", default="austen-pp")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--char-start", type=int, default=100_000)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--scale-dtype", default="fp16")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rotation signs and of the QJL matrix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-kivi", action="store_true", help="skip the KIVI rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = rateq.load_model(args.model)
    fp = rateq.fingerprint(model)
    ids = rateq.text_windows(tok, args.text, args.windows, args.seq_len, seed=None, char_start=args.char_start)
    D = fp.head_dim
    mse = QuantSpec("lloydmax", D, scale_dtype=args.scale_dtype, rotation="rhadamard", seed=args.seed)
    prod = QuantSpec("lloydmax", D, scale_dtype=args.scale_dtype, rotation="rhadamard", qjl=True, seed=args.seed)
    schemes = {"KV": (mse, mse), "KQV": (mse, prod), "QKQV": (prod, prod)}
    if not args.no_kivi:
        schemes["KIVI"] = (QuantSpec(), QuantSpec())
    policy = CachePolicy()  # R = 0, no sinks: every position stored quantized (the papers' protocol)

    with torch.no_grad():
        ref_logits = model(ids, use_cache=False).logits
    ref_logprobs = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    fp_stats = TokenStats()
    fp_stats.add(ref_logits, ids[:, 1:], None)
    log(f"{args.model}: {ids.shape[0]} x {ids.shape[1]} tokens of {args.text}, fp PPL {fp_stats.ppl:.2f} "
        f"({time.perf_counter() - t0:.0f} s)")

    L, H = fp.num_layers, fp.num_kv_heads
    rows = []
    for n in args.bits:
        kl_kv = None
        for name, (kspec, vspec) in schemes.items():
            quantizers = [kspec] if kspec == vspec else [kspec, vspec]
            vq = 0 if kspec == vspec else 1
            plan = Plan(torch.full((L, H), n), torch.full((L, H), n), torch.zeros(L, H, dtype=torch.long),
                        torch.full((L, H), vq), quantizers, fp, policy=policy)
            t = time.perf_counter()
            stats, rec = run(model, ids, plan, policy, ref_logprobs)
            if name == "KV":
                kl_kv = stats.kl
            rows.append(dict(n=n, scheme=name, k=kspec.id, v=vspec.id, eff=plan.effective_bits, kl=stats.kl,
                             ratio=stats.kl / kl_kv if kl_kv else float("nan"), ppl=stats.ppl,
                             kerr=rec.rel_mse("k"), verr=rec.rel_mse("v")))
            log(f"  n={n} {name}: KL {stats.kl:.4f} PPL {stats.ppl:.2f} key rel. MSE {rec.rel_mse('k'):.4f} "
                f"({time.perf_counter() - t:.0f} s)")

    print(f"{args.model}, {ids.shape[0]} x {ids.shape[1]} tokens of {args.text} from character {args.char_start}; "
          f"fp PPL {fp_stats.ppl:.3f}; residual window 0, no sinks; K = Lloyd–Max g{D} ({args.scale_dtype} norm), "
          f"Q = Lloyd–Max (n−1 bits) + 1-bit QJL, rotation: Walsh–Hadamard with random signs (seed {args.seed})\n")
    print("| n | scheme | effective bits | KL (nats/token) | KL / KL(KV) | PPL | key rel. MSE | value rel. MSE |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['scheme']} | {r['eff']:.3f} | {r['kl']:.4f} | {r['ratio']:.2f} | {r['ppl']:.2f} | "
              f"{r['kerr']:.4f} | {r['verr']:.4f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
