"""Command-line entry point ``fastpeft`` (console script ``fastpeft.cli:main``).

Only argparse is imported here; each subcommand imports its heavy dependencies lazily.
"""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    """argparse type for integers >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _version() -> str:
    """Installed fastpeft version, or 'unknown' when running from a bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastpeft")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``fastpeft`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="fastpeft",
        description="fastpeft: parameter-efficient fine-tuning, drop-in compatible with HF PEFT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="LoRA-fine-tune all-MiniLM-L6-v2 on a toy sentiment task, save and reload the adapter",
        description="LoRA-fine-tune sentence-transformers/all-MiniLM-L6-v2 for sequence classification on a "
        "generated sentiment task (well under a minute on CPU), save the adapter, reload it and check predictions.",
    )
    demo.add_argument(
        "--output-dir", default="./demo_output", help="where the adapter is saved (default: %(default)s)"
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs (default: 3, or 1 with --quick)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for data, head init and shuffling (default: %(default)s)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="tiny run (few steps, a few seconds) for smoke tests"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import DemoSettings, run_demo

        settings = DemoSettings(
            output_dir=args.output_dir, epochs=args.epochs, seed=args.seed, quick=args.quick
        )
        return run_demo(settings)
    parser.print_help()
    return 2
