"""Keep a set of child processes alive: restart a crashed one with backoff, give up on one
that keeps crashing, and stop them all in order.

`make run` (project.stack) runs PostgreSQL, Redis, the web server and each Dramatiq worker
as children of one Supervisor. A child that dies on its own (OOM killer, crash, someone's
`kill`) is restarted after 0.5 s, 1 s, 2 s ... up to `max_backoff`; only when one child
crashes `max_crashes` times within `window` seconds does `watch` give up, because then a
restart is not going to help and a loud stop beats a silent loop.

Each child runs in its own session and process group: the terminal's Ctrl-C reaches only
the supervisor, and stopping or restarting a child also removes whatever it forked
(Dramatiq's worker process, PostgreSQL's backends).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

NEW, STARTING, RUNNING, WAITING, STOPPED = "new", "starting", "running", "waiting", "stopped"


class StartFailed(RuntimeError):
    """A child died, or did not become ready, while `Supervisor.start` brought it up."""


@dataclass
class _Child:
    name: str
    start: Callable[[], subprocess.Popen]
    ready: Callable[[], bool] | None
    ready_timeout: float
    stop_signal: int
    stop_timeout: float
    group: str
    process: subprocess.Popen | None = None
    state: str = NEW
    started_at: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Supervisor:
    """Start children, restart the ones that die, stop them all.

    `start` callables must return at once (readiness is polled with `ready`), start the
    child with `start_new_session=True`, and are called again for every restart.

    Children started with a parent-death signal (PR_SET_PDEATHSIG) get it when the *thread*
    that started them ends, so call `start` and `watch` from a thread that outlives the
    children, normally the main thread.
    """

    def __init__(
        self,
        *,
        max_crashes: int = 5,
        window: float = 60.0,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        log: Callable[[str], object] = print,
    ) -> None:
        self.max_crashes, self.window = max_crashes, window
        self.backoff, self.max_backoff = backoff, max_backoff
        self.log = log
        self._children: dict[str, _Child] = {}
        self._lock = threading.RLock()
        self._stopping = False

    def add(
        self,
        name: str,
        start: Callable[[], subprocess.Popen],
        *,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 15.0,
        group: str = "app",
        ready: Callable[[], bool] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        """Register a child. `ready` (if given) says when it serves; until then a (re)started
        child is not counted healthy, and one not ready within `ready_timeout` has crashed.
        `stop` stops groups in the reverse order of their first child, a group at once."""
        if name in self._children:
            raise ValueError(f"a child named {name!r} is already supervised")
        self._children[name] = _Child(
            name, start, ready, ready_timeout, stop_signal, stop_timeout, group
        )

    def names(self) -> list[str]:
        return list(self._children)

    def process(self, name: str) -> subprocess.Popen:
        """The child's current process (the dead one while a restart is pending)."""
        process = self._children[name].process
        if process is None:
            raise LookupError(f"{name} has not been started")
        return process

    def restarts(self, name: str) -> int:
        return self._children[name].restarts

    def is_up(self, name: str) -> bool:
        """Running and, if it has a readiness check, ready since its last (re)start."""
        child = self._children[name]
        return (
            child.state == RUNNING and child.process is not None and (child.process.poll() is None)
        )

    def start(self) -> None:
        """Start every child not started yet, in the order added, each ready before the next
        (the web server needs the database). Raises StartFailed when one does not come up."""
        with self._lock:
            for child in self._children.values():
                if child.state != NEW:
                    continue
                self._spawn(child)
                deadline = time.monotonic() + child.ready_timeout
                while child.state == STARTING:
                    returncode = child.process.poll()
                    if returncode is not None:
                        raise StartFailed(
                            f"{child.name} {describe_exit(returncode)} while starting"
                        )
                    if child.ready():
                        child.state = RUNNING
                    elif time.monotonic() > deadline:
                        raise StartFailed(
                            f"{child.name} did not become ready within {child.ready_timeout:.0f}s"
                        )
                    else:
                        time.sleep(0.05)

    def watch(self, stop: threading.Event, interval: float = 0.2) -> str | None:
        """Restart children that die until `stop` is set (returns None), or until one has
        crashed `max_crashes` times within `window` seconds (returns why it gave up)."""
        while not stop.wait(interval):
            with self._lock:
                if self._stopping:
                    return None
                for child in self._children.values():
                    reason = self._check(child)
                    if reason:
                        self.log(reason)
                        return reason
        return None

    def stop(self) -> None:
        """Stop groups in the reverse order they were added (app before services); within a
        group signal every child first, then wait for each, then kill its process group."""
        with self._lock:
            self._stopping = True
            groups: list[str] = []
            for child in self._children.values():
                if child.group not in groups:
                    groups.append(child.group)
            for group in reversed(groups):
                members = [c for c in reversed(self._children.values()) if c.group == group]
                for child in members:
                    if child.process is not None and child.process.poll() is None:
                        child.process.send_signal(child.stop_signal)
                for child in members:
                    self._finish(child)

    # --- internals ------------------------------------------------------------------------

    def _finish(self, child: _Child) -> None:
        child.state = STOPPED
        if child.process is None:
            return
        try:
            child.process.wait(child.stop_timeout)
        except subprocess.TimeoutExpired:
            self.log(f"{child.name} did not stop within {child.stop_timeout:.0f}s; killing it")
        _kill_group(child.process.pid)
        child.process.wait()

    def _spawn(self, child: _Child) -> None:
        child.process = child.start()
        child.started_at = time.monotonic()
        child.state = STARTING if child.ready else RUNNING

    def _check(self, child: _Child) -> str | None:
        now = time.monotonic()
        if child.state == WAITING:
            if now < child.restart_at:
                return None
            child.restarts += 1
            try:
                self._spawn(child)
            except Exception as exc:  # a start that fails is a crash like any other
                return self._crashed(child, f"could not be started ({exc})")
            self.log(
                f"{child.name} restarted as pid {child.process.pid} (restart {child.restarts})"
            )
            return None
        if child.state not in (STARTING, RUNNING):
            return None
        returncode = child.process.poll()  # also reaps it: no zombie is left behind
        if returncode is not None:
            return self._crashed(child, f"(pid {child.process.pid}) {describe_exit(returncode)}")
        if child.state == STARTING:
            if child.ready():
                child.state = RUNNING
                self.log(f"{child.name} is up again (pid {child.process.pid})")
            elif now - child.started_at > child.ready_timeout:
                _kill_group(child.process.pid)
                child.process.wait()
                return self._crashed(
                    child, f"did not become ready within {child.ready_timeout:.0f}s"
                )
        return None

    def _crashed(self, child: _Child, what: str) -> str | None:
        if child.process is not None:
            _kill_group(child.process.pid)  # what it forked dies with it
        now = time.monotonic()
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.window:
            child.crashes.popleft()
        count = len(child.crashes)
        if count >= self.max_crashes:
            child.state = STOPPED
            return (
                f"{child.name} {what}; it crashed {count} times within "
                f"{self.window:.0f}s, so the supervisor gives up and stops everything"
            )
        delay = min(self.backoff * 2 ** (count - 1), self.max_backoff)
        child.state, child.restart_at = WAITING, now + delay
        self.log(
            f"{child.name} {what}; restarting in {delay:.1f}s (crash {count} of "
            f"{self.max_crashes} allowed within {self.window:.0f}s)"
        )
        return None


def _kill_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGKILL a child's process group and wait until its members are gone, so a restarted
    PostgreSQL finds no old backend still attached to its shared memory."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _live_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members
