"""The ``relict`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relict", description="Replica detection for medical image generators.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="score a phantom synthetic set with planted replicas")
    demo.add_argument("--out", default="relict_demo", help="folder for the bank cache and the report")
    demo.add_argument("--kind", choices=["head_ct", "mra"], default="head_ct")
    demo.add_argument("--ndim", type=int, choices=[2, 3], default=2)
    demo.add_argument("--size", type=int, default=64)
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, args.kind, args.ndim, args.size, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
