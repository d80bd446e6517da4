"""`Curves`: measured distortion of every unit under every candidate (quantizer, bits) — calibration's output.

`distortion[l, h, r, q, i]` is the distortion of layer l, KV head h, role r (0 = K, 1 = V) under quantizer
`quantizers[q]` at `bits[i]` code bits. `counts[l, h, r]` is the number of cached elements the unit holds per
sequence (the solver's weights `n_u`). `params` holds what calibration learned for quantizers that need it —
static scales, codebooks (`rateq.quant.params`) — and goes into the plans solved from the curves. Saved as safetensors with JSON metadata; no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from numbers import Integral

import torch

from .errors import RateQError
from .io import meta_json, read_safetensors, write_safetensors
from .models import ModelFingerprint
from .plan import policy_from_dict
from .quant.spec import FULL_PRECISION_BITS, QuantSpec
from .quant.params import check_params, wanted_params

CURVES_FORMAT = "rateq.curves"
CURVES_VERSION = "1"


@dataclass
class Curves:
    distortion: torch.Tensor  # (L, H, 2, Q, NB) float64
    bits: tuple[int, ...]  # (NB,) code bit widths, increasing
    quantizers: list[QuantSpec]  # (Q,)
    counts: torch.Tensor  # (L, H, 2) elements per unit
    metric: str
    model: ModelFingerprint
    calibration: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # learned per-unit parameters by name (see module doc)

    def __post_init__(self):
        self.distortion = torch.as_tensor(self.distortion, dtype=torch.float64)
        self.counts = torch.as_tensor(self.counts, dtype=torch.float64)
        if any(isinstance(b, bool) or not isinstance(b, Integral) for b in self.bits):
            raise RateQError(f"curve bit widths must be whole numbers, got {list(self.bits)}")
        self.bits = tuple(int(b) for b in self.bits)
        bad = [b for b in self.bits if not (1 <= b <= 8 or b == FULL_PRECISION_BITS)]
        if bad:
            raise RateQError(f"curve bit widths must be 1..8 or {FULL_PRECISION_BITS}, got {bad}")
        self.quantizers = list(self.quantizers)
        if not self.quantizers or not all(isinstance(q, QuantSpec) for q in self.quantizers):
            raise RateQError("curves need at least one quantizer, each a QuantSpec")
        if not isinstance(self.model, ModelFingerprint):
            raise RateQError(f"curves' model is a ModelFingerprint, got {type(self.model).__name__}")
        if not isinstance(self.metric, str) or not isinstance(self.calibration, dict):
            raise RateQError("curves' metric is a name and their calibration facts a dict")
        L, H = self.model.num_layers, self.model.num_kv_heads
        want = (L, H, 2, len(self.quantizers), len(self.bits))
        if tuple(self.distortion.shape) != want:
            raise RateQError(f"curves have shape {tuple(self.distortion.shape)}, expected {want}")
        if tuple(self.counts.shape) != (L, H, 2):
            raise RateQError(f"curve counts have shape {tuple(self.counts.shape)}, expected {(L, H, 2)}")
        if list(self.bits) != sorted(set(self.bits)):
            raise RateQError(f"curve bit widths must be increasing and distinct, got {self.bits}")
        pairs = [(q, b) for q in self.quantizers for b in self.bits if q.allows_bits(b)]
        self.params = check_params(self.params, wanted_params(pairs, L, H, self.model.head_dim), "curves")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.distortion.shape)

    def cost(self, learned_tokens: int | None = None) -> torch.Tensor:
        """`(Q, NB)` effective bits per element of every candidate; with `learned_tokens`, learned parameters
        (codebooks, static scales) charged as if spread over that many cached tokens
        (`QuantSpec.learned_bits_per_element`)."""
        D = self.model.head_dim
        extra = (lambda q, b: q.learned_bits_per_element(b, learned_tokens, D)) if learned_tokens else (lambda q, b: 0.0)
        return torch.tensor([[q.bits_per_element(b) + extra(q, b) for b in self.bits] for q in self.quantizers],
                            dtype=torch.float64)

    def nonmonotone(self, rtol: float = 1e-9) -> list[tuple[int, int, int, int, int]]:
        """Points where more bits gave more distortion than the previous width: (l, h, r, q, i) indices."""
        d = self.distortion
        # +inf marks a candidate that does not exist (a role or width the quantizer lacks), never a rise
        worse = (d[..., 1:] > d[..., :-1] * (1 + rtol) + 1e-30) & torch.isfinite(d[..., 1:])
        return [tuple(int(v) for v in idx[:-1]) + (int(idx[-1]) + 1,) for idx in worse.nonzero()]

    def monotone(self) -> "Curves":
        """A copy whose curves never rise with bits (running minimum): what the solvers consume."""
        d = torch.cummin(self.distortion, dim=-1).values
        return Curves(d, self.bits, self.quantizers, self.counts, self.metric, self.model, dict(self.calibration),
                      dict(self.params))

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path) -> None:
        metadata = {
            "format": CURVES_FORMAT,
            "version": CURVES_VERSION,
            "model": json.dumps(self.model.to_dict()),
            "bits": json.dumps(list(self.bits)),
            "quantizers": json.dumps([q.to_dict() for q in self.quantizers]),
            "metric": self.metric,
            "calibration": json.dumps(self.calibration, default=str),
        }
        tensors = {"distortion": self.distortion, "counts": self.counts}
        tensors.update({f"param.{k}": v.to(torch.float16) if ".codebook" in k else v for k, v in self.params.items()})
        write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path) -> "Curves":
        """The curves at `path`; any damage (malformed tensors or metadata) is one RateQError naming the file."""
        tensors, meta = read_safetensors(path, "curves file")
        if meta.get("format") != CURVES_FORMAT:
            what = "a profile, not curves (its curves are kept in P.curves.safetensors beside it)" \
                if meta.get("format") == "rateq.profile" else f"not a rateq curves file (format {meta.get('format')!r})"
            raise RateQError(f"{path} is {what}")
        if meta.get("version") != CURVES_VERSION:
            raise RateQError(f"{path} has curves version {meta.get('version')!r}; this rateq reads {CURVES_VERSION}")
        return curves_from_metadata(path, tensors, meta)


def curves_from_metadata(path, tensors: dict, meta: dict, what: str = "curves file") -> Curves:
    """`Curves` from stored tensors (`distortion`, `counts`) and metadata strings (`bits`, `quantizers`,
    `metric`, `model`, `calibration`), checked: a RateQError naming `path` for anything malformed."""
    try:
        distortion, counts = tensors["distortion"], tensors["counts"]
        for name, t in (("distortion", distortion), ("counts", counts)):
            if not t.is_floating_point():
                raise ValueError(f"tensor {name!r} holds {str(t.dtype).replace('torch.', '')}, not real numbers")
        bits = meta_json(meta, "bits", list)
        specs = meta_json(meta, "quantizers", list)
        if not all(isinstance(q, dict) for q in specs):
            raise ValueError("metadata 'quantizers' must be a list of spec objects")
        model = meta_json(meta, "model", dict)
        calibration = meta_json(meta, "calibration", dict, default="{}")
        if "policy" in calibration:
            policy_from_dict(calibration["policy"], "the calibration policy")
        curves = Curves(distortion=distortion, bits=tuple(bits), quantizers=[QuantSpec.from_dict(q) for q in specs],
                        counts=counts, metric=meta["metric"], model=ModelFingerprint.from_dict(model),
                        calibration=calibration,
                        params={k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})
    except KeyError as exc:
        raise RateQError(f"{path} is a damaged {what} (missing {exc})") from None
    except (TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        raise RateQError(f"{path} is a damaged {what} ({exc})") from None
    except RateQError as exc:
        raise RateQError(f"{path} is a damaged {what}: {exc}") from None
    d = curves.distortion
    if bool(torch.isnan(d).any()) or bool((d < 0).any()):
        raise RateQError(f"{path} is a damaged {what}: distortion must be non-negative numbers (+inf marks a role "
                         "a quantizer cannot hold), found NaN or negative values")
    c = curves.counts
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()) or not float(c.sum()) > 0:
        raise RateQError(f"{path} is a damaged {what}: counts must be finite, non-negative and not all zero")
    return curves

