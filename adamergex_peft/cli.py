"""The ``adamergex`` command line.

Each sub-command lives in its own module under :mod:`adamergex_peft.commands` and exposes
``register(subparsers)``, which adds an ``argparse`` parser whose ``func`` default runs the
command. Those modules import only ``argparse`` at module level, so ``adamergex --help`` and
``adamergex tasks-dir`` start without importing torch.

Errors that are the user's (a :class:`ValueError`, including :class:`AdaMergeXError`, or an
``OSError`` such as a missing folder) are printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback. SIGTERM is turned into an exception like SIGINT
(so ``finally`` blocks and context managers remove temporary folders), exit status 143.

Threads: see :func:`choose_threads`; the CLI applies it, library functions never change the
process's thread settings.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores not busy with other work).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def choose_threads(requested: int | None = None, command_default: int | None = None) -> int | None:
    """The CPU thread count for torch; ``None``: leave it to the user's ``OMP_NUM_THREADS``.

    ``--threads N`` wins; a set ``OMP_NUM_THREADS`` is respected (torch reads it); then the
    command's own default (``adamergex demo``: 1, because its table is reproducible only at a fixed
    thread count: float sums run in another order); otherwise the cores this process may use minus
    the 1-minute load average, at least 1. The commands run many
    small kernels (merges per module, tiny-model training and evaluation), where OpenMP threads
    that compete with other work for the same cores make each kernel wait for the slowest thread:
    2 threads on 2 busy cores were 80-160x slower than 1 (BENCHMARKS.md), while on idle cores
    all of them are used.
    """
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if command_default is not None:
        return command_default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def _apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads without importing torch (OMP_NUM_THREADS is read when it loads)."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that clean-up runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the command runs; restore the previous handler."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _apply_threads(choose_threads(args.threads, getattr(args, "default_threads", None)))
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"adamergex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"adamergex {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"adamergex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
