"""`make run`'s supervisor: the whole app comes up, a second copy refuses to start, and
Ctrl-C leaves no process behind."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

from project.embedded import free_port
from tests.conftest import ROOT, ChildProcess, wait_for


def stack_env(tmp_path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    return env | {"VAR_DIR": str(tmp_path / "var"), "WEB_PORT": str(free_port()),
                  "EMBEDDED_PG_PORT": str(free_port()), "EMBEDDED_REDIS_PORT": str(free_port()),
                  "WORKER_PROCESSES": "1", "WORKER_THREADS": "2"}


def test_run_starts_everything_refuses_a_second_copy_and_ctrl_c_leaves_no_process(tmp_path):
    env = stack_env(tmp_path)
    stack = ChildProcess("stack", [sys.executable, "-m", "project.stack", "run"], env)
    try:
        wait_for(lambda: "is up" in stack.output() or stack.process.poll() is not None,
                 timeout=120, what="make run to come up")
        assert "Log in as admin / " in stack.output(), stack.output()
        password = (tmp_path / "var" / "admin-password.txt").read_text().strip()
        assert password in stack.output()

        second = subprocess.run([sys.executable, "-m", "project.stack", "run"], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "already running" in second.stderr

        family = psutil.Process(stack.process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        for part in ["postgres", "redis-server", "daphne", "dramatiq"]:
            assert part in names

        stack.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert stack.process.wait(60) == 0
        assert "Stopped." in stack.output()
        alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == []
    finally:
        stack.stop(signal.SIGKILL)
