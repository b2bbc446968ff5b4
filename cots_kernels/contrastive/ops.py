"""What the contrastive loss's registered ops share: their shape functions and their
autograd formula.

Each implementation registers a forward op and a backward op with the same arguments:

- forward(scale, image_query, text_query, image_keys, text_keys, image_queue,
  text_queue, positive_offset, in_batch_negatives, kl_direction, distill_alpha, launch)
  -> (i2t, t2i, kl, saved): the per-row terms, each (B,), and the (rows.SAVED, B) values
  the backward reads; ``launch`` is the implementation's launch setting (the torch
  path's chunk width, the Triton path's overrides).
- backward(grad_i2t, grad_t2i, grad_kl, saved, <the forward's arguments>, needs_grad)
  -> the gradients of (scale, image_query, text_query, image_keys, text_keys), an empty
  tensor where ``needs_grad`` is False.
"""

from __future__ import annotations

import torch

from .. import _library
from . import rows

# Arguments of the forward op: 7 tensors, 4 options, the launch setting.
_TENSORS, _ARGUMENTS = 7, 12
# Of the tensors, the first five can get a gradient (the queues never do).
_DIFFERENTIABLE = 5


def forward_fake(scale: torch.Tensor, image_query: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    """The forward op's outputs for these inputs, uninitialised."""
    batch = image_query.shape[0]
    terms = [image_query.new_empty(batch, dtype=scale.dtype) for _ in range(3)]
    return *terms, image_query.new_empty((rows.SAVED, batch), dtype=scale.dtype)


def backward_fake(grad_i2t, grad_t2i, grad_kl, saved, *args) -> tuple[torch.Tensor, ...]:
    """The backward op's outputs for these inputs, uninitialised."""
    tensors, needs_grad = args[:_DIFFERENTIABLE], args[-1]
    return tuple(t.new_empty(t.shape) if need else _library.unused(t) for t, need in zip(tensors, needs_grad))


def register_autograd(forward: torch.library.CustomOpDef, backward: torch.library.CustomOpDef) -> None:
    """Make ``forward`` differentiable through ``backward``.

    Autograd hands None for a term nothing depends on (``set_materialize_grads(False)``),
    and the backward op then skips that term's work.
    """

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:_TENSORS], output[3])
        ctx.options = inputs[_TENSORS:]
        ctx.mark_non_differentiable(output[3])
        ctx.set_materialize_grads(False)

    def backward_formula(ctx, grad_i2t, grad_t2i, grad_kl, _grad_saved):
        if grad_i2t is None and grad_t2i is None and grad_kl is None:
            return (None,) * _ARGUMENTS
        *tensors, saved = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:_DIFFERENTIABLE])
        grads = backward(grad_i2t, grad_t2i, grad_kl, saved, *tensors, *ctx.options, needs)
        return *(g if need else None for g, need in zip(grads, needs)), *(None,) * (_ARGUMENTS - _DIFFERENTIABLE)

    forward.register_autograd(backward_formula, setup_context=setup_context)
