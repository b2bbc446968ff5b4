"""The validated inputs of the queue contrastive loss, shared by every implementation.

Each implementation computes the three per-row terms (i2t_r, t2i_r, KL_r) of
``docs/contrastive-math.md``; weights, the total and the reduction are applied on those
(B,)-vectors by :mod:`cots_kernels.contrastive.api`, so the kernels never see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks

KL_DIRECTIONS = ("i2t_t2i", "t2i_i2t", "symmetric")

Temperature = float | int | torch.Tensor


@dataclass(frozen=True)
class RowOptions:
    """The options that change the per-row terms (and so the kernels).

    Attributes:
        positive_offset: the positive key of query row r is key row ``positive_offset + r``.
        in_batch_negatives: False excludes every batch key but the positive (MoCo/COTS).
        kl_direction: "i2t_t2i" for KL(p||q), "t2i_i2t" for KL(q||p), "symmetric" for
            their mean, where p is the image-to-text and q the text-to-image softmax.
        distill_alpha: weight of ALBEF's momentum-distillation soft targets (0: one-hot).
    """

    positive_offset: int = 0
    in_batch_negatives: bool = True
    kl_direction: str = "i2t_t2i"
    distill_alpha: float = 0.0

    @property
    def kl_coefficients(self) -> tuple[float, float]:
        """Weights (k_pq, k_qp) of KL(p||q) and KL(q||p) in the reported KL term."""
        return {"i2t_t2i": (1.0, 0.0), "t2i_i2t": (0.0, 1.0), "symmetric": (0.5, 0.5)}[self.kl_direction]


@dataclass(frozen=True)
class ContrastiveProblem:
    """Validated inputs of one call (see :func:`validate`).

    Shapes: ``image_query``/``text_query`` (B, D); ``image_keys``/``text_keys`` (Bk, D)
    with B + positive_offset <= Bk; ``image_queue``/``text_queue`` (Q, D), Q >= 0, or
    None (then Q = 0). ``scale`` is 1 / temperature as a 0-dim tensor on the inputs'
    device, in the accumulation dtype (float64 for float64 queries, else float32); it
    requires grad exactly when a temperature tensor that requires grad was passed.
    Keys and queues may be stored in another floating dtype than the queries; every
    implementation computes in the queries' dtype (converting tiles, never whole queues)
    and accumulates in ``acc_dtype``.
    """

    image_query: torch.Tensor
    text_query: torch.Tensor
    image_keys: torch.Tensor
    text_keys: torch.Tensor
    image_queue: torch.Tensor | None
    text_queue: torch.Tensor | None
    scale: torch.Tensor
    options: RowOptions

    batch = _checks.size_of("image_query", 0)
    num_keys = _checks.size_of("image_keys", 0)
    dim = _checks.size_of("image_query", 1)
    device, dtype, acc_dtype = _checks.tensor_properties("image_query")

    @property
    def queue_size(self) -> int:
        return 0 if self.image_queue is None else self.image_queue.shape[0]

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every embedding tensor of the problem, in argument order (None for absent queues)."""
        return (
            self.image_query,
            self.text_query,
            self.image_keys,
            self.text_keys,
            self.image_queue,
            self.text_queue,
        )


def _scale_from_temperature(temperature: Temperature, like: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(f"temperature must be a 0-dim (or 1-element) tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating tensor, got {temperature.dtype}")
        if temperature.device != like.device:
            raise ValueError(f"temperature is on {temperature.device} but the embeddings are on {like.device}")
        tau = temperature.reshape(())
        ok = torch.isfinite(tau) & (tau > 0)
        if tau.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok):
                raise ValueError(f"temperature must be positive and finite, got {tau.item()}")
        else:  # no host sync on accelerators nor in compiled graphs: the check fails the stream instead
            torch._assert_async(ok, "cots_contrastive_loss: temperature must be positive and finite")
        return 1.0 / tau.to(acc)
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return torch.tensor(1.0 / value, dtype=acc, device=like.device)


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape ({what})")


def validate(
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor | None,
    text_queue: torch.Tensor | None,
    temperature: Temperature,
    options: RowOptions,
    check_finite: bool = False,
) -> ContrastiveProblem:
    """Check every input and build the :class:`ContrastiveProblem`.

    Raises:
        TypeError: a non-tensor, an integer or unsupported dtype, a bad option type.
        ValueError: wrong ranks or shapes, mismatched embedding dims, queues of different
            lengths or given alone, too few key rows for the batch and its offset, empty
            batch, mixed devices, a non-positive or non-finite temperature, unknown option
            values, and with ``check_finite`` non-finite embeddings.
    """
    qi = _checks.float_tensor("image_query", image_query, 2)
    qt = _checks.float_tensor("text_query", text_query, 2)
    ki = _checks.float_tensor("image_keys", image_keys, 2)
    kt = _checks.float_tensor("text_keys", text_keys, 2)
    _check_pair("image_query", qi, "text_query", qt, "row r of each is pair r")
    _checks.same_dtype(image_query=qi, text_query=qt)
    batch, dim = qi.shape
    if batch == 0:
        raise ValueError("empty batch: image_query has 0 rows")
    if dim == 0:
        raise ValueError("embedding dim is 0")
    _check_pair("image_keys", ki, "text_keys", kt, "row j of each is pair j")
    if ki.shape[1] != dim:
        raise ValueError(f"image_keys and text_keys have embedding dim {ki.shape[1]} but the queries have {dim}")
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue must both be given or both be None")
    ui = ut = None
    if image_queue is not None:
        ui = _checks.float_tensor("image_queue", image_queue, 2)
        ut = _checks.float_tensor("text_queue", text_queue, 2)
        if ui.shape[0] != ut.shape[0]:
            raise ValueError(
                f"image_queue has {ui.shape[0]} rows and text_queue {ut.shape[0]}: "
                "the queues are index-aligned and must have the same length"
            )
        for name, queue in (("image_queue", ui), ("text_queue", ut)):
            if queue.shape[1] != dim:
                raise ValueError(f"{name} has embedding dim {queue.shape[1]} but the queries have {dim}")
            if queue.requires_grad:
                raise ValueError(f"{name} requires grad, but queues never get a gradient; detach it")
    _checks.same_device(
        image_query=qi, text_query=qt, image_keys=ki, text_keys=kt, image_queue=ui, text_queue=ut
    )  # fmt: skip

    offset = _checks.integer("positive_offset", options.positive_offset)
    if offset < 0:
        raise ValueError(f"positive_offset must be >= 0, got {offset}")
    if ki.shape[0] < batch + offset:
        raise ValueError(
            f"image_keys and text_keys have {ki.shape[0]} rows, but the positives of the B = {batch} "
            f"queries are key rows {offset}..{offset + batch - 1} (positive_offset = {offset}): the keys "
            f"need at least B + positive_offset = {batch + offset} rows"
        )
    options = RowOptions(
        offset,
        _checks.boolean("in_batch_negatives", options.in_batch_negatives),
        _checks.choice("kl_direction", options.kl_direction, KL_DIRECTIONS),
        _checks.real("distill_alpha", options.distill_alpha, low=0.0, high=1.0),
    )

    if check_finite:
        for name, t in zip(("image_query", "text_query", "image_keys", "text_keys", "image_queue", "text_queue"),
                           (qi, qt, ki, kt, ui, ut)):  # fmt: skip
            if t is not None:
                _checks.finite_values(name, t)

    scale = _scale_from_temperature(temperature, qi, _checks.acc_dtype(qi.dtype))
    return ContrastiveProblem(qi, qt, ki, kt, ui, ut, scale, options)
