"""The weight-norm baseline: the key-favoured, data-free allocator of "Quantize What Counts: More for Keys,
Less for Values" (Hariri et al.).

The method. A cached tensor is a projection of the layer's input, K = X·W^K and V = X·W^V, and a uniform
b-bit quantizer errs by ‖A − Â‖_F ∝ 2^(−b)·‖A‖_F. The paper's two results: key projections carry larger
spectral and Frobenius norms than value projections in nearly every layer, and at a fixed budget giving keys
the extra precision strictly reduces the error (K4V2 beats K2V4 at equal storage). Read from the weights
alone, with no calibration data, the distortion of a layer's keys and values at b bits is

    D_l,K(b) = ‖W^K_l‖²_F · 2^(−2b),        D_l,V(b) = ‖W^V_l‖²_F · 2^(−2b),

and the allocation is per layer: one key width and one value width for all of a layer's KV heads, keys at
least as wide as values, widths 2 to 8 (the paper's pairs: K2V2, K3V2, K4V2, …, never a 1-bit cache).

In rateq these are `Curves` with one unit per layer and role (`weight_norm_curves`), solved by `rateq.solve`'s
greedy with `keys_at_least_values` at the same effective-bits budget as every other row; the layer plan is
then given to every head of its layer.

The quantizer. A baseline is compared at its best. The law above gives metadata no value, and a key-favoured
pair needs room above K2V2: with KIVI's fp16 scale and fp16 zero-point per group of 64 (the grid of `kivi@2.5`)
K2V2 alone fills 2.5 effective bits, and the allocator would be plain KIVI. So its grid is KIVI's asymmetric
min-max with an fp16 scale and an integer zero-point of the code's own width per group of 64 (keys per
channel over 64 tokens, values per token over 64 channels; 32 or 16 channels for heads that 64 does not
divide): K2V2 costs 2.28 bits, and at 2.5 some 40% of the layers can take K3V2. On smollm2-135m this grid is
the allocator's best, or within 0.5 PPL of it, among those tried (fp16 zero-points; keys over 128 tokens with
either zero-point) at 2.5, 3.0 and 3.5 effective bits, on the calibration text and on held-out text, and
ahead of `kivi` at each.
"""

from __future__ import annotations

import torch

from ...curves import Curves
from ...errors import RateQError
from ...models import ModelFingerprint, fingerprint
from ...plan import Plan
from ...quant.spec import QuantSpec, holds_role
from ...solve import solve
from ..method import Method
from .matched import fmt_bits

WNORM_BITS = (2, 3, 4, 5, 6, 7, 8)  # the paper's widths: from K2V2 up, no 1-bit cache
# KIVI min-max, fp16 scale + integer zero-point; the cheapest that holds a role wins (64 where the head allows)
WNORM_QUANTIZERS = tuple(QuantSpec(group_size=g, zero="code") for g in (64, 32, 16))
WNORM_METRIC = "weight-norm"


def projection_norms(model) -> torch.Tensor:
    """`(L, H, 2)` squared Frobenius norms of each KV head's rows of `k_proj` / `v_proj`."""
    fp = fingerprint(model)
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    out = torch.full((L, H, 2), float("nan"), dtype=torch.float64)
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if layer is None or not hasattr(module, "k_proj") or not hasattr(module, "v_proj"):
            continue
        for r, proj in enumerate((module.k_proj, module.v_proj)):
            w = proj.weight.detach().to(torch.float64)  # (H*D, hidden)
            out[layer, :, r] = w.view(H, D, -1).pow(2).sum(dim=(1, 2))
    if torch.isnan(out).any():
        raise RateQError("weight-norm allocation needs attention modules with k_proj and v_proj weights "
                         f"({fp.architecture} has a different layout)")
    return out


def layer_fingerprint(fp: ModelFingerprint) -> ModelFingerprint:
    """The layer-level view of a model the weight-norm curves are stated on: one unit per layer and role,
    standing for all of that layer's KV heads (of the model's head_dim, which the quantizers must fit)."""
    return ModelFingerprint(fp.name, fp.architecture, fp.num_layers, 1, fp.head_dim)


def weight_norm_curves(fp: ModelFingerprint, norms: torch.Tensor, *, quantizers=WNORM_QUANTIZERS,
                       bits=WNORM_BITS) -> Curves:
    """The weight-norm distortion model as `Curves` on `layer_fingerprint(fp)`: `D_l,r(q, b) = N_l,r·2^(−2b)`
    with `N_l,r` the layer's squared projection norm (`norms (L, H, 2)` summed over heads), +inf where a
    quantizer cannot hold the role for heads of `fp.head_dim` (`holds_role`), equal element counts per layer."""
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    norms = torch.as_tensor(norms, dtype=torch.float64)
    if tuple(norms.shape) != (L, H, 2):
        raise RateQError(f"projection norms have shape {tuple(norms.shape)}, expected {(L, H, 2)}")
    bits = tuple(int(b) for b in bits)
    quantizers = list(quantizers)
    law = 2.0 ** (-2 * torch.tensor(bits, dtype=torch.float64))  # (NB,)
    holds = torch.tensor([[holds_role(q, role, D) for q in quantizers] for role in ("k", "v")])  # (2, Q)
    if not holds.any(1).all():
        raise RateQError(f"weight-norm quantizers {', '.join(q.id for q in quantizers)} cannot hold both keys and "
                         f"values of {D}-dim heads")
    scale = torch.where(holds, 1.0, float("inf")).to(torch.float64)  # (2, Q)
    layer = norms.sum(1)  # (L, 2)
    distortion = layer[:, None, :, None, None] * scale[None, None, :, :, None] * law  # (L, 1, 2, Q, NB)
    counts = torch.full((L, 1, 2), float(H * D))
    return Curves(distortion, bits, quantizers, counts, WNORM_METRIC, layer_fingerprint(fp),
                  {"data": "none: projection weight norms", "law": "||W||_F^2 * 2^(-2b)", "allocation": "per layer"})


def solve_weight_norm(curves: Curves, budget: float) -> Plan:
    """The layer plan of the weight-norm curves at `budget`: `rateq.solve`'s greedy, keys ≥ values per layer.
    Raises RateQError (with the feasible range) when the budget cannot be met from these widths."""
    return solve(curves, budget, method="greedy", keys_at_least_values=True)


def per_head_plan(layer_plan: Plan, fp: ModelFingerprint) -> Plan:
    """A layer plan (one unit per layer and role) given to every KV head of each layer of `fp`."""
    L, H = fp.num_layers, fp.num_kv_heads
    wide = lambda t: t.expand(L, H).clone()  # noqa: E731
    return Plan(wide(layer_plan.k_bits), wide(layer_plan.v_bits), wide(layer_plan.k_quantizer),
                wide(layer_plan.v_quantizer), layer_plan.quantizers, fp, budget_bits=layer_plan.budget_bits,
                policy=layer_plan.policy, calibration=dict(layer_plan.calibration),
                solver={**layer_plan.solver, "allocation": "per layer"})


def check_weight_norm(config, budget: float, *, quantizers=WNORM_QUANTIZERS, bits=WNORM_BITS) -> None:
    """Every check of `weight_norm` that needs only the model's shape (a config, no weights): the quantizers
    hold both roles and `budget` is within the range these widths can store."""
    fp = fingerprint(config)
    curves = weight_norm_curves(fp, torch.ones(fp.num_layers, fp.num_kv_heads, 2), quantizers=quantizers,
                                bits=bits)
    try:
        solve_weight_norm(curves, budget)
    except RateQError as exc:
        raise RateQError(f"wnorm@{fmt_bits(budget)}: {exc}") from None


def weight_norm(model, budget: float, *, quantizers=WNORM_QUANTIZERS, bits=WNORM_BITS) -> Method:
    """The weight-norm baseline at `budget` (see the module docstring): per-layer key-favoured K/V widths from
    the projection norms, allocated by `rateq.solve`'s greedy."""
    fp = fingerprint(model)
    curves = weight_norm_curves(fp, projection_norms(model), quantizers=quantizers, bits=bits)
    try:
        plan = per_head_plan(solve_weight_norm(curves, budget), fp)
    except RateQError as exc:
        raise RateQError(f"wnorm@{fmt_bits(budget)}: {exc}") from None
    pairs = sorted({(int(k), int(v)) for k, v in zip(plan.k_bits[:, 0], plan.v_bits[:, 0])}, reverse=True)
    counts = {p: int(((plan.k_bits[:, 0] == p[0]) & (plan.v_bits[:, 0] == p[1])).sum()) for p in pairs}
    return Method.from_plan(plan, f"wnorm@{fmt_bits(budget)}", family="wnorm", budget=budget,
                            label="keys-favoured weight-norm allocator (per layer)",
                            notes="layers " + ", ".join(f"K{k}V{v}×{counts[(k, v)]}" for k, v in pairs) + "; "
                            + ", ".join(q.id for q in plan.quantizers))
