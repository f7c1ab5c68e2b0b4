"""The ``stableprefix`` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stableprefix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo",
        help="replay an embedded Claude-Code-shaped session through mitmdump, without and with the addon",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from stableprefix import demo

        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
