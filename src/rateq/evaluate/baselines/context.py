"""`BaselineContext`: the model and calibration data shared by the baselines that need data, with what they
derive from it (token windows, PCA bases, distortion curves) computed once, on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...calibrate import calibrate
from ...curves import Curves
from ...errors import RateQError
from ...text import DEFAULT_CALIBRATION_TEXT, text_windows
from ..transforms import KVBases, kv_bases


@dataclass
class BaselineContext:
    """Model, tokenizer and calibration data, with the calibrated artefacts computed once, on first use.

    `calibration` is token ids `(N, T)`, a text name, or None (`mix`, `calibration_windows` windows of
    `seq_len` tokens). `curves` are the distortion curves of the waterfill and rateq rows: a `Curves`, a path
    to load them from, or None to calibrate them here when first asked for. Rows that need neither (KIVI,
    fixed splits, the weight-norm allocator) never touch the data."""

    model: object
    tokenizer: object = None
    calibration: object = None
    curves: object = None
    seq_len: int = 1024
    calibration_windows: int = 2
    _bases: KVBases | None = field(default=None, repr=False)
    _ids: torch.Tensor | None = field(default=None, repr=False)

    def ids(self) -> torch.Tensor:
        """The calibration token ids `(N, T)`."""
        if self._ids is None:
            cal = DEFAULT_CALIBRATION_TEXT if self.calibration is None else self.calibration
            if isinstance(cal, torch.Tensor):
                self._ids = cal.long() if cal.dim() == 2 else cal.long()[None]
            else:
                if self.tokenizer is None:
                    raise RateQError("baselines calibrated on text (PCA bases, curves) need the tokenizer, or "
                                     "calibration token ids")
                self._ids = text_windows(self.tokenizer, str(cal), self.calibration_windows, self.seq_len, seed=0)
        return self._ids

    def bases(self) -> KVBases:
        """Per-head PCA bases of the keys and values on the calibration data (rank, hybrid, PCA rotation)."""
        if self._bases is None:
            self._bases = kv_bases(self.model, self.ids())
        return self._bases

    def get_curves(self) -> Curves:
        """The distortion curves of the waterfill and rateq rows: given, loaded from the given path, or
        calibrated on the calibration data."""
        if self.curves is None:
            self.curves = calibrate(self.model, self.tokenizer, self.ids())
        elif isinstance(self.curves, (str, Path)):
            self.curves = Curves.load(self.curves)
        return self.curves

    def describe(self) -> dict:
        """What calibration data and curves the rows used, for the evaluation's settings."""
        out = {}
        if self._ids is not None:
            out["pca"] = {"data": self.calibration if isinstance(self.calibration, str) else
                          (DEFAULT_CALIBRATION_TEXT if self.calibration is None else "token ids"),
                          "windows": int(self._ids.shape[0]), "seq_len": int(self._ids.shape[1])}
        if self.curves is not None and not isinstance(self.curves, (str, Path)):
            out["curves"] = {"metric": self.curves.metric, **dict(self.curves.calibration)}
        return out
