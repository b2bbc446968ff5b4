"""``torch.library.opcheck`` of every op registered under ``cots_kernels::``: the schema
(declared mutations, no aliasing), the shape function against the real op, the autograd
registration, and the op traced by AOT dispatch with static and symbolic shapes.

The chunked PyTorch ops, the queue's enqueue and the compiled C++ kernel run on the CPU;
the Triton ops run in the interpreter here (``tests/conftest.py``) and on the GPU there,
where the CUDA cases of the other ops run too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import cots_kernels  # noqa: F401  (registers the ops)
from cots_kernels import _extension

from .helpers import HAS_CUDA, requires_cuda, requires_extension, requires_triton, triton_device

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normalised(n: int, dim: int, gen: torch.Generator, device, grad: bool = False) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device)
    return x.requires_grad_(grad)


def _contrastive_inputs(device, launch) -> tuple:
    """B = 3 queries, 5 keys with the positives at offset 1, a queue of 7, D = 6."""
    gen = _gen(0)
    scale = torch.tensor(1 / 0.1, device=device, requires_grad=True)
    qi, qt = _normalised(3, 6, gen, device, True), _normalised(3, 6, gen, device, True)
    ki, kt = _normalised(5, 6, gen, device, True), _normalised(5, 6, gen, device, True)
    ui, ut = _normalised(7, 6, gen, device), _normalised(7, 6, gen, device)
    return (scale, qi, qt, ki, kt, ui, ut, 1, True, "symmetric", 0.4, launch)


def _contrastive_backward_inputs(forward, device, launch) -> tuple:
    inputs = _contrastive_inputs(device, launch)
    with torch.no_grad():
        i2t, t2i, kl, saved = forward(*inputs)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
    upstream = torch.linspace(0.5, 1.5, 3, device=device)
    return (upstream, 2 * upstream, None, saved, *detached, [True, True, True, True, False])


def _sigmoid_inputs(device, launch) -> tuple:
    """B = 3 images against 5 texts with the positives at offset 1, D = 6."""
    gen = _gen(6)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    image, text = _normalised(3, 6, gen, device, True), _normalised(5, 6, gen, device, True)
    return (scale, bias, image, text, 1, False, launch)


def _sigmoid_backward_inputs(device, launch) -> tuple:
    inputs = _sigmoid_inputs(device, launch)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
    return (torch.linspace(0.5, 1.5, 3, device=device), *detached, [True, True, True, False])


def _linear_ce_inputs(device, launch) -> tuple:
    """N = 5 rows (one ignored), V = 7, D = 4, with a bias and label smoothing."""
    gen = _gen(1)
    hidden = torch.randn(5, 4, generator=gen).to(device).requires_grad_()
    weight = torch.randn(7, 4, generator=gen).to(device).requires_grad_()
    bias = torch.randn(7, generator=gen).to(device).requires_grad_()
    targets = torch.tensor([3, -100, 0, 6, 2], device=device)
    return (hidden, weight, bias, targets, -100, 0.1, launch)


def _linear_ce_backward_inputs(forward, device, launch) -> tuple:
    hidden, weight, bias, targets, *options = _linear_ce_inputs(device, launch)
    with torch.no_grad():
        _, lse = forward(hidden, weight, bias, targets, *options)
    upstream = torch.linspace(0.5, 1.5, 5, device=device)
    tensors = (t.detach() for t in (hidden, weight, bias))
    return (upstream, *tensors, targets, lse, *options, [True, True, True])


def _attention_inputs(device) -> tuple:
    """q, k, v (B = 2, H = 2, L = 5, d = 16) as strided views of one projection, a mask
    with padding and a row of batch 1 that sees only two keys."""
    gen = _gen(2)
    qkv = torch.randn(2, 5, 3, 2, 16, generator=gen).to(device)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).clone().unbind(0))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]], device=device)
    return (q, k, v, mask, False, 0.25, [])


def _attention_backward_inputs(device) -> tuple:
    q, k, v, mask, *settings = _attention_inputs(device)
    with torch.no_grad():
        out, lse = torch.ops.cots_kernels.attention_triton(q, k, v, mask, *settings)
    grad_out = torch.randn(out.shape, generator=_gen(3)).to(device)
    return (grad_out, q.detach(), k.detach(), v.detach(), out, lse, mask, *settings)


def _momentum_inputs(device) -> tuple:
    """A float32 and a bfloat16-from-float32 pair, and a strided one."""
    gen = _gen(4)
    momentum = [torch.randn(6, 5, generator=gen).to(device), torch.randn(9, generator=gen).to(device)]
    online = [torch.randn(6, 5, generator=gen).to(device), torch.randn(9, generator=gen).to(device, torch.bfloat16)]
    return (momentum, online, 0.9)


def _enqueue_inputs(device) -> tuple:
    """Two buffers of 6 slots, 4 rows written from slot 4: the write wraps around."""
    gen = _gen(5)
    buffers = [torch.zeros(6, 3, device=device), torch.zeros(6, device=device, dtype=torch.bfloat16)]
    new = [torch.randn(4, 3, generator=gen).to(device), torch.randn(4, generator=gen).to(device)]
    return (buffers, new, torch.tensor(4, device=device), torch.tensor(10, device=device))


OPS = torch.ops.cots_kernels
TRITON = triton_device().type  # "cuda" on a GPU, "cpu" under the interpreter
BOTH = ("cpu", "cuda")
LAUNCH_OVERRIDES = [0, 0, 0, 0, 0]  # LaunchOverrides.as_ints(): every setting as pinned

CASES: dict[str, tuple[Callable[[torch.device], tuple], tuple[str, ...]]] = {
    "contrastive_chunked": (lambda d: _contrastive_inputs(d, 4), BOTH),
    "contrastive_chunked_backward": (lambda d: _contrastive_backward_inputs(OPS.contrastive_chunked, d, 4), BOTH),
    "contrastive_triton": (lambda d: _contrastive_inputs(d, LAUNCH_OVERRIDES), (TRITON,)),
    "contrastive_triton_backward": (
        lambda d: _contrastive_backward_inputs(OPS.contrastive_triton, d, LAUNCH_OVERRIDES),
        (TRITON,),
    ),
    "sigmoid_chunked": (lambda d: _sigmoid_inputs(d, 2), BOTH),
    "sigmoid_chunked_backward": (lambda d: _sigmoid_backward_inputs(d, 2), BOTH),
    "sigmoid_triton": (lambda d: _sigmoid_inputs(d, LAUNCH_OVERRIDES), (TRITON,)),
    "sigmoid_triton_backward": (
        lambda d: _sigmoid_backward_inputs(d, LAUNCH_OVERRIDES),
        (TRITON,),
    ),
    "linear_ce_chunked": (lambda d: _linear_ce_inputs(d, 2), BOTH),
    "linear_ce_chunked_backward": (lambda d: _linear_ce_backward_inputs(OPS.linear_ce_chunked, d, 2), BOTH),
    "linear_ce_chunked_with_grads": (lambda d: (*_linear_ce_inputs(d, 2), [True, True, True]), BOTH),
    "linear_ce_triton": (lambda d: _linear_ce_inputs(d, LAUNCH_OVERRIDES), (TRITON,)),
    "linear_ce_triton_backward": (
        lambda d: _linear_ce_backward_inputs(OPS.linear_ce_triton, d, LAUNCH_OVERRIDES),
        (TRITON,),
    ),
    "attention_triton": (_attention_inputs, (TRITON,)),
    "attention_triton_backward": (_attention_backward_inputs, (TRITON,)),
    "momentum_update_cpu": (_momentum_inputs, ("cpu",)),
    "momentum_update_cuda": (_momentum_inputs, ("cuda",)),
    "momentum_update_triton": (_momentum_inputs, (TRITON,)),
    "ring_enqueue": (_enqueue_inputs, BOTH),
}

_NEEDS_CUDA_EXTENSION = pytest.mark.skipif(
    not (HAS_CUDA and _extension.cuda_available()), reason="needs the extension's CUDA kernels"
)


def _marks(name: str, device: str) -> list:
    marks = [requires_cuda] if device == "cuda" else []
    if "triton" in name:
        marks.append(requires_triton)
    if name == "momentum_update_cpu":
        marks.append(requires_extension)
    if name == "momentum_update_cuda":
        marks.append(_NEEDS_CUDA_EXTENSION)
    return marks


def test_every_registered_op_has_a_case():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("cots_kernels::")}
    assert registered == set(CASES)


@pytest.mark.parametrize(
    "name,device",
    [
        pytest.param(name, device, marks=_marks(name, device), id=f"{name}-{device}")
        for name, (_, devices) in CASES.items()
        for device in devices
    ],
)
def test_opcheck(name, device):
    make, _ = CASES[name]
    torch.library.opcheck(getattr(OPS, name).default, make(torch.device(device)))
