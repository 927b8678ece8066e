"""The `mmm` command: a thin argparse front over the library. Each subcommand lives beside the code
it drives and adds itself through an `add_parser(subparsers)` function listed here."""

from __future__ import annotations

import argparse
import importlib
import sys

# module paths whose add_parser(subparsers) defines a subcommand, in --help order
SUBCOMMANDS = ["mmm.bench.cli", "mmm.info", "mmm.train.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmm",
        description="mmm: cheaper matrix multiplications for Transformers, and what they cost.",
        epilog="Run `mmm <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for path in SUBCOMMANDS:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if not (exc.name and path.startswith(exc.name)):  # a missing dependency inside it: surface it
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
