"""Command line: ``python -m gradagg demo [--seed N]``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradagg", description="gradagg command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="combine a real multi-task Jacobian with every method and print a table")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model's initial point and random methods")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.linnerud import main as run_demo

        run_demo(args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
