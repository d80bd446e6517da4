"""Calibration: per-unit distortion curves `D_u(q, b)` measured in one streaming pass over calibration text.

    curves = rateq.calibrate(model, tokenizer, "austen-emma")                  # -> Curves
    curves = rateq.calibrate(model, None, ids, metric="output", bits=(2, 3, 4))  # ids: (n, seq_len) LongTensor
    by_metric = rateq.calibrate_metrics(model, tok, "austen-emma", metrics=("mse", "fisher"))  # one pass, several

Every attention call of the model goes through one function registered in transformers' AttentionInterface
(`capture.Calibrator.attention`): it computes the layer's real attention, so the forward is exact, and scores
every candidate of every unit of that layer at once (`metrics.candidate_errors`). `fisher` needs the gradient
of the loss with respect to each head's attention output: one backward pass per batch, the statistics are
reduced inside a tensor hook on that output when its gradient arrives.

`reference=Plan` measures each unit around that plan instead of around the full-precision model: the forward
(and the gradient) run with every unit's K/V in the plan's stored form, and each unit's candidates are
priced with the rest already quantized — errors compound through the layers, and curves measured against a
full-precision model under-price low bit widths.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import RateQError
from ..curves import Curves
from ..hooks import attention_hook
from ..quant.rope import capture_rope
from ..memory import PeakMemory
from ..models import fingerprint, head_dim_of, input_device, model_dtype, weight_devices
from ..plan import Plan
from ..policy import CachePolicy
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec, holds_role, is_bits, parse_spec
from ..text import (BUNDLED_TEXT, DATASET_ALIASES, DEFAULT_CALIBRATION_TEXT, MIXED_TEXT, load_text, text_windows,
                    token_windows, tokenize)
from .capture import Calibrator
from .learn import learn_params
from .metrics import METRICS

__all__ = ["DEFAULT_BITS", "DEFAULT_METRIC", "DEFAULT_QUANTIZERS", "LOW_BIT_BUDGET", "LOW_BIT_QUANTIZERS", "METRICS",
           "calibrate", "calibrate_metrics", "calibration_ids", "check_bits", "check_quantizers", "default_quantizers",
           "scoring_defaults"]

log = logging.getLogger("rateq.calibrate")

DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 8)
# Candidates the solver picks from per unit (measured on smollm2-135m, README "Results"): KIVI-style keys per
# channel quantized before RoPE (KVQuant) over 32, 64 and 128 tokens (the last after a randomized Hadamard
# rotation), Lloyd–Max codebooks on Hadamard-rotated vectors with one fp16 norm per 64 channels (TurboQuant-MSE,
# best for values), and plain KIVI. Quantizers that cannot hold a role (128-token key groups for values) are
# priced infinite for it.
DEFAULT_QUANTIZERS = ("minmax-g32-fp16-prerope", "minmax-g64-fp16-prerope", "minmax-g128-rhadamard-fp16-prerope",
                      "lloydmax-g64-rhadamard-fp16", "minmax-g32-fp16")
# Below 2.5 effective bits per element, the per-token families run out of bits for their own scales and zeros; the
# learned codebooks store none (2, 4 and 8 channels per code, Coupled Quantization). `rateq calibrate --budget B`
# adds them to the default candidates for B below LOW_BIT_BUDGET: on smollm2-135m at 2.0 bits they take Pride and
# Prejudice from PPL 43.99 to 29.90 and the Jargon File from 71.38 to 44.18 (README "Quantizers"), for 2.3× the
# calibration time on a CPU (a held-out pass, k-means of up to 256 centroids per unit and width, their pricing).
LOW_BIT_QUANTIZERS = ("codebook-g2-prerope", "codebook-g4-prerope", "codebook-g8-prerope")
LOW_BIT_BUDGET = 2.5
# Chosen by bench/metric_correlation.py: the metric whose predicted Σ_u D_u(plan) ranks measured ΔNLL of
# mixed plans best on smollm2-135m (Spearman 0.98 over 36 plans, mse 0.92; results/metric_correlation.md).
DEFAULT_METRIC = "fisher"
DEFAULT_SAMPLES = 4  # 4 × 1024 tokens: one window of each part of the default text `mix`
DEFAULT_SEQ_LEN = 1024
# On a GPU: 16 × 2048 tokens, the data a GPU calibrates in seconds (the CPU defaults above take minutes).
# Candidates are scored on every 4th query row (each KV position is still priced by a quarter of the queries that
# read it), the sums scaled back: an unbiased estimate at a quarter of the scoring cost. On smollm2-135m its curves
# rank like every row's (Spearman 0.999); its 2.5-bit plans score within 1% of theirs on Austen and 1–8% apart on
# the unseen Jargon File, the sampling's noise (README "Calibration cost").
DEFAULT_QUERY_STRIDE = 4
CUDA_SAMPLES = 16
CUDA_SEQ_LEN = 2048


def default_quantizers(budget: float | None = None) -> tuple[str, ...]:
    """The candidates calibrated unless others are named: `DEFAULT_QUANTIZERS`, and for a `budget` below
    `LOW_BIT_BUDGET` effective bits the learned codebooks of `LOW_BIT_QUANTIZERS` too."""
    low = budget is not None and budget < LOW_BIT_BUDGET
    return DEFAULT_QUANTIZERS + (LOW_BIT_QUANTIZERS if low else ())


def scoring_defaults(device_type: str) -> dict:
    """How candidates are scored on a device type (`metrics.candidate_errors`): `chunk_elements`, the largest
    temporary (~32 MiB of fp32 on a CPU, ~1 GiB on a GPU); `matmul_dtype`, bf16 tensor cores for the candidate
    deltas on a GPU, fp32 (fastest) on a CPU; `row_split`, the fewest chunks a sequence's query rows are cut into
    (16 on a CPU, the least math over causal masks; 4 on a GPU, the fewest kernel launches)."""
    if device_type == "cuda":
        return dict(chunk_elements=1 << 28, matmul_dtype=torch.bfloat16, row_split=4)
    return dict(chunk_elements=1 << 23, matmul_dtype=torch.float32, row_split=16)


def default_windows(device) -> tuple[int, int]:
    """`(n_samples, seq_len)` drawn from text when none are given: 16 × 2048 on CUDA, else 4 × 1024."""
    return (CUDA_SAMPLES, CUDA_SEQ_LEN) if str(device).startswith("cuda") else (DEFAULT_SAMPLES, DEFAULT_SEQ_LEN)

ProgressFn = Callable[[dict], None]


# -- calibration tokens --------------------------------------------------------------------------------------
def _is_text_spec(text: str) -> bool:
    """A text spec names text (alias, dataset, file); anything else containing whitespace is the text itself."""
    if text in BUNDLED_TEXT or text in MIXED_TEXT or text in DATASET_ALIASES or text.startswith("hf:"):
        return True
    if len(text) < 4096 and "\n" not in text and Path(text).expanduser().exists():
        return True
    return not any(c.isspace() for c in text)  # a lone word is a (mistyped) spec: load_text says what's valid


def calibration_ids(tokenizer, texts, n_samples: int | None = None, seq_len: int | None = None,
                    seed: int = 0, *, held_out: bool = False) -> tuple[torch.Tensor, str]:
    """`(n, seq_len)` token ids and a description of the data, from a text spec, raw text, or token ids.

    Text is cut into `n_samples` distinct windows of `seq_len` tokens drawn with `seed`. A 2-D LongTensor is
    used as given (its first `n_samples` rows and `seq_len` columns when those are set); a 1-D one is a token
    stream cut into windows like text.

    `held_out=True`: as many windows again, drawn apart from those (no token shared) — where static scales are
    learned, so that the curves price them on text they were not fitted to. A RateQError when the text is too
    short for both, or the ids are given as windows.
    """
    skip = (n_samples or DEFAULT_SAMPLES) if held_out else 0
    if isinstance(texts, torch.Tensor):
        ids = texts
        if ids.dtype not in (torch.int64, torch.int32):
            raise RateQError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() == 1:
            return token_windows(ids.long(), n_samples or DEFAULT_SAMPLES, seq_len or DEFAULT_SEQ_LEN,
                                 seed=seed, skip=skip), "token ids"
        if held_out:
            raise RateQError("token ids given as windows have no held-out windows")
        if ids.dim() != 2:
            raise RateQError(f"token ids must be (n, seq_len), got shape {tuple(ids.shape)}")
        n = ids.shape[0] if n_samples is None else n_samples
        t = ids.shape[1] if seq_len is None else seq_len
        if n > ids.shape[0] or t > ids.shape[1]:
            raise RateQError(f"asked for {n} x {t} tokens but the ids given are {tuple(ids.shape)}")
        return ids[:n, :t].long(), "token ids"
    n, t = n_samples or DEFAULT_SAMPLES, seq_len or DEFAULT_SEQ_LEN
    if isinstance(texts, (list, tuple)) and all(isinstance(x, str) for x in texts):
        texts, name = "\n\n".join(texts), f"{len(texts)} texts"
    elif isinstance(texts, str):
        spec = _is_text_spec(texts)
        name = texts if spec else f"text ({len(texts)} characters)"
        if spec and tokenizer is not None:  # a mixed text draws from each of its parts (text_windows)
            return text_windows(tokenizer, texts, n, t, seed=seed, skip=skip), name
        if spec:
            texts = load_text(texts)  # an unknown spec says so before the missing tokenizer does
    else:
        raise RateQError("calibration texts must be a text spec, a string, a list of strings or token ids")
    if tokenizer is None:
        raise RateQError("calibrating on text needs the model's tokenizer; pass one, or pass token ids instead")
    return token_windows(tokenize(tokenizer, texts), n, t, seed=seed, skip=skip), name


# -- progress ------------------------------------------------------------------------------------------------
def _print_progress(event: dict) -> None:
    """`progress=True`: one plain line per batch on stderr, with tokens per second."""
    if event.get("event") == "batch":
        seconds = event["seconds"]
        rate = f"{event['tokens'] / seconds:,.0f} tok/s" if seconds > 0 else "… tok/s"
        print(f"calibrating: {event['tokens']}/{event['total']} tokens, {rate}, {seconds:.1f} s",
              file=sys.stderr, flush=True)
    elif event.get("event") == "learn" and event["done"]:
        what = "tokens read" if event["stage"] == "tokens" else "quantizers fitted"
        print(f"learning codebooks and scales: {event['done']}/{event['total']} {what}, {event['seconds']:.1f} s",
              file=sys.stderr, flush=True)


def _progress_sink(progress: bool | ProgressFn) -> tuple[ProgressFn, bool]:
    """`(report, to_callback)`: where progress events go, and whether warnings go there too (a callable the
    caller passed) or to the `rateq.calibrate` log (True: printed lines; False: nothing)."""
    if callable(progress):
        return progress, True
    return (_print_progress if progress else (lambda event: None)), False


# -- helpers -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(model):
    """Parameters need no gradient: the fisher backward only wants activation gradients."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


def check_bits(bits) -> tuple[int, ...]:
    """Candidate code widths as a tuple, or a RateQError saying why they cannot be calibrated."""
    bits = tuple(int(b) for b in bits)
    if not bits:
        raise RateQError("give at least one bit width to calibrate")
    bad = [b for b in bits if not is_bits(b)]
    if bad:
        raise RateQError(f"bit widths must be 1..8 (or {FULL_PRECISION_BITS} for fp16), got {bad}")
    if list(bits) != sorted(set(bits)):
        raise RateQError(f"bit widths must be increasing and distinct, got {bits}; e.g. bits=(1, 2, 3, 4, 5, 6, 8)")
    return bits


def check_quantizers(quantizers, policy: CachePolicy, head_dim: int, *, model: str | None = None) -> list[QuantSpec]:
    """The candidate specs, or a RateQError for one that can never run on a model of this head_dim under this
    policy: a Hadamard rotation of a head_dim that is not a power of two, channel groups that do not divide it,
    key groups that do not fit the key block; and some candidate must hold keys, and some values."""
    specs = [parse_spec(q) if isinstance(q, str) else q for q in quantizers]
    if not specs or not all(isinstance(q, QuantSpec) for q in specs):
        raise RateQError("quantizers must be QuantSpec objects or spec ids such as 'minmax-g32-fp16'")
    of = f"{model} (head_dim {head_dim})" if model else f"head_dim {head_dim}"
    for q in specs:
        if q.rotation != "none" and head_dim & (head_dim - 1):
            raise RateQError(f"quantizer {q.id} rotates each head with a Hadamard transform, which needs a "
                             f"power-of-two head_dim, not {of}: use a quantizer without rotation")
        if not any(holds_role(q, role, head_dim) for role in ("k", "v")):
            raise RateQError(f"quantizer {q.id} can hold neither keys nor values of {model or 'this model'}: its "
                             f"groups of {q.group_size} channels do not divide head_dim {head_dim}; use a group size "
                             f"that divides {head_dim}")
        policy.check_key_group(q)
    for role, name in (("k", "keys"), ("v", "values")):
        if not any(holds_role(q, role, head_dim) for q in specs):
            raise RateQError(f"no quantizer of {', '.join(q.id for q in specs)} can hold the {name} of {of} "
                             "(channel groups must divide head_dim; values need groups along channels); add one that can")
    return specs


def _nll_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats): gradients are per-token contributions to the total loss."""
    ids = ids.to(logits.device)  # a device map may put the LM head on another device than the embedding
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                             reduction="sum")


# -- the pass ------------------------------------------------------------------------------------------------
def calibrate_metrics(model, tokenizer, texts=None, *, metrics: Iterable[str] = (DEFAULT_METRIC,),
                      bits=DEFAULT_BITS, quantizers=None, n_samples: int | None = None,
                      seq_len: int | None = None, batch_size: int = 1, seed: int = 0,
                      policy: CachePolicy | None = None, reference: Plan | None = None,
                      progress: bool | ProgressFn = False, chunk_elements: int | None = None,
                      matmul_dtype: torch.dtype | None = None,
                      query_stride: int | None = None) -> dict[str, Curves]:
    """One streaming pass that measures several metrics at once → `{metric: Curves}` (see `calibrate`)."""
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise RateQError(f"unknown metric {unknown or metrics}; use one of {', '.join(METRICS)}")
    if texts is None:
        texts = DEFAULT_CALIBRATION_TEXT
    bits = check_bits(bits)
    if quantizers is None:
        quantizers = DEFAULT_QUANTIZERS
    if policy is None:
        policy = CachePolicy.for_quantizers([parse_spec(q) if isinstance(q, str) else q for q in quantizers])
    specs = check_quantizers(quantizers, policy, head_dim_of(model.config))
    if batch_size < 1:
        raise RateQError("batch_size must be at least 1")
    query_stride = DEFAULT_QUERY_STRIDE if query_stride is None else query_stride
    if isinstance(query_stride, bool) or not isinstance(query_stride, int) or query_stride < 1:
        raise RateQError(f"query_stride must be a whole number of 1 or more, got {query_stride!r}")
    fp = fingerprint(model)
    if reference is not None:
        diff = reference.model.mismatches(fp)
        if diff:
            raise RateQError(f"reference plan was made for another model ({'; '.join(diff)})")
    # Batches go where the input embedding computes (under an accelerate device map, layers may sit elsewhere).
    device, dtype = input_device(model), model_dtype(model)
    peak = PeakMemory([*weight_devices(model), str(device)])
    if not (isinstance(texts, torch.Tensor) and texts.dim() == 2):
        n_samples, seq_len = (n_samples or default_windows(device)[0]), (seq_len or default_windows(device)[1])
    ids, data_name = calibration_ids(tokenizer, texts, n_samples, seq_len, seed)
    n, T = ids.shape
    scoring = scoring_defaults(device.type)
    chunk_elements = scoring["chunk_elements"] if chunk_elements is None else chunk_elements
    matmul_dtype = scoring["matmul_dtype"] if matmul_dtype is None else matmul_dtype
    report, warnings_to_callback = _progress_sink(progress)
    # Static scales and codebooks are fitted first, on windows held out from the priced ones (rateq.calibrate.learn).
    with _frozen(model):
        params, learned = learn_params(
            model, specs, lambda: calibration_ids(tokenizer, texts, n_samples, seq_len, seed, held_out=True)[0],
            ids, bits=bits, num_layers=fp.num_layers, num_kv_heads=fp.num_kv_heads, batch_size=batch_size,
            seed=seed, report=report)
    cal = Calibrator(fp.num_layers, fp.num_kv_heads, bits, specs, metrics, policy, reference=reference,
                     chunk_elements=chunk_elements, matmul_dtype=matmul_dtype, row_split=scoring["row_split"],
                     params=params, query_stride=query_stride)
    needs_grad = cal.needs_grad
    nll = 0.0
    t_start = time.perf_counter()
    # Pre-RoPE key quantizers (candidates or the reference plan's) need each forward's rotary tables.
    prerope = any(q.prerope for q in specs) or (reference is not None and any(q.prerope for q in reference.quantizers))
    rope_ctx = capture_rope(model) if prerope else contextlib.nullcontext()
    with attention_hook(model, cal.attention), _frozen(model), rope_ctx as rope:
        cal.set_rope(rope)
        report({"event": "start", "tokens": 0, "total": n * T, "seconds": 0.0})
        for i in range(0, n, batch_size):
            batch = ids[i:i + batch_size].to(device)
            if needs_grad:
                with torch.enable_grad():
                    # Gradients flow from the loss down to the embeddings (and no parameter): every layer's
                    # attention output gets its ∂loss/∂output, the fisher weights.
                    emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)
                    logits = model(inputs_embeds=emb, use_cache=False).logits
                    loss = _nll_loss(logits, batch)
                    del logits
                    loss.backward()
                    nll += float(loss.detach())
                if cal.pending:
                    raise RuntimeError(f"{cal.pending} attention outputs received no gradient")
            else:
                with torch.no_grad():
                    # The LM head's logits are not needed for forward-only metrics.
                    model.base_model(input_ids=batch, use_cache=False)
            done = min(n, i + batch_size) * T
            report({"event": "batch", "tokens": done, "total": n * T, "seconds": time.perf_counter() - t_start})
        seconds = time.perf_counter() - t_start

        hd = head_dim_of(model.config)
        counts = torch.empty(fp.num_layers, fp.num_kv_heads, 2, dtype=torch.float64)
        for layer in range(fp.num_layers):
            window = cal.windows.get(layer)
            # Elements the unit holds per sequence: a sliding-window layer never caches more than its window.
            counts[layer] = (min(T, window) if window else T) * hd
        missing = [layer for layer in range(fp.num_layers) if layer not in cal.windows]
        if missing:
            raise RateQError(f"layers {missing} never called attention through transformers' AttentionInterface; "
                             f"this architecture cannot be calibrated by rateq")
        calibration = {
            "data": data_name, "tokens": n * T, "seq_len": T, "n_samples": n, "seed": seed,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "seconds": round(seconds, 3),
            "policy": policy.to_dict(), "batch_size": batch_size,
            "matmul_dtype": str(matmul_dtype).replace("torch.", ""), "query_stride": query_stride,
            "peak_bytes": peak.read(),  # per device, the whole pass (rateq.memory)
        }
        if getattr(model, "hf_device_map", None):
            calibration["devices"] = weight_devices(model)
        if learned:
            calibration["learned"] = learned
        if reference is not None:
            calibration["reference"] = {"nominal_bits": reference.nominal_bits,
                                        "effective_bits": reference.effective_bits,
                                        "budget_bits": reference.budget_bits}
        if needs_grad:
            calibration["nll"] = nll / (n * (T - 1))  # mean next-token NLL of the (reference) forward
        out = {}
        Q, NB = len(specs), len(bits)
        for m in metrics:
            d = cal.sums(m).view(fp.num_layers, fp.num_kv_heads, 2, Q, NB)
            for qi, q in enumerate(specs):  # a role the quantizer cannot hold: never a candidate (infinite cost)
                for r, role in enumerate(("k", "v")):
                    if not holds_role(q, role, hd):
                        d[:, :, r, qi] = float("inf")
                for bi, b in enumerate(bits):  # nor a width an engine format is not stored at
                    if not q.allows_bits(b):
                        d[:, :, :, qi, bi] = float("inf")
            curves = Curves(d, bits, specs, counts, m, fp, dict(calibration, metric=m), params=dict(params))
            bad = curves.nonmonotone()
            curves.calibration["nonmonotone"] = len(bad)
            if bad:
                msg = (f"{m}: {len(bad)} of {d.numel()} points rise with more bits "
                       f"(e.g. layer {bad[0][0]} head {bad[0][1]} {'KV'[bad[0][2]]} at {bits[bad[0][4]]} bits); "
                       f"Curves.monotone() takes the running minimum for the solver")
                if warnings_to_callback:
                    report({"event": "warning", "message": msg})
                else:
                    log.warning(msg)
            out[m] = curves
    return out


def calibrate(model, tokenizer, texts=None, *, bits=DEFAULT_BITS, quantizers=None, metric: str = DEFAULT_METRIC,
              n_samples: int | None = None, seq_len: int | None = None, batch_size: int = 1, seed: int = 0,
              policy: CachePolicy | None = None, reference: Plan | None = None,
              progress: bool | ProgressFn = False, chunk_elements: int | None = None,
              matmul_dtype: torch.dtype | None = None, query_stride: int | None = None) -> Curves:
    """Measure `D_u(q, b)` for every unit u = (layer, KV head, K|V), quantizer q and bit width b → `Curves`.

    - `texts`: a text spec (`"austen-emma"`, a .txt/.jsonl file, `wikitext2`, `hf:…`), raw text, a list of
      strings, or token ids `(n, seq_len)` (then `tokenizer` may be None). Default: the bundled `mix` (Emma, the
      King James Bible, Python's docs and code: windows from each in turn).
    - `metric`: `mse`, `score`, `output` or `fisher` (see `rateq.calibrate.metrics`); the default is the one
      that best predicts measured ΔNLL of mixed plans.
    - `n_samples` × `seq_len` tokens (default 4 × 1024 from text, 16 × 2048 on CUDA), windows drawn with `seed`; `batch_size`
      sequences per forward.
    - `quantizers`: candidate `QuantSpec`s or ids (default `DEFAULT_QUANTIZERS`; `default_quantizers(budget)` is what
      `rateq calibrate --budget` takes: learned codebooks too below 2.5 bits); `bits`: candidate code widths.
    - `policy`: which positions the runtime stores quantized (sinks, residual window, key blocks); default: no
      residual window, key blocks that hold whole key groups of every quantizer (`CachePolicy.for_quantizers`).
    - `reference`: measure every unit with the rest of the model running under this plan.
    - `query_stride`: candidates are scored on every `query_stride`-th query row, the attention metrics scaled
      back (`metrics.candidate_errors`): default 4; 1 scores every row.
    - `progress`: a callable receiving event dicts (`event` = `learn`, `start`, `batch`, `warning`; `tokens`, `total`,
      `seconds`, `message`; `learn`: `stage` (`tokens` read, quantizers `fit`), `done`, `total`), or True for one plain line per batch on stderr. Each warning is reported once:
      to the callable when there is one, else to the `rateq.calibrate` logger.

    Statistics accumulate in float64 whatever the model dtype; the same seed gives the same curves.
    """
    return calibrate_metrics(model, tokenizer, texts, metrics=(metric,), bits=bits, quantizers=quantizers,
                             n_samples=n_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             policy=policy, reference=reference, progress=progress,
                             chunk_elements=chunk_elements, matmul_dtype=matmul_dtype,
                             query_stride=query_stride)[metric]
