"""Command line: ``python -m gradagg demo [--seed N] [--out DIR] [--quick]``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradagg", description="gradagg command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="real-data method table, toy-problem trajectories and a multi-task run")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, models and random methods (default 0)")
    demo.add_argument("--out", default="demo-out", help="folder for the report and plots (default ./demo-out)")
    demo.add_argument("--quick", action="store_true", help="a few steps only, to check that everything runs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as run_demo

        run_demo(args.seed, args.out, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
