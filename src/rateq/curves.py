"""`Curves`: measured distortion of every unit under every candidate (quantizer, bits) — calibration's output.

`distortion[l, h, r, q, i]` is the distortion of layer l, KV head h, role r (0 = K, 1 = V) under quantizer
`quantizers[q]` at `bits[i]` code bits. `counts[l, h, r]` is the number of cached elements the unit holds per
sequence (the solver's weights `n_u`). Saved as safetensors with JSON metadata; no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .errors import RateQError
from .io import read_safetensors, write_safetensors
from .models import ModelFingerprint
from .quant.spec import QuantSpec

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

    def __post_init__(self):
        self.distortion = torch.as_tensor(self.distortion, dtype=torch.float64)
        self.counts = torch.as_tensor(self.counts, dtype=torch.float64)
        self.bits = tuple(int(b) for b in self.bits)
        L, H = self.model.num_layers, self.model.num_kv_heads
        want = (L, H, 2, len(self.quantizers), len(self.bits))
        if tuple(self.distortion.shape) != want:
            raise RateQError(f"curves have shape {tuple(self.distortion.shape)}, expected {want}")
        if tuple(self.counts.shape) != (L, H, 2):
            raise RateQError(f"curve counts have shape {tuple(self.counts.shape)}, expected {(L, H, 2)}")
        if list(self.bits) != sorted(set(self.bits)):
            raise RateQError(f"curve bit widths must be increasing and distinct, got {self.bits}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.distortion.shape)

    def cost(self) -> torch.Tensor:
        """`(Q, NB)` effective bits per element of every candidate."""
        return torch.tensor([[q.bits_per_element(b) for b in self.bits] for q in self.quantizers], dtype=torch.float64)

    def nonmonotone(self, rtol: float = 1e-9) -> list[tuple[int, int, int, int, int]]:
        """Points where more bits gave more distortion than the previous width: (l, h, r, q, i) indices."""
        d = self.distortion
        worse = d[..., 1:] > d[..., :-1] * (1 + rtol) + 1e-30
        return [tuple(int(v) for v in idx[:-1]) + (int(idx[-1]) + 1,) for idx in worse.nonzero()]

    def monotone(self) -> "Curves":
        """A copy whose curves never rise with bits (running minimum): what the solvers consume."""
        d = torch.cummin(self.distortion, dim=-1).values
        return Curves(d, self.bits, self.quantizers, self.counts, self.metric, self.model, dict(self.calibration))

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
        write_safetensors(path, {"distortion": self.distortion, "counts": self.counts}, metadata)

    @classmethod
    def load(cls, path) -> "Curves":
        tensors, meta = read_safetensors(path, "curves file")
        if meta.get("format") != CURVES_FORMAT:
            raise RateQError(f"{path} is not a rateq curves file (format {meta.get('format')!r})")
        if meta.get("version") != CURVES_VERSION:
            raise RateQError(f"{path} has curves version {meta.get('version')!r}; this rateq reads {CURVES_VERSION}")
        try:
            return cls(
                distortion=tensors["distortion"],
                bits=tuple(json.loads(meta["bits"])),
                quantizers=[QuantSpec.from_dict(q) for q in json.loads(meta["quantizers"])],
                counts=tensors["counts"],
                metric=meta["metric"],
                model=ModelFingerprint.from_dict(json.loads(meta["model"])),
                calibration=json.loads(meta.get("calibration", "{}")),
            )
        except (KeyError, json.JSONDecodeError) as exc:
            raise RateQError(f"{path} is a damaged curves file (missing or bad {exc})") from None
