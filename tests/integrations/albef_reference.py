"""ALBEF's image-text contrastive loss and queue update, written out from its published
formulas (ALBEF's code is not on PyPI): the oracle of the ITCLoss tests.

Queues are (D, Q), as ALBEF stores them; the batch's momentum features are concatenated
before a clone of the queue, the targets mix the momentum similarities' softmax with the
positives, and the queue is written at ``ptr`` in place of the oldest columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_ita(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    idx: torch.Tensor | None = None,
    idx_queue: torch.Tensor | None = None,
) -> torch.Tensor:
    """(loss_i2t + loss_t2i) / 2. Without ``idx`` the positive of row r is column r (ALBEF
    pre-training); with ``idx`` and ``idx_queue`` every column of the same id is a positive,
    with equal weight (ALBEF retrieval fine-tuning)."""
    image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)  # (D, B + Q)
    text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
    with torch.no_grad():
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        if idx is None:
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
        else:
            idx = idx.view(-1, 1)
            pos_idx = torch.eq(idx, torch.cat([idx.t(), idx_queue], dim=1)).to(sim_i2t_m.dtype)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def dequeue_and_enqueue(state: dict[str, torch.Tensor], image_feats: torch.Tensor, text_feats: torch.Tensor,
                        idxs: torch.Tensor | None = None) -> None:  # fmt: skip
    """ALBEF's queue update of the (gathered) momentum features, in place in ``state``."""
    batch = image_feats.shape[0]
    ptr = int(state["queue_ptr"])
    assert state["image_queue"].shape[1] % batch == 0  # ALBEF's own assumption
    state["image_queue"][:, ptr : ptr + batch] = image_feats.T
    state["text_queue"][:, ptr : ptr + batch] = text_feats.T
    if idxs is not None:
        state["idx_queue"][:, ptr : ptr + batch] = idxs.view(-1, 1).T
    state["queue_ptr"][0] = (ptr + batch) % state["image_queue"].shape[1]
