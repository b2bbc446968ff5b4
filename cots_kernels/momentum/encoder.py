"""MomentumEncoder: the momentum (key) copy of an online encoder and its EMA update."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .api import momentum_update_
from .problem import is_dense
from .schedule import MomentumSchedule

MODES = ("eval", "follow")

# Offsets of the parameters inside a flat buffer are rounded up to 64 bytes, so every view
# starts 16-byte aligned (the vector loads of the kernels) and on its own cache line;
# the padding is under 64 B x ~400 tensors for ViT-B/16 + BERT-base.
_FLAT_ALIGN_BYTES = 64


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(module, wrappers):
        module = module.module
    return module


def _flat_view(flat: torch.Tensor, like: torch.Tensor, offset: int) -> torch.Tensor:
    """``like.numel()`` elements of ``flat`` from ``offset``, viewed with ``like``'s strides
    when those are dense but permuted (channels_last weights), else contiguously."""
    if is_dense(like) and not like.is_contiguous():
        return flat.as_strided(like.shape, like.stride(), offset)
    return flat[offset : offset + like.numel()].view(like.shape)


class MomentumEncoder(nn.Module):
    """A momentum copy of ``module``, updated in place by an EMA of its parameters.

    Holds ``self.module``, a deep copy of the online module whose parameters never
    require grad, and a reference to the online module (not a submodule: it is not in
    this module's ``state_dict`` or ``parameters()``). :meth:`update` runs
    ``momentum_update_`` over all parameter pairs (one fused pass; one kernel launch per
    dtype pair on CUDA) and copies the buffers (BatchNorm statistics, position ids);
    calling the encoder runs the copy under ``torch.no_grad()``.

    Under DistributedDataParallel the online parameters are identical on every rank
    after each optimizer step, and the update is deterministic, so the momentum copies
    stay identical without communication; pass the DDP-wrapped module or the inner one.

    Args:
        module: the online encoder (possibly wrapped in DDP / DataParallel).
        momentum: the base momentum m of ``m * copy + (1 - m) * online``, in [0, 1].
        schedule: "constant", or "cosine" (BYOL: m rises to ``final_momentum`` over
            ``total_steps`` updates, then stays).
        flat: store the momentum parameters as views into one contiguous buffer per
            (device, dtype), so the copy is one allocation and its update one contiguous
            stream; the layout survives ``.to()`` and ``load_state_dict``.
        total_steps: length of the cosine schedule, in updates.
        final_momentum: where the cosine schedule ends (BYOL: 1.0).
        dtype: store the copy's floating parameters and buffers in this dtype (e.g.
            torch.float32 for a bf16 online module); None keeps the online dtypes.
        mode: "eval" keeps the copy in eval mode whatever ``.train()`` says (dropout off,
            BatchNorm on running statistics: deterministic keys); "follow" lets it follow
            ``.train()`` / ``.eval()`` like any submodule, as MoCo and ALBEF do.
        impl: passed to :func:`momentum_update_`.

    The step count lives in the state_dict (``_extra_state``), so a resumed run continues
    the schedule where it stopped. It is counted in the buffer ``updates`` (a 0-dim int64
    tensor on the module's device, incremented in place), so that neither an update nor a
    torch.compile'd graph of it reads or guards on a Python int that changes every step;
    :attr:`step` reads it on the host. The cosine schedule, whose momentum is a host float
    handed to the kernels, also keeps a host copy of the count, so a compiled update
    with it recompiles each step: compile with the constant schedule.
    """

    def __init__(
        self,
        module: nn.Module,
        momentum: float = 0.995,
        schedule: str = "constant",
        flat: bool = True,
        *,
        total_steps: int | None = None,
        final_momentum: float = 1.0,
        dtype: torch.dtype | None = None,
        mode: str = "eval",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.schedule = MomentumSchedule(schedule, momentum, final_momentum, total_steps)
        self.flat = bool(flat)
        self.mode = mode
        self.impl = impl
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64), persistent=False)
        self._schedule_step = 0  # the cosine schedule's host copy of the count
        online = unwrap(module)
        # Not registered as a submodule: the online encoder belongs to the model.
        self.__dict__["_online"] = online

        clone = copy.deepcopy(online)
        for p in clone.parameters():
            p.requires_grad_(False)
            p.grad = None
        if dtype is not None:
            for t in list(clone.parameters()) + list(clone.buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
        self.module = clone
        self._flat_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        if self.flat:
            self._flatten()
        self.train(self.training)
        self.register_load_state_dict_post_hook(MomentumEncoder._after_load)

    @property
    def online(self) -> nn.Module:
        """The online module whose parameters are averaged."""
        return self.__dict__["_online"]

    @property
    def step(self) -> int:
        """Updates done so far (read from the device)."""
        return int(self.updates)

    @step.setter
    def step(self, value: int) -> None:
        self.updates.fill_(value)
        self._schedule_step = int(value)

    @property
    def current_momentum(self) -> float:
        """The momentum the next :meth:`update` will use."""
        return self.schedule(self._schedule_step)

    @property
    def flat_buffers(self) -> list[torch.Tensor]:
        """The contiguous buffers behind the parameters (empty unless ``flat``)."""
        return list(self._flat_buffers.values())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the momentum copy under ``torch.no_grad()``."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step of every parameter, then a copy of every buffer.

        Returns:
            The momentum used; the step count then advances by one.
        """
        momentum = self.current_momentum
        momentum_params, online_params = self._parameter_pairs()
        momentum_update_(momentum_params, online_params, momentum, impl=self.impl)
        for mine, theirs in zip(self.module.buffers(), self.online.buffers()):
            mine.copy_(theirs)
        self.updates.add_(1)
        if self.schedule.kind != "constant":
            self._schedule_step += 1
        return momentum

    def is_flat(self) -> bool:
        """Whether every parameter is currently a view of its flat buffer."""
        for p in self.module.parameters():
            flat = self._flat_buffers.get((p.device, p.dtype))
            if flat is None or p.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                return False
        return True

    def train(self, mode: bool = True) -> MomentumEncoder:
        super().train(mode)
        if self.mode == "eval":
            self.module.eval()
        return self

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = state["step"]

    def extra_repr(self) -> str:
        s = self.schedule
        ramp = f", final={s.final}, total_steps={s.total_steps}" if s.kind == "cosine" else ""
        return f"momentum={s.base}, schedule={s.kind!r}{ramp}, flat={self.flat}, mode={self.mode!r}, step={self.step}"

    def _parameter_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.module.parameters()), list(self.online.parameters())

    def _flatten(self) -> None:
        """Move every parameter into a flat buffer per (device, dtype), as a view."""
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self.module.parameters():
            groups.setdefault((p.device, p.dtype), []).append(p)
        self._flat_buffers = {}
        for (device, dtype), params in groups.items():
            align = max(1, _FLAT_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            offsets, total = [], 0
            for p in params:
                offsets.append(total)
                total += -(-p.numel() // align) * align
            flat = torch.zeros(total, dtype=dtype, device=device)
            for p, offset in zip(params, offsets):
                view = _flat_view(flat, p, offset)
                view.copy_(p.data)
                p.data = view
            self._flat_buffers[(device, dtype)] = flat

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MomentumEncoder:
        # .to() / .half() / .cuda() give every parameter its own storage: re-flatten.
        super()._apply(fn, recurse)
        if self.flat:
            self._flatten()
        return self

    @staticmethod
    def _after_load(module: MomentumEncoder, incompatible_keys: Any) -> None:
        # load_state_dict copies in place (views kept); assign=True replaces parameters.
        if module.flat and not module.is_flat():
            module._flatten()
