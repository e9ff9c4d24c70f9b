"""`--smoke` for the benchmarks: the same code path at sizes that run in seconds, for CI.

Every benchmark's `main` parses its arguments with `parse_args(ap, smoke_sizes)`. With `--smoke`,
`smoke_sizes` become the defaults (an option given on the command line still wins), so the smoke run
differs from the documented run only in its sizes. tests/test_bench_smoke.py runs each benchmark so.
"""

from __future__ import annotations

import argparse
from typing import Any


def parse_args(ap: argparse.ArgumentParser, smoke_sizes: dict[str, Any], argv: list[str] | None = None
               ) -> argparse.Namespace:
    """Parse `argv`; with --smoke, `smoke_sizes` (argparse dest -> value) replace the defaults first."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in smoke_sizes.items() if not isinstance(v, bool))
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny sizes for CI, same code path (sets {shown or 'the smoke sizes'})")
    args = ap.parse_args(argv)
    if args.smoke:
        ap.set_defaults(**smoke_sizes)
        args = ap.parse_args(argv)
    return args
