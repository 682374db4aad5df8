"""Command-line entry point ``fastpeft`` (console script ``fastpeft.cli:main``).

Subcommands: ``train``, ``inspect``, ``merge``, ``demo``. Only argparse is imported here; each subcommand
imports torch / transformers / matplotlib lazily. Bad input exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FastPeftError
from . import parsers
from .common import CliError
from .options import DEFAULT_METHOD, resolve_method


def _version() -> str:
    """Installed fastpeft version, or 'unknown' when running from a bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastpeft")
    except PackageNotFoundError:
        return "unknown"


def build_parser(method: str = DEFAULT_METHOD) -> argparse.ArgumentParser:
    """The ``fastpeft`` parser; ``train`` gets the option flags of ``method``."""
    parser = argparse.ArgumentParser(
        prog="fastpeft",
        description="fastpeft: parameter-efficient fine-tuning, drop-in compatible with HF PEFT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers.add_train(sub, method)
    parsers.add_inspect(sub)
    parsers.add_merge(sub)
    parsers.add_demo(sub)
    return parser


def _train_method(argv: list[str]) -> str:
    """The ``--method`` of a ``train`` command line (checked), so its option flags can be built."""
    if not argv or argv[0] != "train":
        return DEFAULT_METHOD
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    method = pre.parse_known_args(argv[1:])[0].method
    resolve_method(method)
    return method


def _run(args) -> int:
    if args.command == "train":
        from .train import run_train

        return run_train(args)
    if args.command == "inspect":
        from .inspect_adapter import run_inspect

        return run_inspect(args)
    if args.command == "merge":
        from .merge import run_merge

        return run_merge(args)
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(output_dir=args.output_dir, epochs=args.epochs, seed=args.seed, quick=args.quick)
    return run_demo(settings)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_train_method(argv))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _run(args)
    except (CliError, FastPeftError) as exc:
        # bad input, or an adapter / checkpoint file that must not be used
        command = f" {argv[0]}" if argv and not argv[0].startswith("-") else ""
        print(f"fastpeft{command}: error: {exc}", file=sys.stderr)
        return 2
