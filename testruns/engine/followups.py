"""What a closed case or a finished run leaves to do that no case waits for: telling pages
(progress, a run's end, the runs promoted into its slot) and storing a finished run's
aggregates. In a worker process they run in one thread of their own, in the order they were
asked for, so the thread that freed a slot goes straight on to the case it kept; a hand-over
no longer waits for the channel layer. Elsewhere (tests and tools that run cases in their
own thread) they run at once.

Each follow-up handles its own failures (they are cosmetic once the gate's work is
committed: pages resynchronise from snapshots, reports store aggregates on first view);
what is still queued when the worker stops gets a few seconds to finish.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from django.db import close_old_connections, connection

log = logging.getLogger(__name__)

_STOP = object()


class Followups:
    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.inbox = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._serve, args=(self.inbox,), name="followups", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Run what is queued (for up to `timeout` seconds), then go back to running at once."""
        inbox, thread = self.inbox, self.thread
        self.inbox = self.thread = None
        if inbox is not None and thread is not None:
            inbox.put(_STOP)
            thread.join(timeout)

    def later(self, followup: Callable[[], None]) -> None:
        inbox = self.inbox
        if inbox is None:
            followup()
        else:
            inbox.put(followup)

    @staticmethod
    def _serve(inbox: queue.SimpleQueue) -> None:
        while (followup := inbox.get()) is not _STOP:
            try:
                close_old_connections()
                followup()
            except Exception:  # each handles its own; this is a bug, and must not stop the rest
                log.exception("a follow-up failed")
                connection.close()
        connection.close()


followups = Followups()
