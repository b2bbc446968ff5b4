"""The momentum machinery: the fused in-place EMA update and the momentum encoder."""

from .api import IMPLEMENTATIONS, momentum_update_
from .encoder import MomentumEncoder
from .reference import naive_momentum_update_
from .schedule import MomentumSchedule

__all__ = [
    "IMPLEMENTATIONS",
    "MomentumEncoder",
    "MomentumSchedule",
    "momentum_update_",
    "naive_momentum_update_",
]
