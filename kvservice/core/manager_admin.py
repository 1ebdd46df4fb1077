"""KVCacheManager calls that steer rather than run sequences: pins, tier hints, cache
eviction, workers joining and leaving, views, usage and the ledger (see manager.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvservice.core.commands import Command, PoolSizes, SeqView, TierUsage
from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier
from kvservice.core.invariants import check_manager
from kvservice.core.ledger import LedgerChanges, build_record, take_changes
from kvservice.core.manager_base import ManagerBase, check_count
from kvservice.core.pins import Pin
from kvservice.core.planner import choose_victims, cpu_blocks_of, swap_in, swap_out
from kvservice.core.records import SeqRecord
from kvservice.core.sequence import SeqState


class ManagerAdmin(ManagerBase):
    # -- pins ---------------------------------------------------------------------------

    def pin(self, seq_id: int, *, hard: bool = True, ttl_s: float | None = None) -> list[Command]:
        """Keep the sequence's current blocks in place (see pins.py); replaces its pin."""
        seq = self._seq(seq_id)
        if hard and ttl_s is not None:
            raise InvalidArgument("a hard pin has no ttl; pass hard=False for a soft pin")
        if not hard and (
            not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0
        ):
            raise InvalidArgument(f"a soft pin needs ttl_s > 0, got {ttl_s!r}")
        ws = self._workers[seq.worker_id]
        for meta in seq.blocks:
            ws.pool(meta.tier).incref(meta)
        deadline = None if hard else self._clock() + float(ttl_s)  # type: ignore[arg-type]
        pin = Pin(
            ws.worker_id, list(seq.blocks), hard, deadline, seq.tenant, tuple(seq.tokens),
            seq.num_computed,
        )
        old = self._pins.add(seq_id, pin)
        self._upserts.add(seq_id)
        return self._release(ws, old.blocks) if old is not None else []

    def expire_pins(self) -> list[Command]:
        """End the soft pins whose time is up (calls that allocate do this first)."""
        return self._expire_pins()

    def unpin(self, seq_id: int) -> list[Command]:
        if seq_id not in self._pins:
            self._seq(seq_id)  # NotFound / DataLoss for ids that are not live
            return []
        return self._drop_pin(seq_id)

    # -- tier hints and eviction ----------------------------------------------------------

    def offload(self, seq_ids: Sequence[int]) -> list[Command]:
        """Swap the sequences' GPU blocks to CPU, as far as the CPU tier has room.

        Pinned sequences stay, and blocks shared with sequences not listed stay too."""
        seqs = [self._seq(s) for s in seq_ids]
        self._expire_pins()
        commands: list[Command] = []
        for ws in self._workers.values():
            mine = [s for s in seqs if s.worker_id == ws.worker_id and s.seq_id not in self._pins]
            if mine:
                victims, _ = choose_victims(mine, math.inf, ws.cpu.num_queued)
                commands += swap_out(ws, victims)
                self._upserts.update(s.seq_id for s in victims)
        return commands

    def prefetch(self, seq_ids: Sequence[int]) -> list[Command]:
        """Swap the sequences back to GPU, in order, while free or cached blocks last;
        never swaps anything else out."""
        seqs = [self._seq(s) for s in seq_ids]
        self._expire_pins()
        commands: list[Command] = []
        for ws in self._workers.values():
            chosen: list[SeqState] = []
            for seq in seqs:
                if seq.worker_id == ws.worker_id and seq.num_cpu_blocks:
                    if len(cpu_blocks_of([*chosen, seq])) <= ws.gpu.num_queued:
                        chosen.append(seq)
            if chosen:
                commands += swap_in(ws, chosen)
                self._upserts.update(s.seq_id for s in chosen)
        return commands

    def evict_cached(
        self, worker_id: int, num_blocks: int | None = None, tier: Tier = Tier.GPU
    ) -> int:
        """Drop cached blocks of one tier, least recently released first; returns how many."""
        pool = self._worker(worker_id).pool(Tier(tier))
        limit = pool.num_cached if num_blocks is None else check_count("num_blocks", num_blocks, 0)
        return pool.evict_cached(limit)

    # -- workers ------------------------------------------------------------------------

    def add_worker(self, worker_id: int, sizes: PoolSizes) -> None:
        self._add_worker(worker_id, sizes)

    def remove_worker(self, worker_id: int) -> list[int]:
        """Forget a worker and everything on it; returns the sequences lost with it."""
        ws = self._worker(worker_id)
        lost = sorted(ws.seqs)
        for seq_id in lost:
            del self._seqs[seq_id]
            self._upserts.discard(seq_id)
        for seq_id in self._pins.on_worker(worker_id):
            self._pins.pop(seq_id)
            self._upserts.discard(seq_id)
        for seq_id in [s for s, w in self._deletes.items() if w == worker_id]:
            del self._deletes[seq_id]
        self._lost.update(lost)
        del self._workers[worker_id]
        return lost

    @property
    def workers(self) -> list[int]:
        return sorted(self._workers)

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # -- views --------------------------------------------------------------------------

    def sequence(self, seq_id: int) -> SeqView:
        seq = self._seq(seq_id)
        pin = self._pins.get(seq_id)
        return SeqView(
            seq.seq_id, seq.tenant, seq.worker_id, len(seq.tokens), seq.tokens.copy(),
            seq.block_ids.copy(), seq.tiers(), seq.num_computed,
            None if pin is None else ("hard" if pin.hard else "soft"),
        )

    def length(self, seq_id: int) -> int:
        """The sequence's token count, without the copies ``sequence`` makes."""
        return len(self._seq(seq_id).tokens)

    def usage(self) -> dict[int, dict[Tier, TierUsage]]:
        return {
            w: {
                pool.tier: TierUsage(pool.num_blocks, pool.num_used, pool.num_cached, pool.num_free)
                for pool in (ws.gpu, ws.cpu)
            }
            for w, ws in sorted(self._workers.items())
        }

    def check_invariants(self) -> None:
        """Raise AssertionError if any bookkeeping invariant is broken (tests call it)."""
        check_manager(self._workers, self._seqs, self._pins, self.block_size)

    # -- ledger -------------------------------------------------------------------------

    def record(self, seq_id: int) -> SeqRecord:
        """What the sequence's worker should keep so a new coordinator can rebuild it."""
        seq = self._seqs.get(seq_id)
        if seq is None and seq_id in self._pins:
            return build_record(seq_id, None, self._pins.get(seq_id))
        return build_record(seq_id, self._seq(seq_id), self._pins.get(seq_id))

    def take_ledger_updates(self) -> dict[int, tuple[dict[int, SeqRecord], list[int]]]:
        """(upserts, deletes) per worker for every record changed since the last call."""
        return {
            w: (changes.upserts, changes.deletes)
            for w, changes in take_changes(self, deltas=False).items()  # type: ignore[arg-type]
        }

    def take_ledger_changes(self) -> dict[int, LedgerChanges]:
        """As ``take_ledger_updates``, but a record the worker holds gets a delta:
        per worker ``upserts``, ``deletes`` and ``delta()`` (a RecordDelta or None)."""
        return take_changes(self)  # type: ignore[arg-type]

    def take_progress_updates(self) -> dict[int, dict[int, int]]:
        """{seq_id: num_computed_tokens} per worker for every live sequence whose computed
        count advanced since its record was last taken (``Worker.update_progress``)."""
        out: dict[int, dict[int, int]] = {}
        seqs = self._seqs
        for seq_id in self._progress:
            seq = seqs.get(seq_id)
            if seq is not None:
                out.setdefault(seq.worker_id, {})[seq_id] = seq.num_computed
        self._progress.clear()
        return out

