"""Progress bars on stderr (tqdm), shared by training and retrieval encoding.

A bar shows progress only: the JSONL log of a training run holds everything it shows.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """A ``tqdm`` bar on stderr counting to ``total`` from ``initial`` (a resumed run's step).

    When not ``enabled`` (``progress=False``, or a DDP rank other than 0) the bar is
    disabled: its methods do nothing and it writes nothing.
    """
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=not enabled
    )
