"""Kernel launches and device read-backs on the CUDA path, counted on any machine: calibration per layer and
sequence, decode per layer and step.

On a GPU the host's part of a step costs as much as its math: each tensor operation is a kernel launch (some
microseconds of host time) and each value read back to the host waits for every queued kernel. Both are counted with
a TorchDispatchMode, on a stand-in for the alias's attention (its query and KV heads and head_dim, `--layers` layers,
a narrow MLP, random weights) run on the CPU as CUDA would run it: Triton's kernels (the fused key-candidate kernel,
the decode kernels) take what they take on CUDA, their host code runs and each launch is counted as one operation,
not made. Views, which launch nothing, are left out.

- calibration (`calibrate_metrics` with `scoring_defaults("cuda")`: 4 chunks of query rows, bf16 candidate matmuls,
  the default candidates and metric) against one plain forward + backward over the same tokens;
- decode (one step at `--context` tokens) of RateQCache holding the shipped 2.5-bit profile's mix of quantizers
  drawn over the model (as `bench/decode_speed.py` does), packed, against DynamicCache.

    python bench/launches.py                                  # qwen3-8b's attention, 1 × 512 tokens
    python bench/launches.py --model llama-3.1-70b --metric output --stage calibrate

Calibration's counts are those of 2048 tokens from 512 on: the sampled query rows are cut into 4 chunks either way
(the CPU's bf16 matmuls make 2048 tokens take minutes here). Not seen by the count: `.cpu()` of a device tensor
(calibration's mask, once per forward, and its curves, at the end) and copies from the host.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import rateq
from rateq.calibrate import DEFAULT_QUANTIZERS, METRICS, calibrate_metrics, scoring_defaults, triton_scores
from rateq.errors import RateQError
from rateq.models import head_dim_of
from rateq.runtime import store
from rateq.runtime.kernels import triton_decode

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import profile_mix  # noqa: E402

PROFILE = Path(__file__).parents[1] / "profiles" / "smollm2-135m-b2.5.safetensors"
READ_BACKS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.item.default"}


class Count(TorchDispatchMode):
    """Counts the operations dispatched while active (views apart), the kernel launches recorded meanwhile, and
    where each read-back comes from."""

    active = None

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.read_backs = collections.Counter()

    def __enter__(self):
        Count.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        Count.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in READ_BACKS:
            frames = [f for f in traceback.extract_stack() if "/rateq/" in f.filename]
            where = f"{frames[-1].filename.split('/rateq/')[-1]}:{frames[-1].lineno}" if frames else "outside rateq"
            self.read_backs[f"{name.split('.')[1]} at {where}"] += 1
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


class Launches:
    """Stands in for a jitted Triton kernel: `kernel[grid](...)` counts one operation of the active count."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if Count.active is not None:
                Count.active.ops += 1
        return launch


def as_on_cuda() -> None:
    """Triton's kernels take on the CPU what they take on CUDA (where Triton imports); their launches are counted,
    not made. Calibration scores with CUDA's settings."""
    cuda = scoring_defaults("cuda")
    # calibrate_metrics reads its settings from its module (`rateq.calibrate`, not the function of that name)
    importlib.import_module("rateq.calibrate").scoring_defaults = lambda device_type: cuda
    if not triton_scores.available():
        return
    runs, kernel = triton_scores.runs, triton_scores._kernel
    triton_scores.runs = lambda inp, matmul_dtype, device: runs(inp, matmul_dtype, "cuda")
    triton_scores._kernel = lambda: (kernel(), Launches())[1]
    triton_decode._kernels()  # defines the kernels' module globals, as a launch would
    triton_decode._kernels = lambda: (Launches(), Launches())
    decode_runs = triton_decode.runs

    def kernel_or_torch(bucket, fn, x, out):  # RoleStore._kernel's CUDA branch
        if bucket.length == 0 or x.stride(-1) != 1 or out.stride(-1) != 1 or not decode_runs(bucket, "cuda"):
            return False
        getattr(triton_decode, fn)(bucket, x, out)
        return True

    store.RoleStore._kernel = staticmethod(kernel_or_torch)


def print_read_backs(count: Count, what: str) -> None:
    total = sum(count.read_backs.values())
    print(f"read-backs in {what}: {total}")
    for where, n in count.read_backs.most_common():
        print(f"  {n:6d}  {where}")


def calibration(model, args) -> None:
    L = args.layers
    ids = torch.randint(0, 512, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
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
    count = Count()
    t0 = time.perf_counter()
    with count:
        calibrate_metrics(model, None, ids, **kwargs)
    what = "forward+backward" if backward else "forward"
    print(f"calibration, 1 x {args.seq_len} tokens, {args.metric}, {len(DEFAULT_QUANTIZERS)} default quantizers "
          f"(counted in {time.perf_counter() - t0:.1f} s)")
    print(f"operations per layer and sequence: plain {what} {plain.ops / L:.0f} | calibration {count.ops / L:.0f} "
          f"({(count.ops - plain.ops) / L:.0f} for the candidates) | ratio {count.ops / plain.ops:.2f}x")
    print_read_backs(count, f"the whole calibration ({L} layers, 1 sequence)")


@torch.no_grad()
def decode(model, args) -> None:
    L, n = args.layers, args.context
    plan = profile_mix(rateq.load_profile(PROFILE), rateq.fingerprint(model))
    ids = torch.randint(0, 512, (1, n + 2), generator=torch.Generator().manual_seed(0))
    counts = {}
    for name, make in (("DynamicCache", lambda: DynamicCache(config=model.config)),
                       ("RateQCache packed", lambda: rateq.RateQCache(plan, model, packed=True))):
        cache = make()
        model(ids[:, :n], past_key_values=cache, use_cache=True)
        model(ids[:, n:n + 1], past_key_values=cache, position_ids=torch.tensor([[n]]), use_cache=True)  # warm
        counts[name] = count = Count()
        with count:
            model(ids[:, n + 1:], past_key_values=cache, position_ids=torch.tensor([[n + 1]]), use_cache=True)
    dyn, rq = counts["DynamicCache"], counts["RateQCache packed"]
    print(f"decode, one step at {n} tokens of context, the shipped profile's mix ({plan.effective_bits:.2f} bits)")
    print(f"operations per layer and step: DynamicCache {dyn.ops / L:.1f} | RateQCache packed {rq.ops / L:.1f} | "
          f"ratio {rq.ops / dyn.ops:.2f}x")
    print_read_backs(rq, f"a step of RateQCache ({L} layers)")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-8b", help="an alias with a built-in config (rateq models)")
    ap.add_argument("--stage", default="both", choices=("calibrate", "decode", "both"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512, help="calibration tokens")
    ap.add_argument("--metric", default="fisher", help=f"calibration metric: one of {', '.join(METRICS)}")
    ap.add_argument("--query-stride", type=int, default=None, help="score every N-th query row (default rateq's)")
    ap.add_argument("--context", type=int, default=1024, help="decode: tokens held before the step")
    args = ap.parse_args()
    if args.metric not in METRICS:
        fail(f"unknown metric {args.metric!r}; use one of {', '.join(METRICS)}")
    if args.layers < 1 or args.seq_len < 256 or args.context < 1 or (args.query_stride or 1) < 1:
        fail("--layers, --context and --query-stride must be at least 1, --seq-len at least 256")
    torch.set_num_threads(2)
    if not triton_scores.available():
        print("Triton is not importable here: counted on the torch paths, not Triton's kernels")
    try:
        model = rateq.models.random_model(args.model, dtype="fp32", device="cpu", num_hidden_layers=args.layers,
                                          hidden_size=256, intermediate_size=256, vocab_size=512)
    except RateQError as e:
        fail(str(e))
    cfg = model.config
    print(f"{args.model} attention ({cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, head_dim "
          f"{head_dim_of(cfg)}), {args.layers} layers, on the CUDA path")
    as_on_cuda()
    if args.stage in ("calibrate", "both"):
        calibration(model, args)
    if args.stage in ("decode", "both"):
        decode(model, args)


if __name__ == "__main__":
    main()
