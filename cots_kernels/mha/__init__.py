"""Attention with key padding masks: Triton flash-style kernels, SDPA fallback, module."""

from .api import IMPLEMENTATIONS, attention
from .module import SelfAttention

__all__ = ["IMPLEMENTATIONS", "SelfAttention", "attention"]
