"""What the sigmoid loss's registered ops share: their shape functions and their autograd formula.

Each implementation registers a forward op and a backward op with the same arguments:

- forward(scale, bias, image, text, positive_offset, negative_only, launch) -> rows:
  the per-row losses (B,) in ``scale``'s dtype; ``launch`` is the implementation's
  launch setting (the torch path's chunk width, the Triton path's overrides). Nothing
  else is saved: the loss is elementwise in the logits, so the backward needs no
  per-row statistics, only the inputs, from which it recomputes every tile.
- backward(grad_rows, <the forward's arguments>, needs_grad) -> the gradients of
  (scale, bias, image, text), an empty tensor where ``needs_grad`` is False.
"""

from __future__ import annotations

import torch

from .. import _library

# Arguments of the forward op: 4 tensors (all of them differentiable), 2 options, the launch setting.
_TENSORS, _ARGUMENTS = 4, 7


def forward_fake(scale: torch.Tensor, bias: torch.Tensor, image: torch.Tensor, *args) -> torch.Tensor:
    """The forward op's output for these inputs, uninitialised."""
    return image.new_empty(image.shape[0], dtype=scale.dtype)


def backward_fake(grad_rows, *args) -> tuple[torch.Tensor, ...]:
    """The backward op's outputs for these inputs, uninitialised."""
    tensors, needs_grad = args[:_TENSORS], args[-1]
    return tuple(t.new_empty(t.shape) if need else _library.unused(t) for t, need in zip(tensors, needs_grad))


def register_autograd(forward: torch.library.CustomOpDef, backward: torch.library.CustomOpDef) -> None:
    """Make ``forward`` differentiable through ``backward``."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:_TENSORS])
        ctx.options = inputs[_TENSORS:]

    def backward_formula(ctx, grad_rows):
        needs = list(ctx.needs_input_grad[:_TENSORS])
        grads = backward(grad_rows, *ctx.saved_tensors, *ctx.options, needs)
        return *(g if need else None for g, need in zip(grads, needs)), *(None,) * (_ARGUMENTS - _TENSORS)

    forward.register_autograd(backward_formula, setup_context=setup_context)
