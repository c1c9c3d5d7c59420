"""Shared test set-up: the Hugging Face libraries offline (every test file and subprocess), xdist workers.

Set here (not in test files): the tests build tiny models and tokenizers in code
(:mod:`adamergex_peft.testing`) and must never reach the hub. Subprocesses inherit these variables.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_WORKERS = 4  # most of the suite's time is subprocess start-up and small kernels: more workers add memory


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """With pytest-xdist installed (the ``test`` extra), run on one worker per core, at most ``MAX_WORKERS``.

    Set here rather than as ``-n auto`` in ``addopts`` so that ``python -m pytest`` still works,
    serially, in an environment without xdist. An explicit ``-n N`` (``-n 0``: no workers) or
    ``-p no:xdist`` wins; ``--pdb`` runs serially (xdist's rule for ``-n auto``, which xdist
    resolves). Checked: plain, ``-n 0``, ``-p no:xdist`` and ``--pdb`` runs.
    """
    if not config.pluginmanager.hasplugin("xdist") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if config.option.numprocesses is None and not config.option.collectonly:
        config.option.numprocesses = "auto"
        if config.option.maxprocesses is None:
            config.option.maxprocesses = MAX_WORKERS


@pytest.fixture
def lm_eval_cli(monkeypatch, capsys):
    """Run ``lm_eval <args>`` in this process (``lm_eval.__main__.cli_evaluate``).

    Returns ``run(*args, cwd=...) -> (exit status, stdout, stderr)``; exceptions other than
    ``SystemExit`` propagate, as they would end a real ``lm_eval`` with a traceback. For tests of
    argument handling and output: it saves the interpreter start-up and the lm-eval import of a
    subprocess. The real console script runs in tests/test_lm_eval_plugin.py. lm-eval's
    ``setup_logging`` (a handler on the ``lm_eval`` logger, which it stops propagating) is undone.
    """
    import logging

    import lm_eval.utils
    from lm_eval.__main__ import cli_evaluate

    logger = logging.getLogger("lm_eval")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", lm_eval.utils._LOGGING_CONFIGURED)
    level = logger.level

    def run(*args, cwd) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["lm_eval", *map(str, args)])
        capsys.readouterr()
        try:
            cli_evaluate()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            logger.setLevel(level)
        out, err = capsys.readouterr()
        return code, out, err

    return run
