"""Triton variant of the fused momentum update: one launch per dtype pair.

The same design as the CUDA kernel (``csrc/cuda/momentum.cu``): the tensors are cut
into ``CHUNK``-element chunks and each program updates one chunk, found through an int64
table in device memory that holds the tensors' addresses (cast to typed pointers in the
kernel, as Triton's grouped-GEMM tutorial does), their sizes and the chunk list. Full
``BLOCK`` tiles take unmasked loads, so with the 16-byte alignment hint Triton emits
128-bit loads and stores (checked in the PTX for sm_90); tails take masked ones.
"""

from __future__ import annotations

import struct

import torch

from .. import _library
from .. import _triton_utils as tu
from .problem import EmaProblem, check_devices, flat_walkable, group_pairs, update_strided_

# Launch shape, provisional until measured on an H100 (benchmarks/gpu/momentum.py):
# 16384-element chunks as in the CUDA kernel (~12,000 programs for ViT-B/16 + BERT-base,
# so the last partial wave costs a few percent), walked in 2048-element tiles by 4 warps
# (16 fp32 per thread per operand, four 16-byte loads).
CHUNK = 16384
BLOCK = 2048
NUM_WARPS = 4

# Table layout: [0] momentum and [1] 1 - momentum as float64 bits, then
# [2, 2+T) momentum addresses, [2+T, 2+2T) online addresses, [2+2T, 2+3T) numels,
# [2+3T, 2+3T+C) chunk c as (tensor << 32) | chunk index within the tensor.
_HEADER = 2


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _chunk_table(
    momentum: list[torch.Tensor], online: list[torch.Tensor], coefficient: float
) -> tuple[torch.Tensor, int]:
    """The kernel's table on the tensors' device, and the number of chunks."""
    numels = torch.tensor([m.numel() for m in momentum], dtype=torch.int64)
    counts = (numels + CHUNK - 1) // CHUNK  # (T,)
    first = torch.cumsum(counts, 0) - counts
    num_chunks = int(counts.sum())
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(momentum)), counts)  # (C,)
    local = torch.arange(num_chunks) - torch.repeat_interleave(first, counts)  # (C,)
    table = torch.cat(
        [
            torch.tensor([_float64_bits(coefficient), _float64_bits(1.0 - coefficient)]),
            torch.tensor([m.data_ptr() for m in momentum], dtype=torch.int64),
            torch.tensor([p.data_ptr() for p in online], dtype=torch.int64),
            numels,
            (tensor_of_chunk << 32) | local,
        ]
    )
    return table.to(momentum[0].device), num_chunks


def _launch(momentum: list[torch.Tensor], online: list[torch.Tensor], coefficient: float, aligned: bool) -> None:
    from . import triton_kernels as kernels

    table, num_chunks = _chunk_table(momentum, online, coefficient)
    m_dtype, p_dtype = momentum[0].dtype, online[0].dtype
    acc = kernels.TL_DTYPES[torch.float64 if m_dtype == torch.float64 else torch.float32]
    device = table.device
    with tu.on_device(device):
        kernels._ema_kernel[(num_chunks,)](
            table,
            len(momentum),
            ACC=acc,
            M_TYPE=kernels.TL_DTYPES[m_dtype],
            P_TYPE=kernels.TL_DTYPES[p_dtype],
            CHUNK=CHUNK,
            BLOCK=BLOCK,
            ALIGNED=aligned,
            num_warps=NUM_WARPS,
            # Both products are rounded before their sum, as PyTorch rounds them: no FMA.
            enable_fp_fusion=False,
        )


def why_not(problem: EmaProblem, auto: bool) -> str | None:
    return tu.why_not_triton(problem.momentum_params[0], auto=auto)


@_library.custom_op("momentum_update_triton", mutates_args=("momentum_params",), cudagraph_unsafe=True)
def update(momentum_params: list[torch.Tensor], online_params: list[torch.Tensor], momentum: float) -> None:
    """The update with the Triton kernel (inputs checked by ``group_pairs``), an opaque op:
    the kernel finds the tensors through a table of their addresses, which tracing cannot
    build, and which each call copies from the host (no CUDA graph can replay that).
    Declaring the writes also bumps the version counters autograd checks, which writes
    through raw addresses would not.

    Pairs with other layouts than two equally strided dense tensors go through ATen ops.
    Dense pairs are launched in two sets, 16-byte aligned (the vector-load hint holds)
    and not; each set is one launch per dtype pair.
    """
    problem = EmaProblem(momentum_params, online_params, momentum)
    for group in group_pairs(problem):
        sets: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for m, p in zip(group.momentum, group.online):
            if not flat_walkable(m, p):
                update_strided_(m, p, problem.momentum)
                continue
            aligned = m.data_ptr() % 16 == 0 and p.data_ptr() % 16 == 0
            ms, ps = sets.setdefault(aligned, ([], []))
            ms.append(m)
            ps.append(p)
        for aligned, (ms, ps) in sets.items():
            _launch(ms, ps, problem.momentum, aligned)


def run(problem: EmaProblem) -> None:
    """Run the update with the Triton kernel."""
    check_devices(problem)
    update(problem.momentum_params, problem.online_params, problem.momentum)
