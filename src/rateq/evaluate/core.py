"""`evaluate`: teacher-forced PPL, KL to full precision and routing flips for plans and baselines, one pass each.

Per batch of windows the full-precision model runs once; its log-probabilities (for KL) and its routing
arg-maxes (for flips) are reused by every method, then discarded, so memory is bounded by one batch whatever
the number of windows. Each method runs inside `rateq.simulate` with its KV transform and the cache policy:
`residual=0` is the standard simulated-quantization protocol of the papers, `residual>0` sees exactly what
the runtime cache would hold for each query.
"""

from __future__ import annotations

import contextlib

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import RateQError
from ..hooks import attention_hook, plain_attention
from ..models import count_parameters
from ..plan import Plan
from ..quant.rope import capture_rope
from ..policy import CachePolicy
from ..simulate import simulate
from ..text import text_windows
from . import baselines
from .baselines import BaselineContext, check_budget
from .method import Method
from .metrics import RoutingProbe, TokenStats

Progress = Callable[[int, int, str], None]
DEFAULT_CHAR_START = 100_000  # where evaluation text starts by default (past front matter; `rateq apply` agrees)


@dataclass
class Evaluation:
    """Rows (one dict per method, in input order) plus the settings they were measured under.

    Index by position or by method name: `result["kivi@2.5"]["ppl"]`.
    """

    rows: list[dict]
    settings: dict
    methods: list[Method] = field(default_factory=list)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            for row in self.rows:
                if row["name"] == key:
                    return row
            raise KeyError(key)
        return self.rows[key]

    def plans(self) -> dict[str, Plan]:
        return {m.name: m.plan for m in self.methods if m.plan is not None}

    def to_dict(self) -> dict:
        return {"settings": self.settings, "rows": self.rows}


class _StoredKV:
    """Wraps a KV transform and keeps the last stored keys per layer, for the routing probe to compare with.

    Only one layer's tensors are alive at a time: the next layer's call replaces them."""

    def __init__(self, inner):
        self.inner = inner
        self.last: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(layer, role, x)
        if role == "k":
            self.last.clear()
            self.last[(layer, role)] = out
        return out

    def get(self, layer: int, role: str) -> torch.Tensor:
        return self.last[(layer, role)]


def _windows(data, tokenizer, n_windows, seq_len, seed, char_start) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        ids = data.long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise RateQError("evaluation ids must be (windows, seq_len) with seq_len ≥ 2")
        return ids
    if isinstance(data, str):
        if tokenizer is None:
            raise RateQError("evaluating on a text name needs the tokenizer: evaluate(model, 'austen-pp', …, "
                             "tokenizer=tok), or pass token ids")
        return text_windows(tokenizer, data, n_windows, seq_len, seed=seed, char_start=char_start)
    raise RateQError(f"data must be token ids (a LongTensor) or a text name, got {type(data).__name__}")


def _resolve(model, items, *, budgets, context, own_policy: bool) -> list[Method]:
    """Methods for `items`, full precision first (added when not asked for). With `own_policy`, plans and
    profiles run under their own cache policy."""
    out: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            out.append(item)
        elif isinstance(item, Plan):
            out.append(Method.from_plan(item, policy=item.policy if own_policy else None))
        elif isinstance(item, (str, Path)):
            parsed = baselines.parse_name(str(item), budgets)
            if parsed.kind == "profile":
                out.append(baselines.profile(parsed.path, model, own_policy=own_policy))
            else:
                out.extend(baselines.build(parsed, model, context=context))
        else:
            raise RateQError(f"cannot evaluate a {type(item).__name__}: pass a Plan, a Method or a baseline name")
    full = [m for m in out if m.is_full_precision]
    out = (full or [baselines.full_precision()]) + [m for m in out if not m.is_full_precision]
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RateQError(f"methods evaluated twice: {', '.join(dupes)}")
    return out


def matched_budget(effective_bits: float, budget: float | None, budgets: Iterable[float], *,
                   tol: float = 1e-6) -> float | None:
    """The compared budget a row is matched at: one it was built for and stays within, else one it stores
    exactly; None when it is at none of `budgets` (another storage: not comparable at matched bits)."""
    budgets = list(budgets)
    if budget is not None:
        for b in budgets:
            if abs(budget - b) <= tol and effective_bits <= b + tol:
                return b
    for b in budgets:
        if abs(effective_bits - b) <= tol:
            return b
    return None


@torch.no_grad()
def evaluate(model, data, methods: Sequence | str | Plan | Method, *, tokenizer=None,
             policy: CachePolicy | None = None, budgets: Iterable[float] | None = None,
             n_windows: int = 4, seq_len: int = 1024, seed: int | None = None, char_start: int = DEFAULT_CHAR_START,
             batch_size: int = 1, flips: bool = True, flip_layers: Iterable[int] | None = None,
             calibration=None, curves=None, progress: Progress | None = None) -> Evaluation:
    """Evaluate plans and baselines on the same windows.

    - `data`: token ids `(N, T)`, or a text name (`austen-pp`, a file, …) cut into `n_windows` windows of
      `seq_len` tokens after skipping `char_start` characters (`seed=None`: consecutive windows; otherwise
      seeded random ones). The default start, 100000, is `rateq eval`'s and `rateq apply`'s.
    - `methods`: Plans, `Method`s, or baseline names (`fp`, `K4V2`, `kivi@2.5`, `splits`, `wnorm`, `rank`,
      `hybrid`, `rot-hadamard`, `waterfill`, `rateq`, `reference`, a profile path …; see
      `rateq.evaluate.baselines`). Names without `@B` are expanded at every budget in `budgets`. A full-precision
      row (`fp`) is always evaluated, first: it is the reference of KL, flips and ΔPPL.
    - `budgets`: the compared budgets. Each row is matched at one of them (`compared_at`) when it was built for
      it and stays within it, or stores exactly it; other rows are at another storage (`compared_at` None).
      Default: the budgets the rows were built for.
    - `policy`: which tokens the cache holds quantized (R = 0: the papers' protocol). None: plans and profiles
      run under their own `plan.policy`, every other row under `CachePolicy()` (R = 0, key block 32, no
      sinks); a policy given applies to every row without a policy of its own (`Method.policy`). Each row's
      key block is raised to a multiple of its key groups (`Method.policy_for`); rows report their policy.
    - `calibration`: token ids or a text name for the baselines that need calibration data (PCA bases,
      curves); default `mix`, 2 windows of `seq_len`. `curves`: distortion curves for `waterfill`
      and `rateq` rows (calibrated on demand otherwise).
    - `flips`: measure routing flips (an extra `(B, Hq, T, T)` score product per probed layer; `flip_layers`
      restricts it to some layers).

    Returns an `Evaluation` whose rows hold name, family, nominal and effective bits, the learned parameters'
    bytes and share of the model's fp16 weights (learned_bytes, fp16_weight_bytes, learned_share), compared_at,
    policy, ppl, nll, kl, flip_rate, key_flip_rate, delta_ppl and seconds.
    """
    if isinstance(methods, (str, Plan, Method, Path)):
        methods = [methods]
    ids = _windows(data, tokenizer, n_windows, seq_len, seed, char_start)
    budgets = [check_budget(b, "budget") for b in budgets] if budgets is not None else []
    context = BaselineContext(model, tokenizer, calibration=calibration, curves=curves, seq_len=int(ids.shape[1]))
    resolved = _resolve(model, methods, budgets=budgets, context=context, own_policy=policy is None)
    compared = budgets or sorted({m.budget for m in resolved if m.budget is not None and not m.is_full_precision})
    policy = CachePolicy() if policy is None else policy

    device = next(model.parameters()).device
    tokens = {m.name: TokenStats() for m in resolved}
    flip_stats = {m.name: None for m in resolved}
    seconds = {m.name: 0.0 for m in resolved}
    # Pre-RoPE key quantizers need each forward's rotary tables: captured for the whole evaluation.
    prerope = {m.name for m in resolved if m.plan is not None and any(q.prerope for q in m.plan.quantizers)}
    stack = contextlib.ExitStack()
    with stack:
        rope = stack.enter_context(capture_rope(model)) if prerope else None
        transforms = {m.name: (None if not m.build else m.build(m.policy_for(policy), rope) if m.name in prerope
                               else m.build(m.policy_for(policy))) for m in resolved}
        layers = set(flip_layers) if flip_layers is not None else None
        probes = {m.name: RoutingProbe(layers) for m in resolved if flips and not m.is_full_precision}

        n_batches = -(-ids.shape[0] // batch_size)
        total = n_batches * (1 + sum(not m.is_full_precision for m in resolved))
        step = 0
        for b in range(n_batches):
            x = ids[b * batch_size:(b + 1) * batch_size].to(device)  # (B, T)
            targets = x[:, 1:]
            # Full precision once per batch: the reference for KL and for routing.
            t0 = time.perf_counter()
            reference = RoutingProbe(layers)
            if probes:
                with attention_hook(model, reference.wrap(plain_attention, record=True)):
                    logits = model(x, use_cache=False).logits
            else:
                logits = model(x, use_cache=False).logits
            ref_logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            del logits
            fp_seconds = time.perf_counter() - t0
            step += 1
            if progress:
                progress(step, total, "full precision")
            for m in resolved:
                if m.is_full_precision:
                    stats = tokens[m.name]
                    stats.nll_sum += float(-ref_logp.gather(-1, targets[..., None]).sum())
                    stats.tokens += targets.numel()
                    seconds[m.name] += fp_seconds
                    continue
                t0 = time.perf_counter()
                stored = _StoredKV(transforms[m.name])
                mpolicy = m.policy_for(policy)
                with simulate(model, stored, mpolicy):
                    probe = probes.get(m.name)
                    if probe is not None:
                        probe.reference = reference.reference
                        inner = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
                        with attention_hook(model, probe.wrap(inner, stored=stored.get, policy=mpolicy)):
                            logits = model(x, use_cache=False).logits
                    else:
                        logits = model(x, use_cache=False).logits
                tokens[m.name].add(logits, targets, ref_logp)
                del logits
                seconds[m.name] += time.perf_counter() - t0
                step += 1
                if progress:
                    progress(step, total, m.name)
            del ref_logp

    fp_ppl = next((tokens[m.name].ppl for m in resolved if m.is_full_precision), None)
    n_params = count_parameters(model)
    rows = []
    for m in resolved:
        st = tokens[m.name]
        probe = probes.get(m.name)
        row = m.row(n_params)
        row.update(ppl=st.ppl, nll=st.nll, kl=st.kl if not m.is_full_precision else 0.0,
                   flip_rate=(probe.stats.flip_rate if probe else (0.0 if m.is_full_precision and flips else None)),
                   key_flip_rate=(probe.stats.key_flip_rate if probe else
                                  (0.0 if m.is_full_precision and flips else None)),
                   delta_ppl=(st.ppl - fp_ppl) if fp_ppl is not None else None, tokens=st.tokens,
                   compared_at=None if m.is_full_precision else matched_budget(m.effective_bits, m.budget, compared),
                   policy=None if m.is_full_precision else m.policy_for(policy).to_dict(),
                   routing_decisions=probe.stats.decisions if probe else None,
                   seconds=round(seconds[m.name], 2))
        rows.append(row)
    settings = {
        "model": getattr(model, "rateq_name", None) or getattr(model.config, "name_or_path", "model"),
        "data": data if isinstance(data, str) else "token ids",
        "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "seed": seed, "char_start": char_start,
        "policy": policy.to_dict(), "budgets": compared, "flip_layers": sorted(layers) if layers else "all",
        "calibration": context.describe(),
    }
    return Evaluation(rows, settings, resolved)
