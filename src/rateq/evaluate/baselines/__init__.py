"""Baselines at matched storage, each a `Method` that runs through the same one-pass evaluation as a plan.

Names (`rateq eval --baseline NAME`, `rateq.evaluate(model, ids, ["NAME", …])`); `@B` fixes the effective
budget, a name without it is expanded at every `--budget`:

| name | what |
| --- | --- |
| `fp` | full precision (the model as is; 16 bits per element if the cache held fp16) |
| `KxVy[:SPEC]` | fixed split, x-bit keys and y-bit values, quantizer SPEC (default `minmax-g32-fp16`) |
| `kivi@B` | uniform KIVI-style b bits, asymmetric min-max, group size chosen so that b + 32/G = B |
| `splits@B` | every fixed split KxVy (x ≠ y, |x − y| ≤ 2) whose bits and group size match B exactly |
| `wnorm@B` | "Quantize What Counts": per-layer key-favoured K/V widths ≥ 2 from projection weight norms, data-free |
| `waterfill@B` | RateQuant-style: fitted D(b) = α·β^(−b) per head and reverse waterfilling (`rateq.solve`) |
| `rateq@B` | rateq's own plan: `rateq.calibrate` + `rateq.solve` at budget B |
| `modelopt@B`, `vllm@B`, `sglang@B`, `trtllm@B`, `llamacpp@B` | the best plan that engine runs (`rateq.engines.solve_for`) on the same curves, which must hold its formats |
| `rank@B`, `rankR` | per-head PCA keeping r of D dims in fp16 (r = B·D/16); `rankR` keeps R dims |
| `hybrid@B` | PCA to D/2 dims, then KIVI-style quantization of the coefficients at the bits that fit B |
| `rot-{identity,hadamard,random,pca}@B`, `rotations@B` | `kivi@B` after rotating each head by an orthogonal matrix |
| `reference` | the reference table of `results/reference.md`: fp, K8V8 … K2V2 and rank 32/16 of 64, fp32 scales |
| a `.safetensors` path | a profile (`rateq.load_profile`), run under its own cache policy |

Names of fixed storage (`fp`, `KxVy`, `rankR`, `reference`, profiles) take no `@B`. `parse_name` checks a name
without a model, `check_name` adds every check that needs only the model's config.

Matched storage: a row is *matched* at a compared budget B when it was built for B and stores at most B
effective bits, or when it stores exactly B (a fixed split, a profile); other rows are reported apart, as
not matched, and get no KIVI comparison. Every default baseline is built at the compared budgets.

Storage accounting: `effective_bits` = code bits + metadata bits (scales, zero-points) per element, the same
count as `QuantSpec.bits_per_element`. Rank reduction stores `r` fp16 coefficients per token and head:
`16·r/D` bits per element; the basis (`D·r` fp16 numbers plus a mean of `D` per unit) is a per-model constant,
like a codebook, and is reported in the row's notes rather than spread over an arbitrary sequence length.

The package, by job: `context` (calibration data and what is derived from it), `matched` (matched-bits
search), `families` (the Method builders), `weight_norm` (the weight-norm allocator), `names` (the names).
"""

from .context import BaselineContext
from .families import (REFERENCE_SPEC, REFERENCE_SPLITS, ROTATIONS, engine_plan, fixed_split, full_precision, hybrid,
                       kivi, profile, rank, rateq_plan, reference, reference_rank, rotated, splits, waterfill)
from .matched import GROUP_SIZES, check_budget, matched_splits, matched_uniform
from .names import DEFAULT_BASELINES, BaselineName, build, check_name, is_profile_name, parse_name
from .weight_norm import (WNORM_BITS, WNORM_QUANTIZERS, check_weight_norm, projection_norms, weight_norm,
                          weight_norm_curves)

__all__ = [
    "DEFAULT_BASELINES", "GROUP_SIZES", "REFERENCE_SPEC", "REFERENCE_SPLITS", "ROTATIONS", "WNORM_BITS",
    "WNORM_QUANTIZERS", "BaselineContext", "BaselineName", "build", "check_budget", "check_name",
    "check_weight_norm", "engine_plan", "fixed_split", "full_precision", "hybrid", "is_profile_name", "kivi", "matched_splits",
    "matched_uniform", "parse_name", "profile", "projection_norms", "rank", "rateq_plan", "reference",
    "reference_rank", "rotated", "splits", "waterfill", "weight_norm", "weight_norm_curves",
]
