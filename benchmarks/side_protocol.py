"""The worker's end of :func:`harness.start_worker`'s protocol, for the scripts a peer's own venv runs
(``saelens_side.py``, ``sparsify_side.py``, ``saelens_harvest_side.py``); it imports neither mechscope nor torch."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable


def serve(step: Callable[[], object], ready: dict) -> None:
    """Print ``ready`` as one JSON line, then call ``step()`` for each ``step`` line on stdin and answer ``done``."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            raise ValueError(f"expected 'step', got {line!r}")
        step()
        print("done", flush=True)
