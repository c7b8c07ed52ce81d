"""Command line: `python -m pykernels check` (self-test against the reference)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="test every op and gradient against the NumPy reference")
    check.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    check.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "check":
        from .check import run_check
        return 0 if run_check(device=args.device, seed=args.seed) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
