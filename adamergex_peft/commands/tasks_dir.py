"""``adamergex tasks-dir``: print the folder holding the ``adamergex_*`` lm-eval task YAML.

Use it with lm-eval's ``--include_path``::

    lm_eval --model adamergex --tasks adamergex_xcopa_sw --include_path "$(adamergex tasks-dir)" ...

(Where the ``adamergex_lm_eval.pth`` start-up hook is active, wheel and editable installs, it adds
this folder to the index of every ``TaskManager`` that indexes lm-eval's built-in tasks, so
``--include_path`` is optional for the ``lm_eval`` CLI there.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASKS_FOLDER = "lm_eval_tasks"


def find_tasks_dir() -> Path:
    """Return the AdaMergeX lm-eval task folder.

    A wheel install ships it inside the package as ``adamergex_peft/lm_eval_tasks``; in a source
    checkout (including an editable install, which does not copy it) it is ``<repo>/lm_eval_tasks``.

    Raises:
        FileNotFoundError: if neither folder exists.
    """
    package_dir = Path(__file__).resolve().parent.parent
    candidates = (package_dir / TASKS_FOLDER, package_dir.parent / TASKS_FOLDER)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no {TASKS_FOLDER} folder found (looked in {', '.join(str(c) for c in candidates)}); "
        "reinstall adamergex-peft from a wheel or run from a source checkout"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tasks-dir`` sub-command."""
    parser = subparsers.add_parser(
        "tasks-dir",
        help="Print the folder of the adamergex_* lm-eval tasks (for lm_eval --include_path).",
        description=(
            "Print the folder holding the adamergex_* lm-eval task YAML, for "
            'lm_eval --include_path "$(adamergex tasks-dir)".'
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the task folder; exit status 2 (via the dispatcher) if it cannot be found."""
    print(find_tasks_dir())
    return 0
