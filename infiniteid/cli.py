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
import sys
from typing import List, Optional

COMMANDS = ("demo", "generate", "export", "inspect", "build", "check", "train", "evaluate", "world")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infiniteid",
        description="InfiniteID-RT: identity-preserving SDXL (Infinite-ID) from PyTorch to ONNX and TensorRT.",
        epilog="Run 'infiniteid COMMAND --help' for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"infiniteid.commands.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"infiniteid {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run through the package's module so that UserError is one class, not two.
    from infiniteid.cli import main as _main

    sys.exit(_main())
