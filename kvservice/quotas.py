"""Block quotas per tenant: a tenant may hold at most its quota of blocks.

``QuotaManager`` wraps a ``KVCacheManager`` and answers every call the same way, except
that a call which would take a tenant past its quota returns ``OutOfMemory`` (so the
coordinator answers RESOURCE_EXHAUSTED, and, like any out-of-memory outcome, nothing
changed). Other tenants are unaffected: their calls are checked against their own
quotas only.

What counts: the distinct physical blocks (either tier, any worker) that the tenant's
sequences (every segment of a long one) and pins hold. A block is only ever shared within one tenant (prefix hashes
are salted per tenant, forks stay in their tenant), so every used block counts for
exactly one tenant. Cached blocks (held by nobody, evictable) count for no one; a cache
hit that revives one counts again. So:
- create needs the prompt's blocks minus those it shares with the tenant's live
  sequences (a prefix hit on blocks already held). With several workers the worker
  with the fewest shared blocks is assumed, since placement is decided later: near its
  quota a tenant may be refused a create that would just have fitted;
- append needs its new blocks, plus a copy of a shared last block it writes into;
- prepare_write / prepare_decode need the copies (copy on write) of the shared blocks
  they write into, and decode steps their new blocks;
- fork, truncate, free, swaps and attention need nothing (a fork shares every block).

The check reads the manager's tables (sequences, pins, the prefix index): quotas are a
service policy layered on the core, not part of its bookkeeping. It costs a pass over
the sequences per allocating call while quotas are on, and nothing when they are off.
Quotas are not limits on the pools: a tenant under its quota can still be refused when
the pools are full.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvservice.core.commands import OutOfMemory
from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import DEFAULT_TENANT
from kvservice.core.manager import KVCacheManager
from kvservice.core.prefix_cache import HashChain, match_prefix
from kvservice.spanning import SEGMENT_MARK, is_segment_tenant


def owner(tenant: str | None) -> str:
    """The tenant a core sequence counts for: a long sequence's later segments are core
    sequences of a private tenant (``kvservice.spanning``) and count for its own."""
    tenant = tenant or DEFAULT_TENANT
    return tenant[: -len(SEGMENT_MARK)] if is_segment_tenant(tenant) else tenant


def check_quotas(quotas: Mapping[str, int], default: int | None) -> dict[str, int]:
    """Quotas as a plain dict, each a block count >= 0 (InvalidArgument otherwise)."""
    out: dict[str, int] = {}
    for tenant, blocks in {**quotas, **({"*": default} if default is not None else {})}.items():
        if not isinstance(tenant, str) or not tenant:
            raise InvalidArgument(f"a quota needs a tenant name, got {tenant!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise InvalidArgument(f"quota of {tenant!r} must be a block count >= 0, got {blocks!r}")
        out[tenant] = blocks
    out.pop("*", None)
    return out


def parse_quotas(specs: Iterable[str]) -> dict[str, int]:
    """``["alice=1000", "bob=50"]`` -> {"alice": 1000, "bob": 50} (the CLI's form)."""
    quotas: dict[str, int] = {}
    for spec in specs:
        tenant, sep, blocks = spec.partition("=")
        if not sep or not tenant.strip() or not blocks.strip().isdigit():
            raise InvalidArgument(f"a quota is TENANT=BLOCKS, got {spec!r}")
        quotas[tenant.strip()] = int(blocks)
    return quotas


class QuotaManager:
    """A ``KVCacheManager`` whose allocating calls respect per-tenant block quotas.

    ``quotas``: tenant -> most blocks it may hold; ``default``: the quota of tenants not
    listed (None: unlimited). Everything else is the wrapped manager's, unchanged.
    """

    def __init__(
        self,
        manager: KVCacheManager,
        quotas: Mapping[str, int],
        *,
        default: int | None = None,
    ) -> None:
        self._manager = manager
        self.quotas = check_quotas(quotas, default)
        self.default = default

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    @property
    def inner(self) -> KVCacheManager:
        return self._manager

    def quota_of(self, tenant: str | None) -> int | None:
        return self.quotas.get(owner(tenant), self.default)

    def blocks_of(self, tenant: str | None) -> int:
        """Distinct blocks the tenant's sequences (and their segments) and pins hold now."""
        tenant = owner(tenant)
        m = self._manager
        held: set[int] = set()
        for seq in m._seqs.values():
            if owner(seq.tenant) == tenant:
                held.update(map(id, seq.blocks))
        for pin in m._pins.pins.values():
            if owner(pin.tenant) == tenant:
                held.update(map(id, pin.blocks))
        return len(held)

    def usage_by_tenant(self) -> dict[str, int]:
        """Blocks held per tenant (tenants holding none are left out)."""
        m = self._manager
        held: dict[str, set[int]] = {}
        for tenant, blocks in [
            *((s.tenant, s.blocks) for s in m._seqs.values()),
            *((p.tenant, p.blocks) for p in m._pins.pins.values()),
        ]:
            held.setdefault(owner(tenant), set()).update(map(id, blocks))
        return {tenant: len(ids) for tenant, ids in sorted(held.items()) if ids}

    def _refusal(self, tenant: str | None, need: int) -> OutOfMemory | None:
        quota = self.quota_of(tenant)
        if quota is None or need <= 0:
            return None
        held = self.blocks_of(tenant)
        if held + need <= quota:
            return None
        return OutOfMemory(
            f"tenant {owner(tenant)!r} holds {held} blocks and needs {need} more, "
            f"over its quota of {quota}"
        )

    # ------------------------------------------------------------------ allocating calls

    def create(
        self, tenant: str | None, tokens: Sequence[int], *, worker_id: int | None = None
    ) -> Any:
        if self.quota_of(tenant) is not None:
            refusal = self._refusal(tenant, self._create_need(tenant, tokens, worker_id))
            if refusal is not None:
                return refusal
        return self._manager.create(tenant, tokens, worker_id=worker_id)

    def append(self, seq_id: int, tokens: Sequence[int]) -> Any:
        seq = self._manager._seqs.get(seq_id)
        if seq is not None and self.quota_of(seq.tenant) is not None:
            num_new = len(self._manager._tokens(tokens)[0])
            refusal = self._refusal(seq.tenant, self._growth(seq, num_new))
            if refusal is not None:
                return refusal
        return self._manager.append(seq_id, tokens)

    def prepare_write(self, seq_id: int, start: int, end: int) -> Any:
        seq = self._manager._seqs.get(seq_id)
        if (
            seq is not None
            and self.quota_of(seq.tenant) is not None
            and isinstance(start, int)
            and isinstance(end, int)
            and 0 <= start < end <= len(seq.tokens)
        ):
            bs = self._manager.block_size
            copies = sum(1 for meta in seq.blocks[start // bs : -(-end // bs)] if meta.ref_cnt > 1)
            refusal = self._refusal(seq.tenant, copies)
            if refusal is not None:
                return refusal
        return self._manager.prepare_write(seq_id, start, end)

    def prepare_decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> Any:
        need: dict[str, int] = {}
        for seq_id in seq_ids:
            seq = self._manager._seqs.get(seq_id)
            if seq is not None and self.quota_of(seq.tenant) is not None:
                need[seq.tenant] = need.get(seq.tenant, 0) + self._growth(seq, 1)
        for tenant, blocks in need.items():
            refusal = self._refusal(tenant, blocks)
            if refusal is not None:
                return refusal
        return self._manager.prepare_decode(seq_ids, tokens)

    # ------------------------------------------------------------------ needs

    def _growth(self, seq: Any, num_new_tokens: int) -> int:
        """New blocks for ``num_new_tokens`` more tokens, plus a copy of a shared last block."""
        bs = self._manager.block_size
        length = len(seq.tokens)
        if num_new_tokens <= 0:
            return 0
        need = self._manager.layout.num_blocks_for(length + num_new_tokens) - len(seq.blocks)
        if length % bs and seq.blocks and seq.blocks[-1].ref_cnt > 1:
            need += 1
        return need

    def _create_need(self, tenant: str | None, tokens: Sequence[int], worker_id: int | None) -> int:
        m = self._manager
        token_list, data = m._tokens(tokens)  # InvalidArgument for bad tokens, as create
        if not token_list:
            return 0  # create refuses it
        tenant_id = m._tenant(tenant)
        workers = [m._worker(worker_id)] if worker_id is not None else list(m._workers.values())
        chain = HashChain(data, m._salt(tenant_id), m.block_size)
        max_shared = (len(token_list) - 1) // m.block_size
        num_blocks = m.layout.num_blocks_for(len(token_list))
        shared = [
            sum(1 for meta in match_prefix(ws.index, chain, tenant_id, max_shared) if meta.ref_cnt > 0)
            for ws in workers
        ]
        return num_blocks - min(shared, default=0)
