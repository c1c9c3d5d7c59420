"""The ``adamergex`` command line.

Each sub-command lives in its own module under :mod:`adamergex_peft.commands` and exposes
``register(subparsers)``, which adds an ``argparse`` parser whose ``func`` default runs the
command. Those modules import only ``argparse`` at module level, so ``adamergex --help`` and
``adamergex tasks-dir`` start without importing torch.

Errors that are the user's (a :class:`ValueError`, including :class:`AdaMergeXError`, or an
``OSError`` such as a missing folder) are printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Sub-command modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "adamergex_peft.commands.merge",
    "adamergex_peft.commands.build_reference_data",
    "adamergex_peft.commands.train",
    "adamergex_peft.commands.sweep",
    "adamergex_peft.commands.demo",
    "adamergex_peft.commands.tasks_dir",
)


def build_parser() -> argparse.ArgumentParser:
    from adamergex_peft import __version__

    parser = argparse.ArgumentParser(
        prog="adamergex",
        description="AdaMergeX cross-lingual adapter merging for PEFT adapters.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="More logging (-v: INFO, -vv: DEBUG).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"adamergex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adamergex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
