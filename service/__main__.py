"""`python -m service [flags]`: `safety serve` without the console script (images, benchmarks, a checkout).

Owns nothing but the dispatch; the flags, their `SAFETY_*` variables and defaults are `service.cli`'s.
"""

from __future__ import annotations

import argparse
import sys

from service.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
