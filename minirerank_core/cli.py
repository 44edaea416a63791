"""The `minirerank` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minirerank", description="Fast multimodal page reranking for RAG.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="index a small sample corpus and answer a few queries")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(json_output=args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
