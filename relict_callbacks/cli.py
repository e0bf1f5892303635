"""The ``relict`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relict", description="Replica detection for medical image generators.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a MONAI DDPM with Lightning on phantoms until ReplicaMonitor "
                                             "stops it (--planted: score a synthetic set with planted copies)")
    demo.add_argument("--out", default="relict_demo", help="folder for all outputs")
    demo.add_argument("--planted", action="store_true", help="the offline demo: no training, planted copies")
    demo.add_argument("--epochs", type=int, default=60, help="most training epochs (training demo)")
    demo.add_argument("--every", type=int, default=5, help="check every N epochs (training demo)")
    demo.add_argument("--kind", choices=["head_ct", "mra"], default="head_ct", help="phantoms (--planted)")
    demo.add_argument("--ndim", type=int, choices=[2, 3], default=2, help="2D or 3D (--planted)")
    demo.add_argument("--size", type=int, default=64, help="image size (--planted)")
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo" and args.planted:
        from .demo import run_demo

        run_demo(args.out, args.kind, args.ndim, args.size, progress=not args.no_progress)
    elif args.command == "demo":
        from .examples.lightning_ddpm import main as run_training_demo

        run_training_demo(args.out, max_epochs=args.epochs, every_n_epochs=args.every, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
