"""Chunked PyTorch implementation of the sigmoid contrastive loss (``impl="torch"``).

Walks the text axis in column chunks, so its memory is O(B x chunk) instead of the
reference's O(B x N): each (B, chunk) tile of logits is formed, reduced to per-row
sums and dropped. The loss is elementwise in the logits, so nothing but the inputs is
saved for backward, which recomputes every tile. Runs on any device; it is the CPU
default. Half inputs are computed chunk by chunk in float32.

The positives of a chunk are a diagonal of one sub-block, located with Python
arithmetic on the offset and the chunk's columns: no index tensor is read on the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .. import _library
from . import ops
from .problem import PairOptions, SigmoidProblem

# Elements of one (B, chunk) logits tile: 2^19 float32 (2 MiB), at least 64 columns. At
# B = 4,096, D = 256 (float32, forward + backward, 2 shared cores) chunks of 16 columns
# (the contrastive loss's 2^16 elements) took 0.36 s, 64 columns 0.22 s, 128 columns
# 0.19 s and 512 columns 0.18 s: thin (B, D) @ (D, chunk) products starve the matmul
# kernels, and past 128 columns the gain is small while the tile keeps growing.
CHUNK_ELEMENTS = 1 << 19
MIN_COLS = 64


def why_not(problem: SigmoidProblem, auto: bool) -> str | None:
    """The chunked path runs every input on every device."""
    return None


def _chunks(num_texts: int, cols: int) -> Iterator[slice]:
    for start in range(0, num_texts, cols):
        yield slice(start, min(start + cols, num_texts))


def _negate_positives(tile: torch.Tensor, chunk: slice, options: PairOptions) -> None:
    """Negate, in place, the entries of the (B, C) ``tile`` of columns ``chunk`` that
    are positives (row r, column positive_offset + r): a diagonal of a sub-block."""
    if options.negative_only:
        return
    o = options.positive_offset
    r0, r1 = max(0, chunk.start - o), min(tile.shape[0], chunk.stop - o)
    if r0 < r1:
        c0 = o + r0 - chunk.start
        tile[r0:r1, c0 : c0 + (r1 - r0)].diagonal().neg_()


# The forward and backward are ops of their own (``torch.ops.cots_kernels.sigmoid_chunked``
# and ``sigmoid_chunked_backward``, arguments in :mod:`.ops`): traced by torch.compile,
# the loop over the text chunks would unroll into one graph node per chunk.


@_library.custom_op("sigmoid_chunked")
def forward_rows(
    scale: torch.Tensor,
    bias: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    positive_offset: int,
    negative_only: bool,
    cols: int,
) -> torch.Tensor:
    """Per-row losses sum_j softplus(-y_rj z_rj), (B,) in ``scale``'s dtype; tiles of ``cols`` texts."""
    options = PairOptions(positive_offset, negative_only)
    acc = scale.dtype
    x_s = image.to(acc) * scale  # (B, D): each logits tile is one addmm
    rows = torch.zeros(image.shape[0], dtype=acc, device=image.device)
    for chunk in _chunks(text.shape[0], cols):
        u = torch.addmm(bias, x_s, text[chunk].to(acc).T)  # (B, C) logits z
        _negate_positives(u, chunk, options)  # now -y z
        rows += F.softplus(u).sum(dim=1)
    return rows


@_library.custom_op("sigmoid_chunked_backward")
def backward_rows(
    grad_rows: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    positive_offset: int,
    negative_only: bool,
    cols: int,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (scale, bias, image, text) from the upstream gradient (B,) of the
    per-row losses; :func:`._library.unused` where ``needs_grad`` is False.

    dL_r/dz_rj = -y sigmoid(-y z): sigmoid(z) off the positives, -sigmoid(-z) on them
    (never sigmoid(z) - 1, which cancels where the positive is well classified).
    """
    options = PairOptions(positive_offset, negative_only)
    acc = scale.dtype
    x = image.to(acc)
    x_s = x * scale
    g = grad_rows.to(acc)[:, None]  # (B, 1)
    dx = torch.zeros_like(x)  # (B, D), unscaled: sum_j G_rj t_j
    dt = torch.empty(text.shape, dtype=acc, device=text.device) if needs_grad[3] else None
    db = torch.zeros((), dtype=acc, device=image.device)
    for chunk in _chunks(text.shape[0], cols):
        t = text[chunk].to(acc)
        grad = torch.addmm(bias, x_s, t.T)  # (B, C) logits z
        _negate_positives(grad, chunk, options)
        grad.sigmoid_()  # sigmoid(-y z)
        _negate_positives(grad, chunk, options)  # -y sigmoid(-y z)
        grad.mul_(g)
        dx.addmm_(grad, t)
        if dt is not None:
            torch.mm(grad.T, x, out=dt[chunk])
        db += grad.sum()
    return (
        (dx * x).sum() if needs_grad[0] else _library.unused(scale),  # sum_rj G_rj <x_r, t_j>
        db if needs_grad[1] else _library.unused(bias),
        (dx * scale).to(image.dtype) if needs_grad[2] else _library.unused(image),
        (dt * scale).to(text.dtype) if needs_grad[3] else _library.unused(text),
    )


backward_rows.register_fake(ops.backward_fake)
forward_rows.register_fake(ops.forward_fake)
ops.register_autograd(forward_rows, backward_rows)


def run(problem: SigmoidProblem, cols: int | None = None) -> torch.Tensor:
    """Per-row losses (B,) in the accumulation dtype.

    Tiles are (B, chunk) with chunk = ``cols`` or max(MIN_COLS, CHUNK_ELEMENTS // B) texts.
    """
    cols = cols or max(MIN_COLS, CHUNK_ELEMENTS // problem.batch)
    o = problem.options
    return forward_rows(
        problem.scale, problem.bias, problem.image, problem.text, o.positive_offset, o.negative_only, cols
    )
