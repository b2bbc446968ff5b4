"""The validated inputs of the queue contrastive loss, shared by every implementation.

Each implementation computes the three per-row terms (i2t_r, t2i_r, KL_r) of
``contrastive-math.md``; weights, the total and the reduction are applied on those
(B,)-vectors by :mod:`cots_kernels.contrastive.loss`, so the kernels never see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KL_DIRECTIONS = ("i2t_t2i", "t2i_i2t", "symmetric")
REDUCTIONS = ("none", "sum", "mean")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

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

    @property
    def batch(self) -> int:
        return self.image_query.shape[0]

    @property
    def num_keys(self) -> int:
        return self.image_keys.shape[0]

    @property
    def queue_size(self) -> int:
        return 0 if self.image_queue is None else self.image_queue.shape[0]

    @property
    def dim(self) -> int:
        return self.image_query.shape[1]

    @property
    def device(self) -> torch.device:
        return self.image_query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_query.dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def keys_need_grad(self) -> bool:
        return self.image_keys.requires_grad or self.text_keys.requires_grad

    def autograd_inputs(self) -> tuple[torch.Tensor | None, ...]:
        """(scale, image_query, text_query, image_keys, text_keys, image_queue, text_queue):
        the tensor arguments, in order, of every implementation's autograd.Function."""
        return (self.scale, *self.tensors())

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every tensor of the problem, in argument order (None for absent queues)."""
        return (
            self.image_query,
            self.text_query,
            self.image_keys,
            self.text_keys,
            self.image_queue,
            self.text_queue,
        )


def _check_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (inf or nan)")


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
        if tau.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"temperature must be positive and finite, got {tau.item()}")
        else:  # no host sync on accelerators: the check fails the stream instead
            torch._assert_async(ok, "cots_contrastive_loss: temperature must be positive and finite")
        return 1.0 / tau.to(acc)
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return torch.tensor(1.0 / value, dtype=acc, device=like.device)


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
            lengths or given alone, offset out of range, empty batch, mixed devices, a
            non-positive or non-finite temperature, unknown option values, and with
            ``check_finite`` non-finite embeddings.
    """
    qi = _check_tensor("image_query", image_query, 2)
    qt = _check_tensor("text_query", text_query, 2)
    ki = _check_tensor("image_keys", image_keys, 2)
    kt = _check_tensor("text_keys", text_keys, 2)
    if qi.shape != qt.shape:
        raise ValueError(f"image_query {tuple(qi.shape)} and text_query {tuple(qt.shape)} must have the same shape")
    if qi.dtype != qt.dtype:
        raise TypeError(f"image_query ({qi.dtype}) and text_query ({qt.dtype}) must share a dtype")
    batch, dim = qi.shape
    if batch == 0:
        raise ValueError("empty batch: image_query has 0 rows")
    if dim == 0:
        raise ValueError("embedding dim is 0")
    if ki.shape != kt.shape:
        raise ValueError(f"image_keys {tuple(ki.shape)} and text_keys {tuple(kt.shape)} must have the same shape")
    if ki.shape[1] != dim:
        raise ValueError(f"keys have embedding dim {ki.shape[1]} but queries have {dim}")
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue must both be given or both be None")
    Qi = Qt = None
    if image_queue is not None:
        Qi = _check_tensor("image_queue", image_queue, 2)
        Qt = _check_tensor("text_queue", text_queue, 2)
        if Qi.shape[0] != Qt.shape[0]:
            raise ValueError(
                f"image_queue has {Qi.shape[0]} rows and text_queue {Qt.shape[0]}: "
                "the queues are index-aligned and must have the same length"
            )
        for name, q in (("image_queue", Qi), ("text_queue", Qt)):
            if q.shape[1] != dim:
                raise ValueError(f"{name} has embedding dim {q.shape[1]} but queries have {dim}")
            if q.requires_grad:
                raise ValueError(f"{name} requires grad, but queues never get a gradient; detach it")

    tensors = {"image_query": qi, "text_query": qt, "image_keys": ki, "text_keys": kt}
    if Qi is not None:
        tensors.update(image_queue=Qi, text_queue=Qt)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all embeddings must be on one device, got {listing}")

    if not isinstance(options.positive_offset, int) or isinstance(options.positive_offset, bool):
        raise TypeError(f"positive_offset must be an int, got {type(options.positive_offset).__name__}")
    if not 0 <= options.positive_offset <= ki.shape[0] - batch:
        raise ValueError(
            f"positive_offset={options.positive_offset} out of range: the positives are key rows "
            f"offset..offset+B-1, so it must lie in [0, Bk - B] = [0, {ki.shape[0] - batch}] "
            f"(B={batch}, Bk={ki.shape[0]})"
        )
    if options.kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {options.kl_direction!r}")
    alpha = options.distill_alpha
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"distill_alpha must be a number in [0, 1], got {alpha!r}")

    if check_finite:
        for name, t in tensors.items():
            _check_finite(name, t)

    acc = torch.float64 if qi.dtype == torch.float64 else torch.float32
    scale = _scale_from_temperature(temperature, qi, acc)
    return ContrastiveProblem(qi, qt, ki, kt, Qi, Qt, scale, options)
