"""The ``tspline`` command: ``demo``, ``bench``, ``plot`` and ``inspect``."""

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
    inspect = sub.add_parser(
        "inspect", help="per-layer table of a compressed model file (tk.save_compressed)",
        description="Per-layer table (format, shape, params, ratio, weight/output error from the stored "
                    "report, checksum status) and totals, read from the metadata alone. Checksums read "
                    "'not verified' unless --verify reads every tensor and checks its SHA-256 (exit status 1 "
                    "when one fails).")
    inspect.add_argument("file", help="a .safetensors file, its .index.json, or a folder or fsspec URL holding one")
    inspect.add_argument("--verify", action="store_true", help="read all the data and check every checksum")
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
    elif args.command == "inspect":
        from .files import open_compressed

        try:
            with open_compressed(args.file) as f:
                failed = f.verify(progress=True) if args.verify else None
                print(f.table(failed))
        except (OSError, ValueError) as e:
            inspect.error(str(e))
        if failed:
            raise SystemExit(f"tspline inspect: {len(failed)} tensors failed verification")
    else:
        from .bench.plot import main as run_plot

        run_plot(args.file, args.out)


if __name__ == "__main__":
    main()
