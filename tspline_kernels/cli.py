"""The ``tspline`` command: ``demo``, ``bench``, ``plot``, ``inspect``, ``compress`` and ``compare``."""

from __future__ import annotations

import argparse


def _or_usage_error(parser: argparse.ArgumentParser, run, *args):
    """``run(*args)``; a bad path, argument or missing package exits with status 2 and its message."""
    try:
        return run(*args)
    except (OSError, ValueError, ImportError) as e:
        parser.error(str(e))


def _positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tspline", description="tspline-kernels: compressed linear layers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train dense vs spline MLPs on digits and a smooth regression task")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="training epochs per model, >= 1 (default: per task)")
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="benchmark every kernel against dense F.linear; write JSON")
    bench.add_argument("--quick", action="store_true", help="a small subset of shapes")
    bench.add_argument("--goal", action="store_true", help="only the rows the GPU targets read")
    bench.add_argument("--tiny", action="store_true", help="with --goal: smoke-test sizes")
    bench.add_argument("--out", help="JSON file to write (default bench/results/<device>-<commit>.json; "
                                     "an existing file is never overwritten, a -2, -3, ... suffix is added)")
    bench.add_argument("--deadline", type=float, metavar="SECONDS",
                       help="start no new row this many seconds after the start; rows not run are listed in the JSON")
    bench.add_argument("--warm", metavar="K/N",
                       help="compile and autotune only, writing nothing: call what every N-th case from case K "
                            "(0-based) runs once, so that N parallel processes fill Triton's on-disk cache for a "
                            "timed run of the same cases")
    bench.add_argument("--only", nargs="+", metavar="FAMILY",
                       help="benchmark only these families; 'fidelity': compressed all-MiniLM-L6-v2 vs the original; "
                            "'decoupling': its MLP blocks decoupled (B-spline) vs two baselines; "
                            "'host_overhead': every layer's host time per call at M=16, Triton launches stubbed (CPU)")
    inspect = sub.add_parser(
        "inspect", help="per-layer table of a compressed model file (tk.save_compressed)",
        description="Per-layer table (format, shape, params, ratio, weight/output error from the stored "
                    "report, checksum status) and totals, read from the metadata alone. Checksums read "
                    "'not verified' unless --verify reads every tensor and checks its SHA-256 (exit status 1 "
                    "when one fails).")
    inspect.add_argument("file", help="a .safetensors file, its .index.json, or a folder or fsspec URL holding one")
    inspect.add_argument("--verify", action="store_true", help="read all the data and check every checksum")
    compress = sub.add_parser(
        "compress", help="compress a model's Linear layers and write a compressed model file",
        description="Compress the Linear layers of SRC and write DST with tk.save_compressed, then print the "
                    "report. SRC: a sentence-transformers or Hugging Face model directory (loaded offline), or "
                    "a plain safetensors state dict (a .safetensors file or its .safetensors.index.json), "
                    "which has no architecture: every 2-D '<name>.weight' that --include/--exclude select "
                    "is taken as an nn.Linear weight (exclude embeddings), fitted data-free, and streamed "
                    "(one tensor read at a time, shards written as they fill: memory holds about one layer "
                    "and one shard).")
    compress.add_argument("src", metavar="SRC", help="model directory, .safetensors or .safetensors.index.json")
    compress.add_argument("--out", required=True, metavar="DST", help="compressed model file to write (.safetensors)")
    compress.add_argument("--format", required=True, choices=["auto", "lowrank", "tt", "kronecker", "spline"],
                          help="auto chooses each layer's format and size under one global budget (a state "
                               "dict is then read twice)")
    compress.add_argument("--ratio", type=float, metavar="R",
                          help="dense / compressed parameters over the compressed Linears, > 1 (not for kronecker, "
                               "whose size is fixed)")
    compress.add_argument("--calib", metavar="FILE.txt",
                          help="calibration texts, one per line: activation-aware fits (model directories only)")
    compress.add_argument("--heal-steps", type=int, default=0, metavar="N",
                          help="distil the original's outputs into the compressed layers for N Adam steps on the "
                               "--calib texts (the other weights stay the original's; default 0)")
    compress.add_argument("--heal-lr", type=float, default=1e-4, help="healing learning rate (default 1e-4)")
    compress.add_argument("--include", metavar="RE", help="compress only Linears whose name matches (searched)")
    compress.add_argument("--exclude", metavar="RE", help="leave out Linears whose name matches")
    compress.add_argument("--max-shard-size", default="1GB",
                          help="shard DST past this size (default 1GB; a streamed state dict holds one shard "
                               "in memory)")
    compare = sub.add_parser(
        "compare", help="sentence-embedding fidelity of a compressed model file to its original",
        description="Embed the texts with the original sentence-transformers model and with the compressed file "
                    "loaded into it; print the mean and min cosine between the two embeddings of each text and "
                    "the nearest-neighbour agreement (the share of texts whose most similar other text is the "
                    "same under both models).")
    compare.add_argument("original", metavar="ORIGINAL", help="sentence-transformers model directory")
    compare.add_argument("compressed", metavar="COMPRESSED", help="its compressed file (tspline compress)")
    compare.add_argument("--texts", required=True, metavar="FILE", help="texts, one per line (at least 2)")
    plot = sub.add_parser(
        "plot", help="draw bench charts from a JSON file, or one layer of a compressed model file (--layer)",
        description="tspline plot BENCH.json: speed-up charts of a bench run. tspline plot FILE --layer NAME: one "
                    "layer of a compressed model file (control grid heat map for splines, singular value "
                    "spectrum with the kept rank for low rank, TT ranks and core norms for tensor trains, the "
                    "singular values of the weight for other formats).")
    plot.add_argument("file", help="bench JSON file, or with --layer a compressed model file")
    plot.add_argument("--layer", metavar="NAME", help="the compressed layer to draw (see tspline inspect)")
    plot.add_argument("--out", help="PNG to write (default: next to FILE)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as run_demo

        run_demo(epochs=args.epochs, seed=args.seed)
    elif args.command == "bench":
        from .bench.run import main as run_bench, warm

        if args.tiny and not args.goal:
            parser.error("--tiny goes with --goal")
        if args.deadline is not None and args.deadline <= 0:
            parser.error("--deadline must be a positive number of seconds")
        if args.warm is not None:
            shard, _, shards = args.warm.partition("/")
            if not (shard.isdigit() and shards.isdigit() and int(shard) < int(shards)):
                parser.error(f"--warm takes K/N with 0 <= K < N, got {args.warm!r}")
            if args.out is not None or args.deadline is not None:
                parser.error("--warm writes nothing and times nothing: no --out or --deadline")
            warm(int(shard), int(shards), quick=args.quick, only=args.only, goal=args.goal, tiny=args.tiny)
        else:
            run_bench(quick=args.quick, out=args.out, only=args.only, goal=args.goal, tiny=args.tiny,
                      deadline=args.deadline)
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
    elif args.command == "compress":
        from .cli_commands import compress as run_compress

        print(_or_usage_error(compress, run_compress, args.src, args.out, args.format, args.ratio, args.calib,
                              args.heal_steps, args.heal_lr, args.include, args.exclude, args.max_shard_size))
        print(f"wrote {args.out}")
    elif args.command == "compare":
        from .cli_commands import compare as run_compare

        scores = _or_usage_error(compare, run_compare, args.original, args.compressed, args.texts)
        print(f"{scores['texts']} texts: mean cosine {scores['mean_cosine']:.4f}, min cosine "
              f"{scores['min_cosine']:.4f}, nearest-neighbour agreement {scores['nn_agreement']:.4f}")
    elif args.layer is not None:
        from .cli_commands import plot_layer

        print(f"wrote {_or_usage_error(plot, plot_layer, args.file, args.layer, args.out)}")
    else:
        from .cli_commands import plot_bench

        _or_usage_error(plot, plot_bench, args.file, args.out)


if __name__ == "__main__":
    main()
