"""Attention with key padding masks: Triton flash-style kernels, SDPA fallback, the layer."""

from .api import IMPLEMENTATIONS, SelfAttention, attention

__all__ = ["IMPLEMENTATIONS", "SelfAttention", "attention"]
