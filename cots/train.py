"""``python -m cots.train``: train a COTS model from a config file and/or flags.

Examples::

    python -m cots.train --steps 200 --batch_size 32 --out_dir runs/shapes
    python -m cots.train --config runs/shapes/config.json --steps 400      # extend, resuming
    torchrun --nproc_per_node 2 -m cots.train --config cots.toml           # DDP

``--help`` lists every key with its default.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cots.training import help_text, parse_config, train


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), train, and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        config = parse_config(argv)
    except ValueError as exc:
        print(f"cots.train: error: {exc}\n(see --help)", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
