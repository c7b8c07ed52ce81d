"""Command line of pykernels.

  python -m pykernels demo     train a CNN on real handwritten digits, show its feature maps
  python -m pykernels check    test every op and gradient against the NumPy reference
  python -m pykernels bench    time the kernels against PyTorch / NumPy / CuPy on design.md's shapes
"""

from __future__ import annotations

import argparse
import os
import sys

from . import _cli_types


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    from . import demo
    demo_parser = commands.add_parser("demo", help="train a LeNet-style CNN on scikit-learn's digits")
    demo.add_arguments(demo_parser)

    check = commands.add_parser("check", help="test every op and gradient against the NumPy reference")
    check.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    check.add_argument("--seed", type=_cli_types.seed, default=0)

    from . import bench
    bench_parser = commands.add_parser("bench", help="time the kernels against PyTorch / NumPy / CuPy, if installed")
    bench.add_arguments(bench_parser)

    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.evaluate and not args.load_model:
            demo_parser.error("--evaluate needs --load-model FILE (there is nothing trained to evaluate)")
        return demo.run_demo(args)
    if args.command == "check":
        from .check import run_check
        return 0 if run_check(device=args.device, seed=args.seed) else 1
    if args.command == "bench":
        return bench.run_bench(args)
    return 2


def _run_as_command() -> int:
    """main(), ending quietly when the reader of its output goes away (`python -m pykernels bench | head`)."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too
        # (the idiom of the signal module's documentation, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_run_as_command())
