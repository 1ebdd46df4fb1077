"""The per-step calls of KVCacheManager: make sequences writable and attendable on the
GPU tier and feed the prefix cache (see manager.py for the API). Each plans first and
commits only when the room is there, so out of memory changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

from kvservice.core.commands import (
    AttentionPlan,
    Command,
    DecodePlan,
    OutOfMemory,
    WritePlan,
)
from kvservice.core.errors import InvalidArgument
from kvservice.core.manager_admin import ManagerAdmin
from kvservice.core.manager_base import Write, check_count
from kvservice.core.prefix_cache import chain_hash, encode_tokens, register


class ManagerSteps(ManagerAdmin):
    def prepare_decode(
        self, seq_ids: Sequence[int], tokens: Sequence[int]
    ) -> DecodePlan | OutOfMemory:
        ws, seqs = self._seqs_on_one_worker(seq_ids)
        token_list = self._token_array(tokens).tolist()
        if len(token_list) != len(seqs) or len(set(seq_ids)) != len(seqs):
            raise InvalidArgument("need one token per sequence and no repeated sequence")
        self._expire_pins()
        bs = self.block_size
        gpu = ws.gpu
        num_new = 0
        simple = True  # nothing on CPU and no shared or cached last block to copy or drop
        for seq in seqs:
            if len(seq.tokens) % bs == 0:
                num_new += 1
            elif seq.num_cpu_blocks or seq.blocks[-1].ref_cnt > 1 or seq.blocks[-1].block_hash is not None:
                simple = False
        commands: list[Command] = []
        if not simple or num_new > gpu.num_queued:
            writes: list[Write] = [(s, len(s.tokens) // bs, len(s.blocks)) for s in seqs]
            victims = self._plan_room(ws, seqs, writes, num_new)
            if victims is None:
                return OutOfMemory(f"no room for a decode step of {len(seqs)}", ws.worker_id)
            commands = self._commit_room(ws, seqs, writes, victims)
        touch = ws.eviction.touch
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        slots: list[int] = []
        for seq, token in zip(seqs, token_list, strict=True):
            offset = len(seq.tokens) % bs
            if offset == 0:
                meta = gpu.allocate()
                assert meta is not None, "planned room is missing"
                seq.blocks.append(meta)
                seq.block_ids.append(meta.block_id)
            seq.tokens.append(token)
            slots.append(seq.block_ids[-1] * bs + offset)
            tables.append(seq.block_ids.copy())
            seq_lens.append(len(seq.tokens))
            touch(seq.seq_id)
        self._upserts.update(seq_ids)
        return DecodePlan(ws.worker_id, tables, seq_lens, slots, commands)

    def prepare_write(self, seq_id: int, start: int, end: int) -> WritePlan | OutOfMemory:
        seq = self._seq(seq_id)
        check_count("end", end, 0, len(seq.tokens))
        check_count("start", start, 0, end)
        ws = self._workers[seq.worker_id]
        self._expire_pins()
        bs = self.block_size
        writes: list[Write] = [(seq, start // bs, -(-end // bs))] if end > start else []
        commands = self._make_writable(ws, [seq], writes, 0)
        if commands is None:
            return OutOfMemory(f"no room to make sequence {seq_id} writable", ws.worker_id)
        if end > start and start < seq.num_computed:
            seq.num_computed = start  # rewritten positions are computed again
            self._upserts.add(seq_id)
        ids = seq.block_ids
        slots = [ids[p // bs] * bs + p % bs for p in range(start, end)]
        ws.eviction.touch(seq_id)
        # Blocks moved, copied or uncached are recorded by _commit_room; a write into
        # private blocks (every layer of a decode step) leaves the record as it was.
        return WritePlan(ws.worker_id, slots, commands)

    def prepare_attention(self, seq_ids: Sequence[int]) -> AttentionPlan | OutOfMemory:
        ws, seqs = self._seqs_on_one_worker(seq_ids)
        self._expire_pins()
        commands: list[Command] = []
        if any(s.num_cpu_blocks for s in seqs):
            victims = self._plan_room(ws, seqs, [], 0)
            if victims is None:
                return OutOfMemory(f"no room to swap in {len(seqs)} sequences", ws.worker_id)
            commands = self._commit_room(ws, seqs, [], victims)
            self._upserts.update(s.seq_id for s in seqs)
        for seq in seqs:
            ws.eviction.touch(seq.seq_id)
        tables = [s.block_ids.copy() for s in seqs]
        return AttentionPlan(ws.worker_id, tables, [len(s.tokens) for s in seqs], commands)

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        seq = self._seq(seq_id)
        check_count("num_tokens", num_tokens, 0, len(seq.tokens))
        if num_tokens > seq.num_computed:
            # The ledger carries the computed count (a rebuilt coordinator reports it): a
            # compact progress update, the record itself is unchanged.
            seq.num_computed = num_tokens
            self._progress.add(seq_id)
        bs = self.block_size
        first, full = len(seq.hashes), seq.num_computed // bs
        if full <= first:
            return
        ws = self._workers[seq.worker_id]
        data = encode_tokens(seq.tokens[first * bs : full * bs])
        stride = len(data) // (full - first)
        hashes = seq.hashes
        for i in range(first, full):
            block_bytes = data[(i - first) * stride : (i - first + 1) * stride]
            parent_hash = hashes[i - 1] if i else self._salt(seq.tenant)
            hashes.append(chain_hash(parent_hash, block_bytes))
            meta = seq.blocks[i]
            parent = seq.blocks[i - 1] if i else None
            if parent is not None and parent.block_hash != parent_hash:
                continue  # the parent is not the cached copy of this prefix
            if meta.block_hash is None and register(
                ws.pool(meta.tier), meta, hashes[i], parent, block_bytes, seq.tenant
            ):
                seq.block_changed(i)
                if meta.ref_cnt > 1:
                    self._ledger_epoch += 1  # other holders' records changed too
        self._upserts.add(seq_id)
