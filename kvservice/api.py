"""The service API as one protocol, shared by the coordinator, every transport and the clients.

``Service`` is what the Coordinator implements and what each transport (embedded, Ray,
gRPC) offers; ``kvservice.Client`` and ``kvservice.AsyncClient`` are thin facades over it
that fill in the tenant. Every method takes ``tenant`` as a keyword: a tenant can only
name its own sequences (others' ids are NOT_FOUND). Errors are the ``kvservice.errors``
classes, whatever the transport.

Tensors: ``k``/``v`` are ``[T, num_kv_heads, head_dim]``, ``q`` is ``[T, num_q_heads,
head_dim]`` with ``num_q_heads`` a multiple of ``num_kv_heads``; the rows are the
sequences' last ``q_len`` tokens, concatenated in ``seq_ids`` order (T = sum(q_lens)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvservice.core.ids import DEFAULT_TENANT
from kvservice.core.layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TENANT", "SequenceInfo", "Service", "AsyncService"]


@dataclass(frozen=True, slots=True)
class SequenceInfo:
    """What a client may know about one sequence.

    num_cached_tokens: leading tokens whose K/V is in the cache for every layer. Right
    after create_sequence that is the prefix hit (a multiple of block_size, always less
    than the prompt length); later it grows as the caller writes K/V.
    tiers: the tier (0 = GPU, 1 = CPU) of each logical block, in order.
    """

    seq_id: int
    length: int
    num_cached_tokens: int
    worker_id: int
    num_blocks: int
    tiers: tuple[int, ...]


class Service(Protocol):
    """The synchronous service API (Coordinator, embedded and Ray transports, gRPC client)."""

    def layout(self) -> Layout: ...

    def create_sequence(self, tokens: Sequence[int], *, tenant: str = ...) -> SequenceInfo: ...

    def append_tokens(
        self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]], *, tenant: str = ...
    ) -> None: ...

    def fork(self, seq_id: int, n: int, *, tenant: str = ...) -> list[int]: ...

    def truncate(self, seq_id: int, length: int, *, tenant: str = ...) -> None: ...

    def free(self, seq_ids: Sequence[int], *, tenant: str = ...) -> None: ...

    def write_kv(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tenant: str = ...,
    ) -> None: ...

    def attend(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
        tenant: str = ...,
    ) -> Any: ...

    def lookup_prefix(self, tokens: Sequence[int], *, tenant: str = ...) -> dict[int, int]: ...

    def offload(self, seq_ids: Sequence[int], *, tenant: str = ...) -> None: ...

    def prefetch(self, seq_ids: Sequence[int], *, tenant: str = ...) -> None: ...

    def get_sequence(self, seq_id: int, *, tenant: str = ...) -> SequenceInfo: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class AsyncService(Protocol):
    """The same API with coroutine methods (the grpc.aio client transport)."""

    async def layout(self) -> Layout: ...

    async def create_sequence(self, tokens: Sequence[int], *, tenant: str = ...) -> SequenceInfo: ...

    async def close(self) -> None: ...
