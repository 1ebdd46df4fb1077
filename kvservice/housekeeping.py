"""A daemon thread that runs a few housekeeping jobs every so often.

Used for the lease reaper (``kvservice.leases``) and for taking restarted workers back
(``Coordinator.rejoin_workers``). A job that raises is logged and runs again next round:
housekeeping must never stop because one round failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from kvservice.core.errors import InvalidArgument, KVServiceError

log = logging.getLogger(__name__)


class Housekeeper:
    """Runs ``jobs`` in order every ``interval_s`` seconds on a daemon thread, once started."""

    def __init__(
        self, interval_s: float, jobs: Sequence[Callable[[], object]], *, name: str = "kvservice-housekeeping"
    ) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, int | float) or not interval_s > 0:
            raise InvalidArgument(f"a housekeeping interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._jobs = list(jobs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Housekeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current round (waits for it unless called from a job)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def run_once(self) -> None:
        for job in self._jobs:
            try:
                job()
            except KVServiceError as exc:  # shutting down, say: next round
                log.warning("housekeeping job %s: %s", getattr(job, "__name__", job), exc)
            except Exception:
                log.exception("housekeeping job %s failed", getattr(job, "__name__", job))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_once()
