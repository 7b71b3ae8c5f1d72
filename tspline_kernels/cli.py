"""The ``tspline`` command: ``demo``, ``bench`` and ``plot``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tspline", description="tspline-kernels: compressed linear layers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train dense vs spline MLPs on digits and a smooth regression task")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs per model (default: per task)")
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="benchmark every kernel against dense F.linear; write JSON")
    bench.add_argument("--quick", action="store_true", help="a small subset of shapes")
    bench.add_argument("--goal", action="store_true", help="only the rows the GPU targets read")
    bench.add_argument("--tiny", action="store_true", help="with --goal: smoke-test sizes")
    bench.add_argument("--out", help="JSON file to write (default bench/results/<device>-<commit>.json; "
                                     "an existing file is never overwritten, a -2, -3, ... suffix is added)")
    bench.add_argument("--only", nargs="+", metavar="FAMILY", help="benchmark only these families")
    plot = sub.add_parser("plot", help="draw speed-up charts from a bench JSON file")
    plot.add_argument("file")
    plot.add_argument("--out", help="PNG to write (default: next to the JSON)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as run_demo

        run_demo(epochs=args.epochs, seed=args.seed)
    elif args.command == "bench":
        from .bench.run import main as run_bench

        if args.tiny and not args.goal:
            parser.error("--tiny goes with --goal")
        run_bench(quick=args.quick, out=args.out, only=args.only, goal=args.goal, tiny=args.tiny)
    else:
        from .bench.plot import main as run_plot

        run_plot(args.file, args.out)


if __name__ == "__main__":
    main()
