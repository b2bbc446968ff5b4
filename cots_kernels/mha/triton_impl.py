"""Flash-style attention in Triton with key padding masks (``impl="triton"``).

Forward (one program per (batch, head, block of BLOCK_M queries)): stream the keys in
blocks of BLOCK_N with an online softmax (running max m, sum l, fp32 accumulator); save
only the output and each row's log-sum-exp. Backward recomputes the probabilities from
that log-sum-exp in two kernels, both deterministic (no atomics):

- dQ: one program per query block, looping over key blocks like the forward. It first
  computes delta = rowsum(dO * O) for its rows and stores it for the next kernel.
- dK/dV: one program per (batch, head, block of BLOCK_N keys), looping over query blocks.

Masks: any boolean key mask is correct (it is loaded block by block and applied element
by element). Each program first scans its batch element's mask row for the first and
last real key; key blocks before the first or after the last are never loaded or
computed (so right- and left-padding cost nothing), while padded keys between real ones
are masked, not skipped. A dK/dV program whose key block lies outside that range writes
zeros without looping. Causal programs also stop at (forward, dQ) or start from (dK/dV)
the diagonal block.

A query row that sees no key stores log-sum-exp = +inf, so every probability the
backward recomputes for it is exp2(s - inf) = 0: zero output, zero gradient, no NaN.

The kernels are in :mod:`.triton_kernels`; the mask semantics in ``docs/attention.md``.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch

from .. import _library
from .. import _triton_utils as tu
from .._triton_utils import Tiles, wrap_triton
from .problem import AttentionProblem

if tu.TRITON_INSTALLED:
    # Module globals, launched as wrap_triton(<name>): that is how torch.library.triton_op
    # finds the kernels of an op, whose source torch.compile's caches then key on.
    from .triton_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel

LOG2E = 1.4426950408889634

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The kernels keep whole (rows, head dim) tiles in registers: at head dim 256 the dK/dV
# program's two fp32 accumulators alone would take 2 x 64 x 256 x 4 B = 128 KiB, half
# an SM's register file, before its four input tiles.
MAX_HEAD_DIM = 128

# Mask bytes read per step of the key-range scan: 40- and 197-token masks in one step,
# 257 in two. A constant, so that sequence lengths do not multiply compiled variants.
DEFAULT_MASK_CHUNK = 256

# Tile offsets inside one (batch, head) slice are 32-bit; slice bases are 64-bit.
MAX_SLICE_ELEMENTS = 2**31 - 1


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of the three kernels for one problem shape: each kernel's tiles
    (``rows`` queries, ``cols`` keys, ``dim`` the head dim padded to a power of two) and
    the mask bytes read per step of the key-range scan."""

    forward: Tiles
    backward_dq: Tiles
    backward_dkdv: Tiles
    mask_chunk: int

    def as_ints(self) -> list[int]:
        """The settings as an op argument: each kernel's five tile fields, then the mask chunk."""
        return [*astuple(self.forward), *astuple(self.backward_dq), *astuple(self.backward_dkdv), self.mask_chunk]

    @staticmethod
    def from_ints(values: list[int]) -> LaunchConfig:
        """The inverse of :meth:`as_ints`."""
        return LaunchConfig(Tiles(*values[0:5]), Tiles(*values[5:10]), Tiles(*values[10:15]), values[15])


def launch_config(problem: AttentionProblem) -> LaunchConfig:
    """The pinned launch settings for one problem shape.

    Tile shapes follow Triton's fused-attention tutorial for A100/H100 (128 x 64 forward
    tiles, 64 x 64 backward tiles, 2-3 pipeline stages). Warp counts come from compiling
    every kernel for sm_80 and sm_90 (Triton 3.9, head dims 64/80/128, with and without
    mask and causal) and reading the register use: with 4 warps, 128-row masked or
    causal forward tiles spilled 32-72 bytes and the causal dQ kernel 48 bytes; with the
    counts below nothing spills for fp16/bf16 except the causal forward at head dim 128
    on sm_80 (96 bytes). The largest shared-memory footprint is 128 KiB (head dim 128
    forward, 3 stages), within both GPUs' limits. Throughput is not yet tuned on a GPU
    (benchmarks/gpu/attention.py measures it).

    Tiles shrink to the sequence length rounded up to a power of two (16 at least, the
    smallest tl.dot): a 40-token caption gets one 64 x 64 tile instead of a 128-row tile
    that would be 70% padding.

    float32 tiles are 32 x 32 with 8 warps: with three-TF32 products (see
    ``_triton_utils.FP32_DOT_PRECISION``) that compiles without spills at head dim 64 and spills
    16-136 bytes at 128, where 64 x 64 tiles spilled up to 528 and exact fp32 ("ieee"
    FMA loops) at 128 x 64 spilled kilobytes. fp32 is a correctness path, not a tuned one.
    """
    m = tu.pow2(problem.seq_q, 16, 1 << 30)
    n = tu.pow2(problem.seq_k, 16, 1 << 30)
    d = tu.pow2(problem.head_dim, 16, 1 << 30)
    if problem.dtype == torch.float32:
        tile = Tiles(min(32, m), min(32, n), d, 8, 2)
        return LaunchConfig(tile, tile, tile, DEFAULT_MASK_CHUNK)
    wide = problem.head_dim > 64
    fwd_m = min(128, m)
    bwd_warps = 8 if (wide or problem.causal) else 4
    return LaunchConfig(
        forward=Tiles(fwd_m, min(64, n), d, 8 if (wide or fwd_m == 128) else 4, 3),
        backward_dq=Tiles(min(64, m), min(64, n), d, bwd_warps, 2),
        backward_dkdv=Tiles(min(64, m), min(64, n), d, bwd_warps, 2),
        mask_chunk=DEFAULT_MASK_CHUNK,
    )


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def why_not(problem: AttentionProblem, auto: bool) -> str | None:
    """None if the Triton kernels can run ``problem``, else why not."""
    reason = tu.why_not_triton(problem.q, auto=auto)
    if reason is not None:
        return reason
    if problem.dtype not in TRITON_DTYPES:
        return f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
    if problem.head_dim > MAX_HEAD_DIM:
        return f"head dim {problem.head_dim} is above {MAX_HEAD_DIM}, the largest these tiles hold"
    if problem.value_dim != problem.head_dim:
        return f"v's head dim {problem.value_dim} differs from q's {problem.head_dim}"
    if problem.dropout_p > 0:
        return "dropout_p > 0: the Triton kernels have no dropout (no reproducible random stream)"
    if problem.device.type == "cuda" and problem.dtype == torch.bfloat16 and _capability(problem.device) < (8, 0):
        return "bfloat16 tensor-core products need compute capability 8.0 or newer"
    for name, t in (("q", problem.q), ("k", problem.k), ("v", problem.v)):
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] > MAX_SLICE_ELEMENTS:
            return f"one (batch, head) slice of {name} spans more than 2^31 elements"
    # Outputs and gradients are laid out (B, L, H, d): one head's slice spans L * H * d.
    if max(problem.seq_q, problem.seq_k) * problem.heads * problem.head_dim > MAX_SLICE_ELEMENTS:
        return "one (batch, head) slice of the (B, L, H, d) outputs spans more than 2^31 elements"
    return None


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels address the head dim as contiguous (stride 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_bhld(like: torch.Tensor, seq: int) -> torch.Tensor:
    """An uninitialised (B, H, L, d) tensor laid out as (B, L, H, d) in memory.

    That is the layout a self-attention layer wants back: ``out.transpose(1, 2)`` is then
    a contiguous (B, L, H, d) tensor and reshapes to (B, L, H * d) without a copy.
    """
    batch, heads, _, dim = like.shape
    return like.new_empty(batch, seq, heads, dim).transpose(1, 2)


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of one call."""

    causal: bool
    scale: float
    config: LaunchConfig


def _common_meta(q: torch.Tensor, mask: torch.Tensor | None, spec: _Spec, tile: Tiles) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_D=tile.dim,
        BLOCK_M=tile.rows,
        BLOCK_N=tile.cols,
        MASK_CHUNK=spec.config.mask_chunk,
        HAS_MASK=mask is not None,
        CAUSAL=spec.causal,
        UPCAST=tu.UPCAST_DOT_OPERANDS,
        DOT_PRECISION=tu.dot_precision(),  # fp16/bf16 operands ignore it
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The mask as bytes and its batch stride; without a mask, any pointer (never read)."""
    if mask is None:
        return q, 0
    return mask.view(torch.uint8), mask.stride(0)


def _forward(q, k, v, mask, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    tile = spec.config.forward
    out = _empty_bhld(q, seq_q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    mask_ptr, mask_stride = _mask_args(mask, q)
    num_m = tu.cdiv(seq_q, tile.rows)
    wrap_triton(_fwd_kernel)[(batch * heads * num_m,)](
        q, k, v, out, lse, mask_ptr,
        spec.scale * LOG2E,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out),
        mask_stride,
        heads, seq_q, seq_k, num_m,
        **_common_meta(q, mask, spec, tile),
    )  # fmt: skip
    return out, lse


def _backward(do, q, k, v, out, lse, mask, spec: _Spec) -> tuple[torch.Tensor, ...]:
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    dq, dk, dv = _empty_bhld(q, seq_q), _empty_bhld(k, seq_k), _empty_bhld(v, seq_k)
    delta = torch.empty_like(lse)  # (B, H, Lq) fp32, written by the dQ kernel
    mask_ptr, mask_stride = _mask_args(mask, q)

    tile = spec.config.backward_dq
    num_m = tu.cdiv(seq_q, tile.rows)
    wrap_triton(_bwd_dq_kernel)[(batch * heads * num_m,)](
        q, k, v, out, do, dq, lse, delta, mask_ptr,
        spec.scale * LOG2E, spec.scale,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), *_bhl(do), *_bhl(dq),
        mask_stride,
        heads, seq_q, seq_k, num_m,
        **_common_meta(q, mask, spec, tile),
    )  # fmt: skip

    tile = spec.config.backward_dkdv
    num_n = tu.cdiv(seq_k, tile.cols)
    wrap_triton(_bwd_dkdv_kernel)[(batch * heads * num_n,)](
        q, k, v, do, dk, dv, lse, delta, mask_ptr,
        spec.scale * LOG2E, spec.scale,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), *_bhl(dk), *_bhl(dv),
        mask_stride,
        heads, seq_q, seq_k, num_n,
        **_common_meta(q, mask, spec, tile),
    )  # fmt: skip
    return dq, dk, dv


def _spec(q, k, v, mask, causal: bool, scale: float, config: list[int]) -> _Spec:
    """The call's settings; an empty ``config`` takes :func:`launch_config`'s choice."""
    if config:
        return _Spec(causal, scale, LaunchConfig.from_ints(config))
    return _Spec(causal, scale, launch_config(AttentionProblem(q, k, v, mask, causal, scale, 0.0)))


def _forward_fake(q, k, v, *args):
    batch, heads, seq_q, _ = q.shape
    return _empty_bhld(q, seq_q), q.new_empty(batch, heads, seq_q, dtype=torch.float32)


def _backward_fake(grad_out, q, k, v, *args):
    return _empty_bhld(q, q.shape[2]), _empty_bhld(k, k.shape[2]), _empty_bhld(v, v.shape[2])


# Registered with _library.kernel_op: a triton_op where the kernels compile for a GPU,
# whose host code torch.compile then traces (sequence lengths and head dims are known
# when it traces).


@_library.kernel_op("attention_triton", fake=_forward_fake)
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    config: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Lq, d) laid out as (B, Lq, H, d), the log-sum-exp of each row (B, H, Lq)
    float32); ``config``: :meth:`LaunchConfig.as_ints`, or empty for the pinned choice."""
    spec = _spec(q, k, v, key_padding_mask, causal, scale, config)
    mask = None if key_padding_mask is None else _unit_stride(key_padding_mask)
    with tu.on_device(q.device):
        return _forward(_unit_stride(q), _unit_stride(k), _unit_stride(v), mask, spec)


@_library.kernel_op("attention_triton_backward", fake=_backward_fake)
def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each laid out as (B, L, H, d), from the forward's output and log-sum-exp."""
    spec = _spec(q, k, v, key_padding_mask, causal, scale, config)
    mask = None if key_padding_mask is None else _unit_stride(key_padding_mask)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with tu.on_device(q.device):
        return _backward(_unit_stride(grad_out), q, k, v, out, lse, mask, spec)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, *settings = inputs
    ctx.save_for_backward(q, k, v, *output, mask)
    ctx.settings = settings  # causal, scale, config
    ctx.mark_non_differentiable(output[1])


def _backward_formula(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    return *backward(grad_out, q, k, v, out, lse, mask, *ctx.settings), None, None, None, None


forward.register_autograd(_backward_formula, setup_context=_setup_context)


def run(problem: AttentionProblem, config: LaunchConfig | None = None) -> torch.Tensor:
    """(B, H, Lq, d) attention output from the Triton kernels, differentiable in q, k, v.

    ``config`` replaces :func:`launch_config`'s choice (tests force several tiles per
    kernel and a multi-step mask scan); the result does not depend on it beyond rounding.
    """
    settings = (problem.causal, problem.scale, [] if config is None else config.as_ints())
    return forward(problem.q, problem.k, problem.v, problem.key_padding_mask, *settings)[0]
