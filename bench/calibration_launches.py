"""Kernel launches and device read-backs of calibration per layer and sequence on the CUDA path, counted on any machine.

On a GPU, calibration costs the launches of its tensor operations (each a kernel and some microseconds of host time)
and the waits where the host reads a value back (the GPU's queue drains) as much as its math. This counts both with
a TorchDispatchMode over one calibration of a stand-in for the alias's attention (its query and KV heads and head_dim,
`--layers` layers, a narrow MLP, random weights), run on the CPU with the CUDA settings (`scoring_defaults("cuda")`:
its chunking of query rows and bf16 candidate matmuls; the fused key kernel's host code runs and its launches are
recorded instead of made, each counted as one operation), against one plain forward + backward over the same tokens
in the same process. Printed: operations per layer and sequence (views, which launch nothing, left out), their ratio
to the plain pass's, the read-backs (`item`, `nonzero`, a tensor's truth value) and where they come from.

    python bench/calibration_launches.py                                # qwen3-8b's attention, 1 × 512 tokens
    python bench/calibration_launches.py --model llama-3.1-70b --metric output

The counts are those of 2048 tokens from 512 on: the sampled query rows are cut into 4 chunks either way (the CPU's
bf16 matmuls make 2048 tokens take minutes here). Not seen by the count: `.cpu()` of a device tensor, which
calibration does for the attention mask once per forward and for the curves at the end. Sizes other than the
attention's do not change the counts.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rateq
from rateq.calibrate import DEFAULT_QUANTIZERS, METRICS, calibrate_metrics, scoring_defaults, triton_scores
from rateq.errors import RateQError
from rateq.models import head_dim_of, known_models

READ_BACKS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.item.default"}


class Count(TorchDispatchMode):
    """Counts the operations dispatched while active (views apart) and where each read-back comes from."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.read_backs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in READ_BACKS:
            frames = [f for f in traceback.extract_stack() if "/rateq/" in f.filename]
            where = f"{frames[-1].filename.split('/rateq/')[-1]}:{frames[-1].lineno}" if frames else "outside rateq"
            self.read_backs[f"{name.split('.')[1]} at {where}"] += 1
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def record_kernel_launches(count: Count) -> None:
    """The fused key kernel as on CUDA: taken wherever a CUDA device would take it, its launches counted, not made."""
    runs, kernel = triton_scores.runs, triton_scores._kernel

    class Launches:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                count.ops += 1
            return launch

    triton_scores.runs = lambda inp, matmul_dtype, device: runs(inp, matmul_dtype, "cuda")
    triton_scores._kernel = lambda: (kernel(), Launches())[1]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-8b", help="an alias with a built-in config (rateq models)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--metric", default="fisher", help=f"one of {', '.join(METRICS)}")
    ap.add_argument("--query-stride", type=int, default=None, help="score every N-th query row (default rateq's)")
    args = ap.parse_args()
    if args.metric not in METRICS:
        fail(f"unknown metric {args.metric!r}; use one of {', '.join(METRICS)}")
    if args.layers < 1 or args.seq_len < 256 or (args.query_stride is not None and args.query_stride < 1):
        fail("--layers and --query-stride must be at least 1, --seq-len at least 256")
    torch.set_num_threads(2)
    if not triton_scores.available():
        print("Triton is not importable here: keys are counted on the torch path, not the fused kernel's")

    try:
        model = rateq.models.random_model(args.model, dtype="fp32", device="cpu", num_hidden_layers=args.layers,
                                          hidden_size=256, intermediate_size=256, vocab_size=512)
    except RateQError as e:
        fail(str(e))
    cfg = model.config
    ids = torch.randint(0, 512, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    cuda = scoring_defaults("cuda")
    # Score as on a GPU (the module, not the function `rateq.calibrate` that shadows its name).
    importlib.import_module("rateq.calibrate").scoring_defaults = lambda device_type: cuda
    count = Count()
    record_kernel_launches(count)
    kwargs = dict(metrics=(args.metric,), quantizers=DEFAULT_QUANTIZERS, query_stride=args.query_stride)
    calibrate_metrics(model, None, ids[:, :256], **kwargs)  # first-call work (tables, caches) outside the count

    backward = args.metric == "fisher"
    plain = Count()
    with plain:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            logits = model(inputs_embeds=emb, use_cache=False).logits
            if backward:
                torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").backward()
    t0 = time.perf_counter()
    with count:
        calibrate_metrics(model, None, ids, **kwargs)
    seconds = time.perf_counter() - t0

    L = args.layers
    extra = (count.ops - plain.ops) / L
    what = "forward+backward" if backward else "forward"
    print(f"{args.model} attention ({cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, head_dim "
          f"{head_dim_of(cfg)}), {L} layers, 1 x {args.seq_len} tokens, {args.metric}, "
          f"{len(DEFAULT_QUANTIZERS)} default quantizers, CUDA settings (counted in {seconds:.1f} s on the CPU)")
    print(f"operations per layer and sequence: plain {what} {plain.ops / L:.0f} | calibration {count.ops / L:.0f} "
          f"({extra:.0f} for the candidates) | ratio {count.ops / plain.ops:.2f}x")
    total = sum(count.read_backs.values())
    print(f"read-backs in the whole calibration ({L} layers, 1 sequence): {total}")
    for where, n in count.read_backs.most_common():
        print(f"  {n:6d}  {where}")


if __name__ == "__main__":
    main()
