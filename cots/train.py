"""``python -m cots.train``: train a COTS model from a config file and/or flags.

Examples::

    python -m cots.train --steps 200 --batch_size 32 --out_dir runs/shapes
    python -m cots.train --config runs/shapes/config.json --steps 400      # extend, resuming
    torchrun --nproc_per_node 2 -m cots.train --config cots.toml           # DDP

``--help`` lists every flag with its default (:mod:`cots.training.flags`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cots.training import parse_config, train
from cots.training.flags import PROG, USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), train, and return the exit status:
    0, or 2 for a bad command line (the error on stderr, as argparse reports it)."""
    try:
        config = parse_config(argv)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except ValueError as exc:
        print(f"usage: {USAGE}\n{PROG}: error: {exc}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
