"""Fused linear cross-entropy: the loss of a classifier head without its (N, V) logits."""

from .api import IMPLEMENTATIONS, LinearCrossEntropy, linear_cross_entropy

__all__ = ["IMPLEMENTATIONS", "LinearCrossEntropy", "linear_cross_entropy"]
