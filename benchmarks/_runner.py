"""The command line every benchmark shares: ``--quick`` and ``--json FILE``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio


def run(main: Callable[[bool], Awaitable[dict[str, Any]]], description: str | None) -> None:
    """Parse the shared options, run ``main(quick)`` under Trio, save the figures if asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    options = parser.parse_args()
    figures = trio.run(main, options.quick)
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))
