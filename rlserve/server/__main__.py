"""`python -m rlserve.server [flags]`: the same as `rlserve serve`."""
from __future__ import annotations

import argparse
import sys

from rlserve.server.args import add_serve_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlserve.server", description="rlserve HTTP server")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        from rlserve.server.app import serve_from_args
        return serve_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
