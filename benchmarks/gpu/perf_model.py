"""The performance model of every GPU benchmark case: the work it must do and the floor
time of that work on the H200's measured ceilings.

For each case: the FLOPs of its matrix products (as each benchmark counts them, below),
the minimum bytes it must move (every input read and every output written once per pass:
forward and backward each read what they need, since no cache holds a 64 MiB queue
between the two), and the exponentials. The floor is the largest of the three times at
the ceilings, so ``measured / floor`` >= 1 says how far a kernel is from the hardware.

Ceilings: bf16 dense tensor-core products at 790 TFLOP/s and copies at 4.3 TB/s (read +
write), both measured on the H200 that runs the GPU check (8192^3 bf16 matmul on random
data; device-to-device copy); float32 products at a third of half TF32's rate, the cost
of the "tf32x3" products the Triton kernels use (TF32 runs at half the bf16 rate on
Hopper: 395 / 3 = 132 TFLOP/s; derived, not measured); exponentials at 3.9e12 per
second (MUFU throughput of an H100 SXM: 16 per SM per clock, 132 SMs, 1.83 GHz;
derived from the datasheet, not measured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TFLOP = 1e12

CEILINGS = {
    "bf16_tflops": 790.0,
    "fp16_tflops": 790.0,
    "fp32_tflops": 790.0 / 2 / 3,
    "bandwidth_gb_per_s": 4300.0,
    "exp_per_s": 3.9e12,
    "source": "H200, measured: bf16 matmul 790 TFLOP/s, copy 4.3 TB/s; fp32 (tf32x3) and exp derived",
}

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Work:
    """What one measured call must do.

    Attributes:
        flops: floating-point operations of the matrix products, counted as stated per op.
        bytes: the minimum bytes moved to and from device memory.
        exps: exponentials evaluated.
        dtype: the operand dtype, which picks the compute ceiling.
        note: how the numbers are counted.
    """

    flops: float
    bytes: float
    exps: float
    dtype: str
    note: str = ""

    def floor_ms(self, ceilings: dict[str, Any] = CEILINGS) -> dict[str, Any]:
        """The time at each ceiling, the floor (their maximum) and which one bounds it."""
        peak = ceilings.get(f"{_short(self.dtype)}_tflops", ceilings["bf16_tflops"])
        times = {
            "compute": self.flops / (peak * TFLOP) * 1e3,
            "memory": self.bytes / (ceilings["bandwidth_gb_per_s"] * 1e9) * 1e3,
            "exp": self.exps / ceilings["exp_per_s"] * 1e3,
        }
        bound = max(times, key=times.get)
        return {"floor_ms": times[bound], "bound": bound, "times_ms": times, "peak_tflops": peak}

    def describe(self, ceilings: dict[str, Any] = CEILINGS) -> dict[str, Any]:
        return {**asdict(self), **self.floor_ms(ceilings)}


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def contrastive(batch: int, keys: int, queue: int, dim: int, dtype: str, distill: bool = False) -> Work:
    """Forward + backward of the two-direction loss with KL over N = keys + queue candidates.

    FLOPs: the forward forms both directions' logits (2 x 2 B N D), the backward recomputes
    them and forms both query gradients (4 x 2 B N D); distillation adds the momentum
    logits in both passes (4 x 2 B N D). Bytes: each pass reads the queries, keys and both
    queues; the backward writes the two query gradients. Exps: each pass takes exp of
    both directions' logits (and of the momentum logits with distillation).
    """
    e = ELEMENT_BYTES[dtype]
    n = keys + queue
    flops = (6 + (4 if distill else 0)) * 2 * batch * n * dim
    read = (2 * batch + 2 * keys + 2 * queue) * dim * e
    exps = (2 if distill else 1) * 2 * 2 * batch * n
    return Work(flops, 2 * read + 2 * batch * dim * e, exps, dtype, "fwd 2x2BND + bwd 4x2BND; queues read twice")


def sigmoid(batch: int, texts: int, dim: int, dtype: str) -> Work:
    """Forward + backward of the SigLIP loss of B images against N texts.

    FLOPs: the forward forms the logits (2 B N D); the backward recomputes them once per
    side and forms both feature gradients (4 x 2 B N D; the kernels' further recomputes,
    one per slice of D, are not counted). Bytes: each pass reads both towers; the backward
    writes both gradients. Exps: one per logit in the forward and per side in the backward.
    """
    e = ELEMENT_BYTES[dtype]
    read = (batch + texts) * dim * e
    return Work(5 * 2 * batch * texts * dim, 3 * read, 3 * batch * texts, dtype, "fwd 2BND + bwd 4x2BND")


def linear_ce(rows: int, vocab: int, dim: int, dtype: str) -> Work:
    """Forward + backward of cross-entropy over a linear head: the three N x V x D
    products every implementation needs (6 N V D; recomputing logits is not counted),
    hidden and weight read in each pass, their gradients written, exp of every logit in
    the forward and again in the backward."""
    e = ELEMENT_BYTES[dtype]
    operands = (rows + vocab) * dim * e
    return Work(6 * rows * vocab * dim, 3 * operands + 8 * rows, 2 * rows * vocab, dtype, "6NVD; h, W read twice")


def attention(batch: int, heads: int, seq: int, head_dim: int, dtype: str, real_pairs: float) -> Work:
    """Forward + backward of attention; ``real_pairs`` = sum over the batch of
    (real queries x real keys) of one head.

    FLOPs as FlashAttention counts them: forward 4 H d sum(Lq Lk) (two products),
    backward 2.5 times that (five products, one a recompute). Bytes: q, k, v read and o
    written in the forward; q, k, v, o, dO read and dq, dk, dv written in the backward,
    every tensor at its padded length. Exps: P in the forward and its recompute.
    """
    e = ELEMENT_BYTES[dtype]
    tensor = batch * heads * seq * head_dim * e
    forward = 4.0 * heads * head_dim * real_pairs
    return Work(3.5 * forward, 12 * tensor, 2.0 * heads * real_pairs, dtype, "FlashAttention count: 3.5 x fwd")


def momentum(bytes_moved: int, params: int, dtype: str) -> Work:
    """One EMA update: every copy and online element read once and every copy written
    once (``bytes_moved``); two multiplies and an add per parameter."""
    return Work(3.0 * params, float(bytes_moved), 0.0, dtype, "streaming: bytes bound")


def enqueue(batch: int, dim: int, dtype: str) -> Work:
    """Writing ``batch`` new keys of both queues in place: read and write 2 B D."""
    e = ELEMENT_BYTES[dtype]
    return Work(0.0, 2 * 2 * batch * dim * e, 0.0, dtype, "the new keys read and written once")


def training_step(flops: float, parameter_bytes: float, dtype: str) -> Work:
    """A training step whose matrix-product FLOPs were counted by
    ``torch.utils.flop_counter`` on the plain build; bytes: the optimizer's and the EMA's
    parameter traffic, a lower bound (activations are not counted)."""
    return Work(flops, parameter_bytes, 0.0, dtype, "FLOPs counted by FlopCounterMode; bytes: optimizer + EMA")
