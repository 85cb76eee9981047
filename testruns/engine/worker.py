"""The Dramatiq middleware that runs a worker process's lease keeping
(testruns.engine.lease_keeping): settings name it, so Dramatiq finds it here.

django_dramatiq builds this middleware while Django's app registry is still loading, so this
module imports nothing that imports models at the top; it reaches lease_keeping only once the
worker has booted."""

from __future__ import annotations

import dramatiq
from django.db import DatabaseError, connection

from testruns.engine import worker_identity


class LeaseKeeper(dramatiq.Middleware):
    def __init__(self) -> None:
        self.keeping = None

    def before_worker_boot(self, broker, worker) -> None:
        """Prefetch no more messages than there are threads. Dramatiq's default (twice as
        many) lets one process hoard admitted cases that then wait behind threads busy
        handing cases to themselves, while they hold call slots and other processes idle."""
        worker.queue_prefetch = worker.worker_threads
        worker_identity.holder_id()  # drawn before any worker thread takes a case

    def after_worker_boot(self, broker, worker) -> None:
        worker_identity.booted(worker)
        # Imported here, not at the top: see the module docstring (the app registry is ready
        # by the time a worker has booted).
        from testruns.engine import lease_keeping

        self.keeping = lease_keeping.LeaseKeeping(
            worker_identity.holder_id(), worker_identity.host_and_pid(), worker_identity.stopping()
        )
        self.keeping.start()

    def after_worker_thread_boot(self, broker, thread) -> None:
        """Open this thread's database connection now, not when the first case arrives: a
        new PostgreSQL backend and its password exchange cost milliseconds each, paid by
        every thread at once when a run starts on a fresh worker. With the database away the
        thread boots all the same and connects at its first case."""
        try:
            connection.ensure_connection()
        except DatabaseError:
            connection.close()

    def before_worker_shutdown(self, broker, worker) -> None:
        worker_identity.stop()

    def after_worker_shutdown(self, broker, worker) -> None:
        if self.keeping is not None:
            self.keeping.stop()
