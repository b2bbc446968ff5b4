"""The sigmoid (SigLIP) contrastive loss, one block or across ranks."""

from .api import IMPLEMENTATIONS, SigmoidContrastiveLoss, sigmoid_contrastive_loss
from .distributed import distributed_sigmoid_loss

__all__ = ["IMPLEMENTATIONS", "SigmoidContrastiveLoss", "distributed_sigmoid_loss", "sigmoid_contrastive_loss"]
