"""Profiles: a plan on disk as safetensors (data, never code), and the plan as JSON for other tools.

Tensors: `k_bits`, `v_bits`, `k_quantizer`, `v_quantizer` `(L, H)` int64, `weights` `(L, H, 2)` float64 (elements
per unit, which the effective bits are averaged over), and optionally the curves the plan was solved from
(`curves.distortion`, `curves.counts`). Metadata (string → string): `format` "rateq.profile", `version`, the
model fingerprint (with the model's parameter count when calibration had the model; older profiles lack it),
quantizer specs, budget, nominal and effective bits, policy, calibration and solver facts (JSON), and the rateq
version that wrote it. Writing is atomic; loading checks format, version, shapes and the stored bit figures,
and — given a model — the fingerprint, naming each difference.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .curves import Curves, curves_from_metadata
from .errors import RateQError
from .io import atomic_write, meta_json, read_safetensors, write_safetensors
from .models import ModelFingerprint, fingerprint
from .plan import Plan, learned_facts, policy_from_dict
from .quant.spec import QuantSpec

# What a damaged file's metadata can make the parsers raise; every one becomes a RateQError naming the file.
_PARSE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError)

PROFILE_FORMAT = "rateq.profile"
PROFILE_VERSION = "1"
PLAN_FORMAT = "rateq.plan"
PLAN_VERSION = "1"
_PLAN_TENSORS = ("k_bits", "v_bits", "k_quantizer", "v_quantizer")


def _rateq_version() -> str:
    from . import __version__

    return __version__


def _as_fingerprint(model) -> ModelFingerprint:
    if isinstance(model, ModelFingerprint):
        return model
    if isinstance(model, dict):
        return ModelFingerprint.from_dict(model)
    if isinstance(model, (str, os.PathLike)):
        raise RateQError("check a profile against a loaded model, its config or a ModelFingerprint, not a name; "
                         "e.g. load_profile(path, model=rateq.load_model(name)[0])")
    return fingerprint(model)


def check_model(plan: Plan, model, *, source: str = "plan") -> None:
    """Raise a RateQError naming every shape difference between the plan's model and `model`."""
    fp = _as_fingerprint(model)
    diffs = plan.model.mismatches(fp)
    if diffs:
        raise RateQError(f"{source} was made for {plan.model.name} and does not fit {fp.name}: "
                         f"{'; '.join(diffs)} (profile vs model); calibrate this model or load its own profile")


# -- safetensors profile ---------------------------------------------------------------------------------

def save_profile(plan: Plan, path: str | os.PathLike, *, curves: Curves | None = None) -> Path:
    """Write `plan` (and optionally the curves behind it) to `path` atomically; returns the path."""
    if not isinstance(plan, Plan):
        raise RateQError(f"save_profile needs a rateq.Plan, got {type(plan).__name__}")
    tensors = {name: getattr(plan, name).to(torch.int64) for name in _PLAN_TENSORS}
    if plan.weights is not None:
        tensors["weights"] = plan.weights.to(torch.float64)
    tensors.update({f"param.{k}": _stored_param(k, v) for k, v in plan.params.items()})
    meta = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": json.dumps(plan.model.to_dict()),
        "quantizers": json.dumps([q.to_dict() for q in plan.quantizers]),
        # repr() of a float round-trips exactly; "null" for hand-made plans without a budget.
        "budget_bits": json.dumps(plan.budget_bits),
        "effective_bits": repr(plan.effective_bits),
        "nominal_bits": repr(plan.nominal_bits),
        "policy": json.dumps(plan.policy.to_dict()),
        "calibration": json.dumps(plan.calibration, default=str),
        "solver": json.dumps(plan.solver, default=str),
        "rateq_version": _rateq_version(),
    }
    if curves is not None:
        if curves.model.mismatches(plan.model):
            raise RateQError(f"curves are for {curves.model.name}, the plan for {plan.model.name}: "
                             + "; ".join(curves.model.mismatches(plan.model)))
        tensors["curves.distortion"] = curves.distortion
        tensors["curves.counts"] = curves.counts
        tensors.update({f"curves.param.{k}": _stored_param(k, v) for k, v in curves.params.items()})
        meta["curves"] = json.dumps({"bits": list(curves.bits), "quantizers": [q.to_dict() for q in curves.quantizers],
                                     "metric": curves.metric, "calibration": curves.calibration}, default=str)
    return write_safetensors(path, tensors, meta)


def _read_profile(path) -> tuple[dict, dict]:
    tensors, meta = read_safetensors(path, "profile")
    if meta.get("format") != PROFILE_FORMAT:
        what = "a curves file — solve it first (`rateq solve`)" if meta.get("format") == "rateq.curves" else \
            f"not a rateq profile (format {meta.get('format')!r})"
        raise RateQError(f"{path} is {what}")
    if meta.get("version") != PROFILE_VERSION:
        raise RateQError(f"{path} is profile version {meta.get('version')!r}; this rateq "
                         f"({_rateq_version()}) reads version {PROFILE_VERSION}; re-solve it from its curves")
    return tensors, meta


def _specs(value) -> list[QuantSpec]:
    if not all(isinstance(q, dict) for q in value):
        raise ValueError("metadata 'quantizers' must be a list of spec objects")
    return [QuantSpec.from_dict(q) for q in value]


def _plan_tensor(tensors: dict, name: str) -> torch.Tensor:
    t = tensors[name]
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"tensor {name!r} holds {str(t.dtype).replace('torch.', '')}, not integers")
    return t


def _stored_param(key: str, t: torch.Tensor) -> torch.Tensor:
    """Codebooks are kept in fp16 (calibration rounds their centroids to it); scales in fp32."""
    return t.to(torch.float16) if ".codebook" in key else t


def _params(tensors: dict, prefix: str) -> dict:
    """The learned parameters stored under `prefix` (static scales, by `rateq.quant.static.scale_key`)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_profile(path: str | os.PathLike, model=None) -> Plan:
    """The plan stored at `path`. With `model` (a model, config or `ModelFingerprint`), also check it fits.

    Any damage (missing or malformed tensors or metadata, figures that disagree with the tensors) is one
    RateQError naming the file."""
    tensors, meta = _read_profile(path)
    try:
        weights = tensors.get("weights")
        if weights is not None and not weights.is_floating_point():
            raise ValueError(f"tensor 'weights' holds {str(weights.dtype).replace('torch.', '')}, not real numbers")
        plan = Plan(
            **{name: _plan_tensor(tensors, name) for name in _PLAN_TENSORS},
            quantizers=_specs(meta_json(meta, "quantizers", list)),
            model=ModelFingerprint.from_dict(meta_json(meta, "model", dict)),
            budget_bits=meta_json(meta, "budget_bits"),
            policy=policy_from_dict(meta_json(meta, "policy")),
            calibration=meta_json(meta, "calibration", dict),
            solver=meta_json(meta, "solver", dict),
            weights=weights,
            params=_params(tensors, "param."),
        )
        try:
            stored = float(meta["effective_bits"])
        except ValueError:
            raise ValueError(f"metadata 'effective_bits' is not a number: {meta['effective_bits'][:40]!r}") from None
        effective = plan.effective_bits
    except KeyError as exc:
        raise RateQError(f"{path} is a damaged profile (missing {exc})") from None
    except _PARSE_ERRORS as exc:
        raise RateQError(f"{path} is a damaged profile ({exc})") from None
    except RateQError as exc:
        raise RateQError(f"{path} is a damaged profile: {exc}") from None
    if not math.isfinite(stored) or not math.isfinite(effective) or \
            abs(stored - effective) > 1e-9 * max(1.0, abs(stored)):
        raise RateQError(f"{path} is a damaged profile: it says {stored} effective bits, its tensors give "
                         f"{effective}")
    if model is not None:
        check_model(plan, model, source=f"profile {path}")
    return plan


def load_profile_curves(path: str | os.PathLike) -> Curves | None:
    """The curves stored inside a profile, or None if it was saved without them."""
    tensors, meta = _read_profile(path)
    if "curves" not in meta:
        return None
    try:
        c = meta_json(meta, "curves", dict)
        fields = {"bits": json.dumps(c["bits"]), "quantizers": json.dumps(c["quantizers"]), "metric": c["metric"],
                  "model": meta["model"], "calibration": json.dumps(c.get("calibration", {}))}
        stored = {"distortion": tensors["curves.distortion"], "counts": tensors["curves.counts"],
                  **{f"param.{k}": v for k, v in _params(tensors, "curves.param.").items()}}
    except KeyError as exc:
        raise RateQError(f"{path} has damaged curves (missing {exc})") from None
    except _PARSE_ERRORS as exc:
        raise RateQError(f"{path} has damaged curves ({exc})") from None
    return curves_from_metadata(path, stored, fields, what="curves stored in the profile")


# -- JSON ------------------------------------------------------------------------------------------------

def plan_to_json(plan: Plan) -> dict:
    """The plan as rateq's plan JSON document (a dict; `json.dumps` it): per layer, each KV head's K and V bits
    and quantizer. Quantizers are keyed by spec id, and each head's `k_quantizer` / `v_quantizer` names one of
    those ids. `policy` and `solver` ride along."""
    ids = [q.id for q in plan.quantizers]
    if len(set(ids)) != len(ids):
        raise RateQError(f"plan has duplicate quantizer ids {ids}")
    layers = []
    for l in range(plan.num_layers):
        layers.append({
            "layer": l,
            "k_bits": plan.k_bits[l].tolist(),
            "v_bits": plan.v_bits[l].tolist(),
            "k_quantizer": [ids[i] for i in plan.k_quantizer[l].tolist()],
            "v_quantizer": [ids[i] for i in plan.v_quantizer[l].tolist()],
        })
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "model": plan.model.to_dict(),
        "budget_bits": plan.budget_bits,
        "effective_bits": plan.effective_bits,
        "nominal_bits": plan.nominal_bits,
        "quantizers": {q.id: q.to_dict() for q in plan.quantizers},
        "layers": layers,
        # learned parameters (static scales, codebooks) by name (rateq.quant.params), as nested lists
        **({"params": {key: t.tolist() for key, t in plan.params.items()}} if plan.params else {}),
        "calibration": plan.calibration,
        "policy": plan.policy.to_dict(),
        "solver": plan.solver,
    }


def plan_from_json(doc: dict | str) -> Plan:
    """A plan from `plan_to_json`'s document (or its text). Unit sizes are not part of the JSON: the plan
    comes back unweighted, so its effective bits are a plain mean over units."""
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as exc:
            raise RateQError(f"plan JSON does not parse: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise RateQError(f"not a rateq plan JSON (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != PLAN_VERSION:
        raise RateQError(f"plan JSON version {doc.get('version')!r}; this rateq reads {PLAN_VERSION}")
    try:
        if not isinstance(doc["quantizers"], dict) or not isinstance(doc["layers"], list):
            raise TypeError("quantizers must be an object keyed by id and layers a list")
        ids = list(doc["quantizers"])
        quantizers = [QuantSpec.from_dict(doc["quantizers"][i]) for i in ids]
        layers = sorted(doc["layers"], key=lambda r: r["layer"])
        col = lambda key: torch.tensor([r[key] for r in layers], dtype=torch.int64)  # noqa: E731
        qcol = lambda key: torch.tensor([[ids.index(q) for q in r[key]] for r in layers], dtype=torch.int64)  # noqa: E731
        return Plan(k_bits=col("k_bits"), v_bits=col("v_bits"), k_quantizer=qcol("k_quantizer"),
                    v_quantizer=qcol("v_quantizer"), quantizers=quantizers,
                    model=ModelFingerprint.from_dict(doc["model"]), budget_bits=doc.get("budget_bits"),
                    policy=policy_from_dict(doc.get("policy", {})), calibration=doc.get("calibration", {}),
                    solver=doc.get("solver", {}),
                    params={k: torch.tensor(v, dtype=torch.float32) for k, v in doc.get("params", {}).items()})
    except (*_PARSE_ERRORS, RuntimeError) as exc:
        raise RateQError(f"plan JSON is damaged (missing or bad {exc})") from None


def write_plan_json(plan: Plan, path: str | os.PathLike) -> Path:
    """Write `plan_to_json(plan)` to `path` atomically (a temporary file, then a rename; nothing left on failure)."""
    path = Path(path)
    text = json.dumps(plan_to_json(plan), indent=2, default=str) + "\n"
    with atomic_write(path, "plan JSON") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -- presentation ----------------------------------------------------------------------------------------

def plan_summary(plan: Plan) -> dict:
    """What `rateq show` prints: budget, effective and nominal bits, K vs V mean code bits, per-layer means,
    quantizer use, the learned parameters' bytes and share of the model's fp16 weights (`rateq.plan.learned_facts`:
    no share when the plan's fingerprint has no parameter count), and the solver's and calibration's facts."""
    use: dict[str, dict[str, int]] = {}
    for role in ("k", "v"):
        counts = torch.bincount(plan.quantizer_ids(role).flatten(), minlength=len(plan.quantizers))
        for q, n in zip(plan.quantizers, counts.tolist()):
            use.setdefault(q.id, {"k": 0, "v": 0})[role] = int(n)
    return {
        "model": plan.model.to_dict(),
        "budget_bits": plan.budget_bits,
        "effective_bits": plan.effective_bits,
        "nominal_bits": plan.nominal_bits,
        "k_bits": plan.mean_bits("k"),
        "v_bits": plan.mean_bits("v"),
        "layers": [{"layer": l, "k_bits": float(plan.k_bits[l].double().mean()),
                    "v_bits": float(plan.v_bits[l].double().mean())} for l in range(plan.num_layers)],
        "quantizers": use,
        **learned_facts(plan.learned_nbytes(), plan.model.num_parameters),
        "policy": plan.policy.to_dict(),
        "solver": plan.solver,
        "calibration": plan.calibration,
    }
