"""From curves and a budget to a plan: pick one (quantizer, bits) per unit minimising total distortion.

    minimise   Σ_u D_u(q_u, b_u)
    subject to Σ_u n_u · cost(q_u, b_u) ≤ B · Σ_u n_u      (B: effective bits per element, metadata included)

`D` comes from the curves made monotone (`Curves.monotone`), `n_u` from `Curves.counts`, and `cost` from
`QuantSpec.bits_per_element`. Candidates are every calibrated (quantizer, bits) pair; with `allow_fp16=True`
also unquantized fp16 (16 bits per element, zero distortion). Four methods share the problem and the `Plan`:

- `exact`: optimal: reduced-cost fixing around the greedy plan, then an exact Pareto DP over what is left
  (or the MILP on HiGHS, for per-layer or per-device caps or on request); bound and gap reported.
- `greedy`: Lagrangian convex-hull greedy; milliseconds; within one hull step of optimal (bound reported).
- `waterfill`: RateQuant's reverse waterfilling on fitted `D(b) = α·β^(−b)`, rounded within the budget.
- `convex`: the problem as a linear programme in cvxpy: its relaxation gives a certified lower bound, the
  same programme with boolean variables (HiGHS MILP, time-limited) the plan, else the relaxation rounded and
  repaired to feasibility; the plan's gap to the bound is reported.

Plans a serving engine can run: `tie="layer"` gives every KV head of a layer one (quantizer, bits) for K and
one for V, `tie="layer-kv"` one for the whole layer, `tie="model"` one for every key of the model and one for
every value; `devices` caps the layers each GPU holds. `exact`, `greedy` and `convex` honour both; `waterfill`
refuses them. Engine formats (`fp8`, `nvfp4`, llama.cpp's `q8_0`, …) are chosen at their own width only;
`rateq.engines.solve_for` adds every rule of one engine.
"""

from __future__ import annotations

import time

import numpy as np

from ..curves import Curves
from ..errors import RateQError
from ..plan import Plan
from ..policy import CachePolicy
from .convex import solve_convex
from .exact import solve_exact
from .greedy import build_hulls, decode, fill, solve_greedy
from .problem import Problem, budget_range, build_problem, in_budget_range
from .waterfill import fit_exponential, solve_waterfill

METHODS = ("exact", "greedy", "waterfill", "convex")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise RateQError(f"unknown solver method {method!r}; use one of {', '.join(METHODS)}")


def _solve_problem(problem: Problem, method: str, time_limit: float, backend: str) -> tuple[np.ndarray, dict]:
    if method == "exact":
        return solve_exact(problem, time_limit=time_limit, backend=backend)
    if method == "greedy":
        return solve_greedy(problem)
    if method == "convex":
        return solve_convex(problem, time_limit=time_limit, backend=backend)
    return solve_waterfill(problem)


def solve(curves: Curves, budget: float, *, method: str = "exact", min_bits: int | None = None,
          max_bits: int | None = None, keys_at_least_values: bool = False, fixed: dict | None = None,
          per_layer_budget=None, quantizers=None, allow_fp16: bool = False, policy: CachePolicy | None = None,
          tie: str | None = None, devices=None, time_limit: float = 60.0, backend: str = "auto",
          learned_tokens: int | None = None) -> Plan:
    """The plan minimising predicted distortion at `budget` effective bits per cached element.

    - `min_bits` / `max_bits`: range of code bits every free unit may take.
    - `keys_at_least_values`: every KV head's keys get at least as many code bits as its values.
    - `fixed`: `{(layer, head, "k" | "v"): bits}` or `…: (quantizer, bits)` pins units (16 = fp16); a quantizer
      is an index into `curves.quantizers`, a spec id or a `QuantSpec`. Fixed units' cost counts in the budget.
    - `per_layer_budget`: one number, or one per layer — each layer's own effective-bits cap.
    - `quantizers`: restrict the choice to these of the curves' quantizers.
    - `policy`: the runtime policy (residual window, key block, sinks) recorded in the plan.
    - `tie`: `"layer"`: all KV heads of a layer take one slot for K and one for V (K and V may differ);
      `"layer-kv"`: the whole layer takes one slot; `"model"`: every K unit of the model takes one slot and every
      V unit one (no `per_layer_budget` or `devices` with it). A tied group may take only the slots all its units
      may.
    - `devices`: `[(first layer, last layer, cap), …]`: the layers each device holds (inclusive, disjoint) and
      its cap in effective bits per element of those layers' units. A memory cap of M bytes for a device whose
      layers cache E elements (tokens × KV heads × head dim × 2, K and V) is `cap = 8·M / E`, since
      bytes = bits / 8 × elements.
    - `learned_tokens`: charge learned parameters (codebooks, static scales) against the budget as if spread over
      that many cached tokens (a 2-bit codebook of 2 channels adds 16·16/T bits per element); without it they are
      a fixed per-model cost outside the budget, reported beside it (`Plan.learned_nbytes`).
    - `backend`: for exact, `auto` (Pareto DP; HiGHS MILP for per-layer budgets or devices), `dp` or `milp`;
      for convex, `auto` (MILP where HiGHS is installed, else the rounded relaxation), `milp` or `round`.
      `time_limit` bounds the MILP.

    Raises `RateQError` for a budget outside the feasible range (named in the message) or bad constraints.
    The plan's `solver` dict holds the method, predicted distortion, seconds, and the method's bound facts.
    """
    _check_method(method)
    t0 = time.perf_counter()
    problem = build_problem(curves, budget, min_bits=min_bits, max_bits=max_bits,
                            keys_at_least_values=keys_at_least_values, fixed=fixed, per_layer_budget=per_layer_budget,
                            quantizers=quantizers, allow_fp16=allow_fp16, policy=policy, tie=tie, devices=devices,
                            learned_tokens=learned_tokens)
    choice, info = _solve_problem(problem, method, time_limit, backend)
    if not problem.within_budget(choice):
        raise AssertionError(f"{method} returned a plan over budget")  # a solver bug, never a user error
    return problem.to_plan(choice, {"method": method, **info, "seconds": time.perf_counter() - t0})


def _row(problem: Problem, budget: float, choice: np.ndarray) -> dict:
    bits = problem.slot_bits[choice]
    role = problem.unit_role
    return {
        "budget": float(budget),
        "feasible": True,
        "distortion": problem.distortion(choice),
        "effective_bits": problem.total_cost(choice),
        "nominal_bits": float(problem.weight @ bits),
        "k_bits": float(bits[role == 0].mean()),
        "v_bits": float(bits[role == 1].mean()),
    }


def frontier(curves: Curves, budgets, *, method: str = "greedy", time_limit: float = 60.0, backend: str = "auto",
             **constraints) -> list[dict]:
    """The rate-distortion frontier: one row per budget (sorted), with predicted distortion, effective and
    nominal bits, and K and V mean code bits. Budgets outside the feasible range give `feasible: False` rows.

    `greedy` builds the hulls once and reads every budget off them (100 budgets in milliseconds); `exact` and
    `waterfill` solve each budget. Distortion never rises with budget: where a budget's plan predicts more
    distortion than a smaller budget's, the smaller budget's plan (which also fits) is reported instead.
    `constraints` are `solve`'s keyword arguments.
    """
    _check_method(method)
    budgets = sorted(float(b) for b in np.atleast_1d(np.asarray(budgets, dtype=np.float64)))
    if not budgets:
        return []
    # Build once at a budget every constraint allows, then vary only the budget.
    problem = build_problem(curves, budgets[-1], **constraints, check_budget=False)
    lo, hi = problem.cost_range()
    hulls = build_hulls(problem) if method == "greedy" else None
    rows, best = [], None
    for b in budgets:
        if not in_budget_range(b, lo, hi):
            rows.append({"budget": b, "feasible": False, "range": [lo, hi]})
            continue
        problem.budget = b
        if method == "greedy":
            pos, _ = fill(hulls, b, problem.cap_shares())
            choice = decode(hulls, pos)
        else:
            choice, _ = _solve_problem(problem, method, time_limit, backend)
        row = _row(problem, b, choice)
        if best is not None and row["distortion"] > best["distortion"]:
            row = {**best, "budget": b}
        rows.append(row)
        best = row
    return rows


__all__ = ["METHODS", "budget_range", "fit_exponential", "frontier", "solve"]
