"""The ``llamita`` command: argparse subcommands, each a few lines over the Python API."""

from __future__ import annotations

import argparse
import sys

from llamita.errors import LlamitaError


def cmd_info(args: argparse.Namespace) -> None:
    from llamita.info import describe

    print(describe(args.source))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamita", description="Run, chat with and fine-tune Llama 2 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, size and storage of a checkpoint or preset")
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint directory, .gguf file, preset (llama-2-7b...) or smollm2-135m-instruct (default)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LlamitaError as e:
        print(f"llamita: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
