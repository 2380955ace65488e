"""The ``infiniteid`` command line: one sub-command per module in :mod:`infiniteid.commands`.

Each command module defines ``register(subparsers)`` (adds its parser, with help
text and examples) and ``run(args) -> int``. Errors a user can cause (bad paths,
bad settings, a bundle that does not load) are raised as :class:`UserError` or
one of the project's ``*Error`` classes listed in :data:`USER_ERRORS` and printed
as one line, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional

COMMANDS = (
    "demo", "generate", "export", "inspect", "build", "check", "selftest", "convert-adapter", "serve", "bench", "calibrate",
    "train", "evaluate", "world",
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _user_errors() -> tuple:
    """The exception types printed as one line; imported lazily (torch-free)."""
    from .bundle import BundleError
    from .generation import InvalidRequest

    types = [UserError, BundleError, InvalidRequest, FileNotFoundError]
    for mod, name in (
        ("infiniteid.face.errors", "FaceError"),
        ("infiniteid.runtime.backend", "BackendError"),
        ("infiniteid.tokenize", "TokenizerError"),
    ):
        try:
            types.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _warning_printer(command: str, default):
    """The project's own warnings (a cut prompt, several faces in a photo) as one line each."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and category.__module__.startswith("infiniteid."):
            print(f"infiniteid {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infiniteid",
        description="InfiniteID-RT: identity-preserving SDXL (Infinite-ID) from PyTorch to ONNX and TensorRT.",
        epilog="Run 'infiniteid COMMAND --help' for each command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"infiniteid-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"infiniteid.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            return int(args.run(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM too where a command turns it into one (exit_status 143)
        print("interrupted", file=sys.stderr)
        return int(getattr(e, "exit_status", 130))
    except _user_errors() as e:
        print(f"infiniteid {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `infiniteid inspect B | head`: the reader left; say nothing more
        try:
            sys.stdout = open(os.devnull, "w")  # Python's exit flush would raise again
        except OSError:
            pass
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    # Run through the package's module so that UserError is one class, not two.
    from infiniteid.cli import main as _main

    sys.exit(_main())
