"""The `any4` command. Subcommands compose the library; they hold no numerics of their own.

  any4 fetch | eval | generate      cli/model.py
  any4 quantize | calibrate         cli/quantize.py
  any4 analyze | quantize-matrix    cli/analyze.py
  any4 lm-eval | lm-eval-tasks      cli/harness.py
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from any4_jax import settings
from any4_jax.assets import AssetError
from any4_jax.cli import analyze, bcq, harness, model, quantize
from any4_jax.cli.args import fix_defaults

# errors of the user's input: exit code 2, the message alone
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, AssetError)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every cleanup (`finally`, the checkpoint
    writer's) runs as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="any4", description="any4: learned 4-bit weight quantization for LLMs in JAX.",
        epilog="Errors are one line; ANY4_JAX_DEBUG=1 shows the Python traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model.add_commands(sub)
    quantize.add_commands(sub)
    bcq.add_commands(sub)
    analyze.add_commands(sub)
    harness.add_commands(sub)
    return parser


def _interrupted(args) -> str:
    """What an interruption left: nothing, the previous output, or what was already written."""
    written = getattr(args, "written", None)
    if written:
        return f"interrupted after writing {written}"
    if getattr(args, "previous_output", False):
        return f"interrupted; nothing was written, the previous checkpoint at {args.out} is intact"
    return "interrupted; nothing was written"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    fix_defaults(args)
    try:
        debug = settings.debug()
    except ValueError as e:
        print(f"any4 {args.command}: error: {e}", file=sys.stderr)
        return 2
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"any4 {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"any4 {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 143
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"any4 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, not a traceback (ANY4_JAX_DEBUG=1: it)
        if debug:
            raise
        print(f"any4 {args.command}: error: {type(e).__name__}: {e} (ANY4_JAX_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
