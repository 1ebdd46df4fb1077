"""Coordinators over local CPU workers, and a shadow of every K/V written (the test oracle).

``Shadow`` keeps, per sequence and layer, the K/V each position was given and computes
the attention a call must return with plain dense torch: nothing of the service's paging
is involved, so a wrong block table, slot, swap or copy shows up as a mismatch.
"""

from __future__ import annotations

from typing import Any

import torch
from kvservice.workers import Worker

from kvservice.coordinator import Coordinator
from kvservice.coordinator_workers import LocalWorkerHandle, WorkerLost
from kvservice.core.layout import Layout

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)
NUM_Q_HEADS = 4
ATOL = 1e-5


class KillableHandle(LocalWorkerHandle):
    """A local worker that can be made to vanish, as a dead actor does."""

    killed = False

    def execute(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.killed:
            raise WorkerLost(self.worker_id, RuntimeError("killed by the test"))
        return super().execute(method, *args, **kwargs)


def make_handles(
    layout: Layout = LAYOUT,
    *,
    num_workers: int = 1,
    num_gpu_blocks: int = 64,
    num_cpu_blocks: int = 64,
) -> list[KillableHandle]:
    return [
        KillableHandle(
            wid,
            Worker(
                wid, layout, device="cpu", num_gpu_blocks=num_gpu_blocks,
                num_cpu_blocks=num_cpu_blocks,
            ),  # fmt: skip
        )
        for wid in range(num_workers)
    ]


def make_coordinator(layout: Layout = LAYOUT, **options: Any) -> Coordinator:
    sizes = {k: options.pop(k) for k in ("num_workers", "num_gpu_blocks", "num_cpu_blocks") if k in options}
    return Coordinator(layout, make_handles(layout, **sizes), **options)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Tq, Hq, D] for the LAST Tq positions of keys k/v [Tk, Hkv, D]; causal, float32."""
    num_q, num_heads, head_dim = q.shape
    num_k = k.shape[0]
    group = num_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * head_dim**-0.5
    positions = torch.arange(num_k - num_q, num_k).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(num_k).unsqueeze(0) > positions, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Shadow:
    """What the cache should hold: per (sequence, layer), the K/V row of every position."""

    def __init__(self, layout: Layout = LAYOUT, seed: int = 0) -> None:
        self.layout = layout
        self.kv: dict[tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def fork(self, parent: int, children: list[int]) -> None:
        for layer in range(self.layout.num_layers):
            for child in children:
                self.kv[(child, layer)] = dict(self.kv.get((parent, layer), {}))

    def truncate(self, seq_id: int, length: int) -> None:
        for layer in range(self.layout.num_layers):
            rows = self.kv.get((seq_id, layer), {})
            for pos in [p for p in rows if p >= length]:
                del rows[pos]

    def forget(self, seq_id: int) -> None:
        for layer in range(self.layout.num_layers):
            self.kv.pop((seq_id, layer), None)

    def share(self, src: int, dst: int, num_tokens: int) -> None:
        """dst got src's first num_tokens positions from the prefix cache."""
        for layer in range(self.layout.num_layers):
            rows = self.kv.get((src, layer), {})
            self.kv.setdefault((dst, layer), {}).update(
                {p: rows[p] for p in range(num_tokens)}
            )

    def attend(
        self,
        service: Any,
        layer: int,
        seq_ids: list[int],
        q_lens: list[int],
        lengths: list[int],
        *,
        write: bool = True,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Call ``service.attend`` with fresh random q (and k/v), return (out, expected)."""
        layout = self.layout
        num_rows = sum(q_lens)
        q = self.randn(num_rows, NUM_Q_HEADS, layout.head_dim)
        k = self.randn(num_rows, layout.num_kv_heads, layout.head_dim)
        v = self.randn(num_rows, layout.num_kv_heads, layout.head_dim)
        out = service.attend(
            layer, seq_ids, q_lens, q, k if write else None, v if write else None, **kwargs
        )
        expected = []
        row = 0
        for sid, q_len, length in zip(seq_ids, q_lens, lengths, strict=True):
            rows = self.kv.setdefault((sid, layer), {})
            if write:
                for i in range(q_len):
                    rows[length - q_len + i] = (k[row + i], v[row + i])
            keys = torch.stack([rows[p][0] for p in range(length)])
            values = torch.stack([rows[p][1] for p in range(length)])
            expected.append(dense_attention(q[row : row + q_len], keys, values))
            row += q_len
        return out, torch.cat(expected)

    def prefill(
        self, service: Any, seq_id: int, length: int, num_cached: int, **kwargs: Any
    ) -> None:
        """Write and attend every layer of a new sequence's uncached tokens; checks outputs."""
        for layer in range(self.layout.num_layers):
            out, expected = self.attend(
                service, layer, [seq_id], [length - num_cached], [length], **kwargs
            )
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
