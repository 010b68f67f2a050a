"""`pyprune-fast info`: backend_info() as JSON, what compiled kernels are loaded."""

from __future__ import annotations

import json


def run(options: None = None) -> int:
    """Prints backend_info(); returns the exit status 0."""
    import pyprune_fast

    print(json.dumps(pyprune_fast.backend_info(), indent=2, default=str))
    return 0
