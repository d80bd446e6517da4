"""The runtime: a transformers cache that holds each KV head packed at its planned bits."""

from .cache import RateQCache
from .layer import RateQLayer, RateQSlidingLayer

__all__ = ["RateQCache", "RateQLayer", "RateQSlidingLayer"]
