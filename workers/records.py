"""What a worker reports about itself: its identity and its ledger.

The epoch is drawn fresh at every construction, so a worker that restarted (and lost its
pools) is told apart from the one a coordinator knew, and its ledger starts empty.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from kvservice.core.layout import Layout
from kvservice.core.records import SeqRecord


def new_epoch() -> int:
    """A random non-zero 63-bit int: fits a signed int64 on the wire."""
    return secrets.randbits(63) | 1


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: int
    epoch: int
    device: str
    layout: Layout
    num_gpu_blocks: int
    num_cpu_blocks: int


@dataclass(frozen=True, slots=True)
class Ledger:
    """The coordinator's records of the sequences on this worker, as last sent to it."""

    epoch: int
    records: dict[int, SeqRecord]
