"""The CLI's process-level behaviour: SIGTERM cleans up like Ctrl-C (exit 143), and the thread policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from adamergex_peft import cli

SLEEPY = textwrap.dedent("""\
    import signal, sys, tempfile, time
    from adamergex_peft import cli

    # As from a terminal: Ctrl-C raises KeyboardInterrupt. (pytest-xdist workers ignore SIGINT,
    # and a child inherits that, so Python would not install its handler.)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def run(args):
        with tempfile.TemporaryDirectory(dir=sys.argv[1]) as folder:
            print(folder, flush=True)
            time.sleep(120)
        return 0

    def register(subparsers):
        subparsers.add_parser("sleepy").set_defaults(func=run)

    module = type(sys)("sleepy")
    module.register = register
    sys.modules["sleepy"] = module
    cli.COMMANDS = (*cli.COMMANDS, "sleepy")
    sys.exit(cli.main(["sleepy"]))
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_a_command_runs_cleanup_and_sets_the_exit_status(tmp_path, sig, code, word):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPY, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    folder = proc.stdout.readline().strip()
    assert os.path.isdir(folder)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"adamergex sleepy: {word}"
    assert not os.path.exists(folder)  # the TemporaryDirectory's clean-up ran
    assert list(tmp_path.iterdir()) == []


def test_sigterm_handler_is_restored_after_the_command(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keep this process's thread settings as they are
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["tasks-dir"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_threads_option_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.choose_threads(5) == 5


def test_user_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.choose_threads(None) is None


@pytest.mark.parametrize("load, expected", [(0.0, 4), (1.2, 3), (3.6, 1), (40.0, 1)])
def test_default_threads_are_the_cores_left_by_the_load(monkeypatch, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert cli.choose_threads(None) == expected


def test_a_command_default_comes_after_the_user_settings(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.choose_threads(None, 1) == 1
    assert cli.choose_threads(3, 1) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.choose_threads(None, 1) is None
    args = cli.build_parser().parse_args(["demo"])
    assert args.default_threads == 1


def test_threads_flag_reaches_torch_in_a_command():
    code = (
        "import sys, os; from adamergex_peft import cli; cli.main(['--threads', '1', 'tasks-dir']); "
        "import torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["1", "1"]


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--threads", "0", "tasks-dir"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
