"""Input checks, autocast handling and reductions shared by every op.

Each op's ``problem.validate`` builds its problem from these, so that the same mistake
gets the same message whatever the op: the argument is named, with the shape, dtype or
device it has and the one it needs. Checks read shapes, dtypes and devices only (free,
and fixed when a graph is traced); the few that read values say so in their name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of an op on ``dtype`` inputs: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def size_of(field: str, dim: int) -> property:
    """A problem's read-only property: the size of dimension ``dim`` of its tensor ``field``."""
    return property(lambda self: getattr(self, field).shape[dim], doc=f"{field}.shape[{dim}]")


def tensor_properties(field: str) -> tuple[property, property, property]:
    """A problem's read-only (device, dtype, accumulation dtype) properties, those of its
    tensor ``field``."""
    return (
        property(lambda self: getattr(self, field).device, doc=f"{field}.device"),
        property(lambda self: getattr(self, field).dtype, doc=f"{field}.dtype"),
        property(lambda self: acc_dtype(getattr(self, field).dtype), doc=f"acc_dtype({field}.dtype)"),
    )


def float_tensor(name: str, value: object, ndim: int) -> torch.Tensor:
    """``value`` if it is an ``ndim``-D tensor of a supported floating dtype.

    Raises:
        TypeError: not a tensor, or not float16/bfloat16/float32/float64.
        ValueError: another number of dimensions.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """The one device of the given tensors (None entries are skipped).

    Raises:
        ValueError: naming every tensor and its device, when they differ.
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")
    return devices.pop()


def same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """The one dtype of the given tensors (None entries are skipped).

    Raises:
        TypeError: naming every tensor and its dtype, when they differ.
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} ({t.dtype})" for name, t in present.items())
        raise TypeError(f"{' and '.join(present)} must share a dtype, got {listing}")
    return dtypes.pop()


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float between ``low`` and ``high``.

    The bounds are closed unless ``low_open`` / ``high_open``; an infinite bound is no
    bound. The message spells the allowed range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    x = float(value)
    inside = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not inside:
        if math.isinf(low) or math.isinf(high):
            bound = (
                f"{'>' if low_open else '>='} {low:g}" if math.isinf(high) else f"{'<' if high_open else '<='} {high:g}"
            )
            allowed = f"be finite and {bound}"
        else:
            allowed = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must {allowed}, got {value!r}")
    return x


def choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def finite_values(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds inf or nan: one pass and one host sync, so only on request.

    In a graph torch.compile traces it is an asynchronous device assertion instead.
    """
    finite = torch.isfinite(t).all()
    if torch.compiler.is_compiling():
        torch._assert_async(finite, f"{name} contains non-finite values (inf or nan)")
    elif not bool(finite):
        raise ValueError(f"{name} contains non-finite values (inf or nan)")


def autocast_inputs(*tensors: object) -> tuple:
    """The inputs as autocast would hand them to a matmul on their device.

    Under an autocast region enabled for the first tensor's device type,
    float16/bfloat16/float32 tensors are cast to the autocast dtype (float64 and
    non-floating tensors are left alone, as autocast leaves them), so a fused op computes
    what the materialised PyTorch code would compute in the same region. Outside
    autocast, and for anything that is not a tensor (validation rejects it next), the
    inputs come back unchanged. The casts are differentiable: gradients return in each
    input's own dtype.
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    target = torch.get_autocast_dtype(first.device.type)

    def cast(t: object) -> object:
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dtype in (torch.float64, target):
            return t
        return t.to(target)

    return tuple(cast(t) for t in tensors)


def reduce_rows(rows: torch.Tensor, reduction: str, denominator: torch.Tensor | int) -> torch.Tensor:
    """``rows`` (N,) as ``reduction`` says: themselves, their sum, or the sum over ``denominator``.

    The op picks the denominator of "mean" (the number of rows, the count of
    non-ignored rows, or the sum of the per-row weights) and how a zero one behaves.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / denominator
