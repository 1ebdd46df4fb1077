"""Prefix cache: chained block hashes and the per-worker index of full, computed blocks.

h_i = xxh3_64(tokens of block i as uint64 bytes, seed = h_{i-1}), h_{-1} = xxh3_64(tenant,
layout key): a block's hash names its whole prefix, its tenant and the layout. A hash is
only a lookup key. On a hit the block's tokens and tenant are compared, and its parent
must be the very registration hit one block earlier (``parent_cache_id``), so a
collision anywhere in the chain is a miss, never wrong data. Only full blocks are ever
registered, and each hash names at most one block per worker (``index``).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence

import xxhash

from kvservice.core.block_pool import BlockMeta, BlockPool
from kvservice.core.ids import BlockHash, TenantId

_INT64_BYTES = 8
_cache_ids = itertools.count(1)  # 0 means "no parent": the root of a chain


def tenant_salt(tenant: TenantId, layout_key: str) -> BlockHash:
    return BlockHash(xxhash.xxh3_64_intdigest(f"{tenant}\x00{layout_key}".encode()))


def encode_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as uint64 bytes (TypeError/OverflowError on anything else)."""
    return array("Q", tokens).tobytes()


def chain_hash(parent: BlockHash, block_bytes: bytes) -> BlockHash:
    return BlockHash(xxhash.xxh3_64_intdigest(block_bytes, parent))


class HashChain:
    """One prompt's bytes and chain hashes; ``match_prefix`` extends ``hashes`` as far as
    it walks, so several workers' lookups hash each block once."""

    def __init__(self, token_bytes: bytes, salt: BlockHash, block_size: int) -> None:
        self.data = token_bytes
        self.stride = block_size * _INT64_BYTES
        self.num_full_blocks = len(token_bytes) // self.stride
        self.hashes: list[BlockHash] = []
        self.salt = salt

    def block_bytes(self, i: int) -> bytes:
        return self.data[i * self.stride : (i + 1) * self.stride]

    def hash(self, i: int) -> BlockHash:
        """The chain hash of block i (and of every block before it, once)."""
        hashes = self.hashes
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else self.salt
            hashes.append(chain_hash(parent, self.block_bytes(j)))
        return hashes[i]


def match_prefix(
    index: dict[BlockHash, BlockMeta], chain: HashChain, tenant: TenantId, max_blocks: int
) -> list[BlockMeta]:
    """The longest run of indexed blocks holding exactly this prompt's first blocks."""
    # The hot loop of a long-prompt lookup: locals only, one slice and one hash per block.
    hits: list[BlockMeta] = []
    parent_cache_id = 0
    data, stride, hashes, get, hash_block = chain.data, chain.stride, chain.hashes, index.get, chain_hash
    block_hash = chain.salt
    for i in range(min(max_blocks, chain.num_full_blocks)):
        block_bytes = data[i * stride : (i + 1) * stride]
        if i < len(hashes):
            block_hash = hashes[i]
        else:
            block_hash = hash_block(block_hash, block_bytes)
            hashes.append(block_hash)
        meta = get(block_hash)
        if (
            meta is None
            or meta.parent_cache_id != parent_cache_id
            or meta.token_bytes != block_bytes
            or meta.tenant != tenant
        ):
            break
        hits.append(meta)
        parent_cache_id = meta.cache_id
    return hits


def register(
    pool: BlockPool,
    meta: BlockMeta,
    block_hash: BlockHash,
    parent: BlockMeta | None,
    block_bytes: bytes,
    tenant: TenantId,
) -> bool:
    """Enter a full, computed block into the index; False if it cannot be (see below)."""
    if meta.block_hash is not None:
        # Already an entry: the same content if the hash and parent agree.
        return meta.block_hash == block_hash and (
            parent is None or meta.parent_cache_id == parent.cache_id
        )
    if block_hash in pool.index:
        return False  # another block holds this content; keep the one entry
    if parent is not None and parent.block_hash is None:
        return False  # an orphan could never be reached by a lookup
    meta.block_hash = block_hash
    meta.cache_id = next(_cache_ids)
    meta.parent_cache_id = parent.cache_id if parent is not None else 0
    meta.token_bytes = block_bytes
    meta.tenant = tenant
    pool.index[block_hash] = meta
    return True


def move_entry(src: BlockMeta, dst: BlockMeta, index: dict[BlockHash, BlockMeta]) -> None:
    """The block's data moved to another tier: its cache entry (and cache_id) follows."""
    if src.block_hash is None:
        return
    dst.block_hash = src.block_hash
    dst.cache_id = src.cache_id
    dst.parent_cache_id = src.parent_cache_id
    dst.token_bytes = src.token_bytes
    dst.tenant = src.tenant
    index[src.block_hash] = dst
    src.clear_cache_entry()
