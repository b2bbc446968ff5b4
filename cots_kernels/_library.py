"""Registration of the implementations as ``torch.library`` ops, in the ``cots_kernels`` namespace.

torch.compile cannot trace everything an implementation does: the chunked PyTorch paths
walk 65,536 queue columns in Python loops (traced, they would unroll into graphs of
thousands of nodes), the compiled extension and the EMA's Triton launches take raw
pointers, and the Triton kernels run through the CPU interpreter in CI. So each such
implementation is an op of its own, ``torch.ops.cots_kernels.<name>``, with a shape
function (``register_fake``) and, for the differentiable ones, a backward op joined to
it by ``register_autograd``. torch.compile sees one node per op, and ``opcheck`` checks
every registration. The dispatch between implementations stays in Python: it reads
shapes, dtypes and devices only, so it is traced once per signature.

An op's signature holds tensors and simple values (ints, floats, bools, strings and
lists of them): the options travel as such, launch settings as lists of ints. Ops never
return None: a gradient that was not asked for comes back as :func:`unused`, and the
autograd formula hands autograd None for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch

from . import _triton_utils as tu

NAMESPACE = "cots_kernels"


# torch releases that know the tag take it through custom_op's ``tags``; older ones
# have neither, and capture every op of a graph in CUDA graphs.
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = "tags" in inspect.signature(torch.library.custom_op).parameters


def custom_op(
    name: str, *, mutates_args: Iterable[str] = (), cudagraph_unsafe: bool = False
) -> Callable[[Callable], torch.library.CustomOpDef]:
    """``torch.library.custom_op`` for ``cots_kernels::<name>``: an opaque op.

    ``cudagraph_unsafe``: the op does what a CUDA graph cannot replay (a copy from a
    host buffer, a host sync), so torch.compile's ``mode="reduce-overhead"`` must run it
    outside its graphs (tagged ``torch.Tag.cudagraph_unsafe`` where torch has the tag).
    """
    options = {}
    if cudagraph_unsafe and _CUDAGRAPH_UNSAFE is not None and _TAGS:
        options["tags"] = (_CUDAGRAPH_UNSAFE,)
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args), **options)


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], torch.library.CustomOpDef]:
    """The op of a Triton implementation's host function, which launches every kernel
    through :func:`cots_kernels._triton_utils.wrap_triton`.

    Where the kernels are compiled for a GPU it is a ``torch.library.triton_op``: torch.compile
    traces the host function (so Inductor fuses the per-row work around the launches and
    sees each launch), and the function is its own shape function. Under the interpreter
    (``TRITON_INTERPRET=1``) the kernels run on real tensors only, so the op is an opaque
    ``custom_op`` with the shape function ``fake``.
    """
    qualname = f"{NAMESPACE}::{name}"

    def register(fn: Callable) -> torch.library.CustomOpDef:
        if tu.TRITON_INSTALLED and not tu.INTERPRET:
            return torch.library.triton_op(qualname, fn, mutates_args=())
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return register


def unused(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for a gradient it was not asked for: an empty tensor."""
    return like.new_empty(0)
