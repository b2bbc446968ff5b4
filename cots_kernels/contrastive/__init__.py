"""The queue contrastive loss with KL alignment (COTS instance and task levels)."""

from .api import IMPLEMENTATIONS, ContrastiveOutput, CotsContrastiveLoss, cots_contrastive_loss

__all__ = ["IMPLEMENTATIONS", "ContrastiveOutput", "CotsContrastiveLoss", "cots_contrastive_loss"]
