"""Workers: one per GPU, owning the block pools and running the kernels next to the data.

``Worker`` is a plain class; ``make_worker_actor`` and ``start_worker_actors`` put it
under Ray (imported only when called, so the embedded path never loads Ray).
"""

from kvservice.workers.actor import (
    DEFAULT_NAMESPACE,
    WorkerGroup,
    actor_name,
    find_worker_actors,
    make_worker_actor,
    start_worker_actors,
    stop_worker_actors,
)
from kvservice.workers.plan import AttendPlan
from kvservice.workers.records import Ledger, WorkerInfo
from kvservice.workers.worker import Worker

__all__ = [
    "DEFAULT_NAMESPACE",
    "AttendPlan",
    "Ledger",
    "Worker",
    "WorkerGroup",
    "WorkerInfo",
    "actor_name",
    "find_worker_actors",
    "make_worker_actor",
    "start_worker_actors",
    "stop_worker_actors",
]
