"""rateq: per-head rate-distortion bit allocation for the KV cache of transformers models.

calibrate (measure distortion curves) → solve (bits per head at a budget) → apply (a packed mixed-precision
cache) → eval (perplexity, KL, routing flips at matched storage).
"""

from .calibrate import calibrate, calibrate_metrics
from .curves import Curves
from .errors import RateQError
from .evaluate import Evaluation, evaluate, write_report
from .models import DEFAULT_MODEL, ModelFingerprint, fingerprint, load_model
from .plan import Plan
from .policy import CachePolicy
from .quant.spec import KIVI, QuantSpec, parse_spec
from .simulate import plan_transform, simulate, simulate_plan
from .runtime import RateQCache, rotary_of
from .profile import load_profile, load_profile_curves, plan_from_json, plan_summary, plan_to_json, save_profile
from .solve import budget_range, frontier, solve
from .text import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVAL_TEXT, load_text, text_windows, token_windows, tokenize

__version__ = "0.1.0"

__all__ = [
    "CachePolicy", "Curves", "Evaluation", "evaluate", "write_report", "calibrate", "calibrate_metrics", "DEFAULT_CALIBRATION_TEXT", "DEFAULT_EVAL_TEXT", "DEFAULT_MODEL", "KIVI",
    "ModelFingerprint", "Plan", "QuantSpec", "RateQCache", "RateQError", "fingerprint", "load_model", "load_text", "parse_spec",
    "plan_transform", "rotary_of", "simulate", "simulate_plan", "solve", "frontier", "budget_range",
    "save_profile", "load_profile", "load_profile_curves", "plan_to_json", "plan_from_json", "plan_summary", "text_windows", "token_windows", "tokenize", "__version__",
]
