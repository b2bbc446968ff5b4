"""The measurements behind the CPU paths' pinned sizes, as a sweep that regenerates them.

    python -m benchmarks.sweep_chunks          # writes benchmarks/results/cpu_chunk_sweep.json

- ``cots_kernels.contrastive.torch_impl.CHUNK_ELEMENTS``: forward + backward of the full
  loss at ALBEF's shape (B = 256, Q = 65,536, D = 256, fp32) for tiles of 2^14 to 2^18
  logits.
- ``cots_kernels.linear_ce.torch_impl`` (``CHUNK_ELEMENTS``, ``MIN_CHUNK_ROWS`` and the
  gradients computed in the forward): forward + backward at the MVM-like and MLM-like
  shapes for several rows per chunk, with gradients in the forward and recomputed in
  backward, beside the materialised reference.
- The C++ momentum kernel on all threads and on one (what a build without ``-fopenmp``
  would run): the 195M parameters of ViT-B/16 + BERT-base, fp32.

Each time is the minimum over interleaved rounds, so a busy machine slows every
candidate alike rather than the one that happened to run during the load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from cots_kernels import _extension, cots_contrastive_loss, momentum_update_
from cots_kernels.contrastive import torch_impl as contrastive_torch
from cots_kernels.linear_ce import api as linear_ce_api
from cots_kernels.linear_ce import reference as linear_ce_reference
from cots_kernels.linear_ce import torch_impl as linear_ce_torch
from cots_kernels.linear_ce.problem import Options, validate

from .common import time_ms, write_json
from .momentum_shapes import cots_shapes, make_pairs

CPU = torch.device("cpu")


def _interleaved(candidates: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Minimum milliseconds of each candidate over ``rounds`` interleaved rounds."""
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            best[name] = min(best[name], time_ms(fn, CPU, warmup=0, reps=1))
    return best


def contrastive_chunks(rounds: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    batch, queue, dim = 256, 65_536, 256

    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)

    queries = [unit(batch).requires_grad_() for _ in range(2)]
    keys, queues = [unit(batch) for _ in range(2)], [unit(queue) for _ in range(2)]

    def run(elements: int) -> Callable[[], None]:
        def step() -> None:
            saved, contrastive_torch.CHUNK_ELEMENTS = contrastive_torch.CHUNK_ELEMENTS, elements
            try:
                cots_contrastive_loss(*queries, *keys, *queues, 0.07, impl="torch").loss.backward()
            finally:
                contrastive_torch.CHUNK_ELEMENTS = saved

        return step

    sizes = [1 << k for k in (14, 15, 16, 17, 18)]
    times = _interleaved({f"2^{e.bit_length() - 1}": run(e) for e in sizes}, rounds)
    return {
        "shape": {"B": batch, "Q": queue, "D": dim, "dtype": "float32"},
        "pinned": f"2^{contrastive_torch.CHUNK_ELEMENTS.bit_length() - 1}",
        "forward_backward_ms": times,
    }


def linear_ce_chunks(rounds: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for label, (rows, vocab, dim) in {"mvm": (2048, 8192, 256), "mlm": (600, 30_522, 256)}.items():
        hidden = torch.randn(rows, dim, generator=gen).requires_grad_()
        weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).requires_grad_()
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        problem = validate(hidden, weight, targets, None, Options())

        def run(chunk: int | None, grads_in_forward: bool) -> Callable[[], None]:
            def step() -> None:
                rows_ = linear_ce_torch.run(problem, chunk=chunk, grads_in_forward=grads_in_forward)
                linear_ce_api.reduce(problem, rows_).backward()

            return step

        default = linear_ce_torch.default_chunk(rows, vocab)
        chunks = sorted({128, 256, 512, 1024, default} & set(range(1, rows + 1)) | {default})
        candidates = {f"{c} rows, grads in forward": run(c, True) for c in chunks}
        candidates[f"{default} rows, recomputed in backward"] = run(default, False)
        candidates["reference (materialised)"] = lambda: linear_ce_api.reduce(
            problem, linear_ce_reference.run(problem)
        ).backward()
        out[label] = {
            "shape": {"N": rows, "V": vocab, "D": dim, "dtype": "float32"},
            "pinned_chunk_rows": default,
            "forward_backward_ms": _interleaved(candidates, rounds),
        }
    return out


def momentum_threads(rounds: int) -> dict[str, Any] | None:
    if not _extension.available():
        return None
    ms, ps = make_pairs(cots_shapes(), CPU, torch.float32, torch.float32)
    threads = torch.get_num_threads()

    def run(n: int) -> Callable[[], None]:
        def step() -> None:
            torch.set_num_threads(n)
            try:
                momentum_update_(ms, ps, 0.995, impl="cpu")
            finally:
                torch.set_num_threads(threads)

        return step

    times = _interleaved({f"{threads} threads": run(threads), "1 thread": run(1)}, rounds)
    return {"parameters": sum(m.numel() for m in ms), "dtype": "float32", "update_ms": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per sweep (default 3)")
    args = parser.parse_args(argv)
    payload = {
        "contrastive_chunk_elements": contrastive_chunks(args.rounds),
        "linear_ce_chunk_rows": linear_ce_chunks(args.rounds),
        "momentum_cpu_threads": momentum_threads(args.rounds),
    }
    path = write_json("cpu_chunk_sweep", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
