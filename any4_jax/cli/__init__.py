"""The `any4` command. Subcommands compose the library; they hold no numerics of their own.

  any4 fetch | eval | generate      cli/model.py
  any4 quantize | calibrate         cli/quantize.py
  any4 analyze | quantize-matrix    cli/analyze.py
"""

from __future__ import annotations

import argparse
import sys

from any4_jax.assets import AssetError
from any4_jax.cli import analyze, model, quantize
from any4_jax.cli.args import fix_defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="any4", description="any4: learned 4-bit weight quantization for LLMs in JAX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model.add_commands(sub)
    quantize.add_commands(sub)
    analyze.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    fix_defaults(args)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, AssetError) as e:
        print(f"any4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
