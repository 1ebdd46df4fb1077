"""Random operation sequences against plain-list models of the tokens and of the memory.

The machine plays the workers too: it runs every returned command on a fake memory where
each slot holds (tenant, all tokens up to that position) -- what real K/V depends on --
and writes that value into the slots the manager hands out. After every step each
sequence's computed positions must read back their own tenant and token prefix, so a
wrong prefix hit, copy-on-write, swap or eviction shows up as a wrong slot. Also checked
after every step: the manager's own invariants, refcounts == page-table refs + pins
(from the model's pins), used + cached + free == pool size, tokens == the model.
A second machine makes block hashes collide constantly, so hits rest on token compares.
The ledgers are workers' ledger books fed whole records and deltas as the coordinator
feeds them; a restart rebuilds the manager from them and must find every sequence.
"""

from __future__ import annotations

import copy
from typing import Any

import hypothesis.strategies as st
import pytest
import xxhash
from core_helpers import snapshot
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kvservice.workers.records import LedgerBook

import kvservice.core.ledger as ledger_module
import kvservice.core.manager_steps as steps_module
import kvservice.core.prefix_cache as prefix_module
from kvservice.core.commands import (
    Command,
    CopyBlocks,
    CreateResult,
    FreeBlocks,
    OutOfMemory,
    PoolSizes,
    StepResult,
    SwapIn,
    SwapOut,
)
from kvservice.core.errors import DataLoss, InvalidArgument, NotFound
from kvservice.core.ids import Tier
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager

BS = 4
LAYOUT = Layout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=BS)
VOCAB = 3  # few distinct tokens: prompts share prefixes often
OPTIONS: dict[str, Any] = dict(high_watermark=0.9, low_watermark=0.7, vocab_size=VOCAB)
POISON = "freed"
Key = tuple[int, Tier, int]

prompts = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14)
tenants = st.sampled_from(["a", "b"])


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.now = 1000.0
        self.sizes = {0: PoolSizes(10, 6), 1: PoolSizes(6, 4)}
        self.m = KVCacheManager(LAYOUT, self.sizes, clock=self.clock, **OPTIONS)
        self.tokens: dict[int, list[int]] = {}
        self.tenant: dict[int, str] = {}
        self.written: dict[int, int] = {}
        self.mem: dict[Key, list[Any]] = {}
        self.pins: dict[int, tuple[int, list[tuple[Tier, int]], float | None]] = {}
        self.ledgers = {w: LedgerBook() for w in self.sizes}
        self.freed: list[int] = []
        self.lost: list[int] = []

    def clock(self) -> float:
        return self.now

    # -- the fake workers ---------------------------------------------------------------

    def apply(self, commands: list[Command]) -> None:
        for c in commands:
            if isinstance(c, FreeBlocks):
                for b in c.block_ids:
                    self.mem[(c.worker_id, c.tier, b)] = [POISON] * BS
                continue
            src_tier, dst_tier = {
                CopyBlocks: (Tier.GPU, Tier.GPU),
                SwapOut: (Tier.GPU, Tier.CPU),
                SwapIn: (Tier.CPU, Tier.GPU),
            }[type(c)]
            for src, dst in c.pairs:
                data = self.mem.get((c.worker_id, src_tier, src), [None] * BS)
                self.mem[(c.worker_id, dst_tier, dst)] = list(data)

    def content(self, sid: int, pos: int) -> tuple[str, tuple[int, ...]]:
        return (self.tenant[sid], tuple(self.tokens[sid][: pos + 1]))

    def write(self, sid: int, worker_id: int, slots: list[int], start: int) -> None:
        for pos, slot in enumerate(slots, start):
            self.mem.setdefault((worker_id, Tier.GPU, slot // BS), [None] * BS)
            self.mem[(worker_id, Tier.GPU, slot // BS)][slot % BS] = self.content(sid, pos)

    def computed_to(self, sid: int, start: int, end: int) -> None:
        if start <= self.written[sid]:
            self.written[sid] = max(self.written[sid], end)
        self.m.mark_computed(sid, self.written[sid])

    def add_seq(self, sid: int, tenant: str, tokens: list[int], written: int) -> None:
        self.tokens[sid], self.tenant[sid], self.written[sid] = list(tokens), tenant, written

    def drop_seq(self, sid: int) -> None:
        del self.tokens[sid], self.tenant[sid], self.written[sid]

    def live(self) -> list[int]:
        return sorted(self.tokens)

    def on_worker(self, w: int) -> list[int]:
        return [s for s in self.live() if self.m.sequence(s).worker_id == w]

    # -- rules --------------------------------------------------------------------------

    @rule(tenant=tenants, tokens=prompts, prefill=st.booleans(), data=st.data())
    def create(self, tenant: str, tokens: list[int], prefill: bool, data: st.DataObject) -> None:
        worker_id = data.draw(st.sampled_from([None, *self.m.workers]))
        before = self.snapshot(self.m)
        result = self.m.create(tenant, tokens, worker_id=worker_id)
        if isinstance(result, OutOfMemory):
            assert self.snapshot(self.m) == before
            return
        assert result.num_cached_tokens % BS == 0 and result.num_cached_tokens < len(tokens)
        self.apply(result.commands)
        self.add_seq(result.seq_id, tenant, tokens, result.num_cached_tokens)
        if prefill:  # what an engine does next: compute the uncached rest of the prompt
            self.write_range(result.seq_id, result.num_cached_tokens, len(tokens))

    def write_range(self, sid: int, start: int, end: int) -> None:
        before = self.snapshot(self.m)
        plan = self.m.prepare_write(sid, start, end)
        if isinstance(plan, OutOfMemory):
            assert self.snapshot(self.m) == before
            return
        self.apply(plan.commands)
        assert len(plan.slots) == end - start
        self.write(sid, plan.worker_id, plan.slots, start)
        self.computed_to(sid, start, end)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6))
    def append(self, data: st.DataObject, extra: list[int]) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        before = self.snapshot(self.m)
        result = self.m.append(sid, extra)
        if isinstance(result, OutOfMemory):
            assert self.snapshot(self.m) == before
            return
        self.apply(result.commands)
        self.tokens[sid] += extra

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append_many(self, data: st.DataObject) -> None:
        # A step's appends in one call: the same commands and the same state as the
        # appends one at a time (a twin manager does those), up to the first that runs
        # out of memory.
        sids = data.draw(
            st.lists(st.sampled_from(self.live()), min_size=1, max_size=6, unique=True)
        )
        news = [data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=2)) for _ in sids]
        twin = copy.deepcopy(self.m, {id(self): self})  # the manager's clock is ours
        commands, done, oom = self.m.append_many(sids, news)
        expected: list[Command] = []
        for sid, new in zip(sids[:done], news[:done], strict=True):
            one = twin.append(sid, new)
            assert isinstance(one, StepResult), one
            expected += one.commands
        if oom is not None:
            assert isinstance(twin.append(sids[done], news[done]), OutOfMemory)
        else:
            assert done == len(sids)
        assert commands == expected
        assert self.snapshot(self.m) == self.snapshot(twin)
        self.apply(commands)
        for sid, new in zip(sids[:done], news[:done], strict=True):
            self.tokens[sid] += new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        w = self.m.sequence(data.draw(st.sampled_from(self.live()))).worker_id
        sids = data.draw(st.lists(st.sampled_from(self.on_worker(w)), min_size=1, unique=True))
        toks = data.draw(
            st.lists(st.integers(0, VOCAB - 1), min_size=len(sids), max_size=len(sids))
        )
        before = self.snapshot(self.m)
        plan = self.m.prepare_decode(sids, toks)
        if isinstance(plan, OutOfMemory):
            assert self.snapshot(self.m) == before
            return
        self.apply(plan.commands)
        for i, (sid, tok) in enumerate(zip(sids, toks, strict=True)):
            self.tokens[sid].append(tok)
            pos = len(self.tokens[sid]) - 1
            assert plan.seq_lens[i] == pos + 1
            assert plan.block_tables[i] == self.m.sequence(sid).block_ids
            self.write(sid, w, [plan.slots[i]], pos)
            self.computed_to(sid, pos, pos + 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def write_kv(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        n = len(self.tokens[sid])
        start = data.draw(st.sampled_from(sorted({self.written[sid], 0, n})))
        end = data.draw(st.sampled_from(sorted({n, *range(start, n + 1, BS)})))
        self.write_range(sid, start, end)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def attend(self, data: st.DataObject) -> None:
        w = self.m.sequence(data.draw(st.sampled_from(self.live()))).worker_id
        sids = data.draw(st.lists(st.sampled_from(self.on_worker(w)), min_size=1))
        before = self.snapshot(self.m)
        plan = self.m.prepare_attention(sids)
        if isinstance(plan, OutOfMemory):
            assert self.snapshot(self.m) == before
            return
        self.apply(plan.commands)
        for sid, table, n in zip(sids, plan.block_tables, plan.seq_lens, strict=True):
            view = self.m.sequence(sid)
            assert view.tiers == [Tier.GPU] * len(table) and view.block_ids == table
            assert n == len(self.tokens[sid])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 2))
    def fork(self, data: st.DataObject, n: int) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        for child in self.m.fork(sid, n):
            self.add_seq(child, self.tenant[sid], self.tokens[sid], self.written[sid])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        length = data.draw(st.integers(0, len(self.tokens[sid])))
        self.apply(self.m.truncate(sid, length))
        del self.tokens[sid][length:]
        self.written[sid] = min(self.written[sid], length)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        self.apply(self.m.free(sid))
        self.drop_seq(sid)
        self.freed.append(sid)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), offload=st.booleans())
    def hint(self, data: st.DataObject, offload: bool) -> None:
        sids = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, max_size=4))
        self.apply(self.m.offload(sids) if offload else self.m.prefetch(sids))

    @rule(data=st.data(), n=st.integers(0, 4), cpu=st.booleans())
    def evict(self, data: st.DataObject, n: int, cpu: bool) -> None:
        w = data.draw(st.sampled_from(self.m.workers))
        assert 0 <= self.m.evict_cached(w, n, Tier.CPU if cpu else Tier.GPU) <= n

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), hard=st.booleans(), ttl=st.integers(1, 10))
    def pin(self, data: st.DataObject, hard: bool, ttl: int) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        view = self.m.sequence(sid)
        self.apply(self.m.pin(sid, hard=hard, ttl_s=None if hard else float(ttl)))
        blocks = list(zip(view.tiers, view.block_ids, strict=True))
        self.pins[sid] = (view.worker_id, blocks, None if hard else self.now + ttl)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.pins)))
        self.apply(self.m.unpin(sid))
        del self.pins[sid]

    @rule(dt=st.integers(0, 8))
    def tick(self, dt: int) -> None:
        self.now += dt
        self.apply(self.m.expire_pins())
        for sid, (_, _, deadline) in list(self.pins.items()):
            if deadline is not None and deadline <= self.now:
                del self.pins[sid]

    @rule(tenant=tenants, tokens=prompts, data=st.data())
    def lookup_then_create(self, tenant: str, tokens: list[int], data: st.DataObject) -> None:
        found = self.m.lookup_prefix(tenant, tokens)
        assert all(0 < n < len(tokens) and n % BS == 0 for n in found.values())
        w = data.draw(st.sampled_from(self.m.workers))
        result = self.m.create(tenant, tokens, worker_id=w)
        if isinstance(result, CreateResult):
            assert result.num_cached_tokens == found.get(w, 0)
            self.apply(result.commands)
            self.add_seq(result.seq_id, tenant, tokens, result.num_cached_tokens)

    @rule(data=st.data())
    def misuse(self, data: st.DataObject) -> None:
        calls: list[tuple[Any, type[Exception]]] = [(lambda: self.m.append(10_000, [0]), NotFound)]
        if self.freed:
            gone = data.draw(st.sampled_from(self.freed))
            calls.append((lambda: self.m.fork(gone, 1), InvalidArgument))
        if self.lost:
            calls.append((lambda: self.m.sequence(self.lost[-1]), DataLoss))
        if self.tokens:
            sid = data.draw(st.sampled_from(self.live()))
            calls += [
                (lambda: self.m.truncate(sid, len(self.tokens[sid]) + 1), InvalidArgument),
                (lambda: self.m.append(sid, [VOCAB]), InvalidArgument),
                (lambda: self.m.prepare_write(sid, 0, len(self.tokens[sid]) + 1), InvalidArgument),
            ]
        call, error = data.draw(st.sampled_from(calls))
        before = self.snapshot(self.m)
        with pytest.raises(error):
            call()
        assert self.snapshot(self.m) == before

    @precondition(lambda self: len(self.m.workers) > 1)
    @rule(data=st.data())
    def lose_worker(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.m.workers))
        expected = self.on_worker(w)
        assert self.m.remove_worker(w) == expected
        for sid in expected:
            self.drop_seq(sid)
        self.lost += expected
        self.pins = {s: p for s, p in self.pins.items() if p[0] != w}
        self.mem = {k: v for k, v in self.mem.items() if k[0] != w}
        del self.sizes[w], self.ledgers[w]
        new = max(self.m.workers) + 1
        self.sizes[new] = PoolSizes(8, 4)
        self.ledgers[new] = LedgerBook()
        self.m.add_worker(new, self.sizes[new])

    @rule()
    def send_ledgers(self) -> None:
        """What the coordinator sends after a call: whole records or deltas, then the
        computed counts. A record folded from deltas equals the whole one, every time."""
        for w, changes in self.m.take_ledger_changes().items():
            book = self.ledgers[w]
            delta = changes.delta()
            sizes = (self.sizes[w].num_gpu_blocks, self.sizes[w].num_cpu_blocks)
            book.update(changes.upserts, changes.deletes, sizes, delta)
            held = book.snapshot(0).records
            for sid in (*changes.upserts, *(delta.seq_ids if delta else ())):
                assert held[sid] == self.m.record(sid), sid
            assert not set(changes.deletes) & set(held)
        for w, progress in self.m.take_progress_updates().items():
            self.ledgers[w].update_progress(progress)

    @rule()
    def restart_coordinator(self) -> None:
        self.send_ledgers()
        records = {w: book.snapshot(0).records for w, book in self.ledgers.items()}
        rebuilt = KVCacheManager.from_ledgers(
            LAYOUT, self.sizes, records, clock=self.clock, **OPTIONS
        )
        for sid in self.live():
            assert rebuilt.sequence(sid) == self.m.sequence(sid)
        for w, tiers in self.m.usage().items():
            for tier, use in tiers.items():
                assert rebuilt.usage()[w][tier].used == use.used
        self.m = rebuilt
        # A new coordinator never saw the freed or lost ids; to it they are unknown.
        self.freed, self.lost = [], []

    # -- checks after every step ----------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        m = self.m
        m.check_invariants()
        assert m.num_sequences == len(self.tokens)
        refs: dict[Key, int] = {}
        for sid in self.live():
            view = m.sequence(sid)
            assert view.tokens == self.tokens[sid] and view.tenant == self.tenant[sid]
            assert view.num_computed_tokens == self.written[sid]
            assert len(view.block_ids) == -(-len(view.tokens) // BS)
            for tier, b in zip(view.tiers, view.block_ids, strict=True):
                refs[(view.worker_id, tier, b)] = refs.get((view.worker_id, tier, b), 0) + 1
            for pos in range(self.written[sid]):
                key = (view.worker_id, view.tiers[pos // BS], view.block_ids[pos // BS])
                got = self.mem.get(key, [None] * BS)[pos % BS]
                assert got == self.content(sid, pos), f"seq {sid} pos {pos}: {got}"
        for w, blocks, _ in self.pins.values():
            for tier, b in blocks:
                refs[(w, tier, b)] = refs.get((w, tier, b), 0) + 1
        for w, ws in m._workers.items():
            for pool in (ws.gpu, ws.cpu):
                for meta in pool.metas:
                    assert meta.ref_cnt == refs.get((w, pool.tier, meta.block_id), 0)
        for w, tiers in m.usage().items():
            for tier, use in tiers.items():
                assert use.used + use.cached + use.free == use.total
                assert use.used == sum(1 for k in refs if k[0] == w and k[1] == tier)


class CollidingHashMachine(CoreMachine):
    """Every hash takes one of four values: hits must come from token compares."""

    def __init__(self) -> None:
        super().__init__()
        self._patched = [
            (mod, mod.chain_hash) for mod in (prefix_module, steps_module, ledger_module)
        ]

        def weak(parent: int, data: bytes) -> int:
            return xxhash.xxh3_64_intdigest(data, parent) & 3

        for mod, _ in self._patched:
            mod.chain_hash = weak  # type: ignore[assignment]

    def teardown(self) -> None:
        for mod, original in self._patched:
            mod.chain_hash = original  # type: ignore[assignment]


FAST = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = FAST
TestCollidingHashMachine = CollidingHashMachine.TestCase
TestCollidingHashMachine.settings = FAST
