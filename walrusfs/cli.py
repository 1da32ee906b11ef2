"""The `walrusfs` command line. Thin: parses arguments and calls into the core.

Must not import pyfuse3 (only the mount lifecycle does).
"""

from __future__ import annotations

import argparse
import sys

from walrusfs import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walrusfs",
        description="An erasure-coded filesystem over n node directories (Red Stuff encoding).",
    )
    parser.add_argument("--version", action="version", version=f"walrusfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="encode, lose and decode a sample blob (a codec demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from walrusfs import demo

        return demo.main()
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
