"""How the offline tools (training, export, quantize, threshold, benchmarks) meet the user on the command line.

Every tool shows its known failures as one line `error: ...` with exit code 2 and Ctrl-C as
`interrupted` with 130, never a traceback; it logs progress with a time stamp. One place for that, so
the tools cannot drift apart. (The runtime, `edge-ad`, has its own operator-facing logging in
`edge_ad.ops.statusline`.)
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_tool_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_tool(action: Callable[[], object], errors: tuple[type[BaseException], ...],
             interrupted: str = "interrupted") -> int:
    """Run `action`; print what it returns (a path, a table) unless None; map known errors to one line."""
    setup_tool_logging()
    try:
        result = action()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    if result is not None:
        print(result)
    return 0
