"""The runtime: a transformers cache that holds each KV head packed at its planned bits."""

from .cache import RateQCache, rotary_of
from .layer import RateQLayer, RateQSlidingLayer

__all__ = ["RateQCache", "rotary_of", "RateQLayer", "RateQSlidingLayer"]
