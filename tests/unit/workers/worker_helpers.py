"""Shared pieces of the worker tests: a small layout, sequences laid out in a worker's
pool, and an attention oracle computed from each sequence's contiguous K/V (not from
the pool), so it checks the write path, the plan and the kernel together."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kvservice.workers import AttendPlan, Worker

from kvservice.core.layout import Layout

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)
NUM_Q_HEADS = 4


def make_worker(worker_id: int = 0, **kwargs: object) -> Worker:
    sizes = {"num_gpu_blocks": 32, "num_cpu_blocks": 8}
    sizes.update(kwargs)
    return Worker(worker_id, LAYOUT, **sizes)  # type: ignore[arg-type]


def kv(num_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def queries(num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((num_tokens, NUM_Q_HEADS, LAYOUT.head_dim), generator=generator)


@dataclass
class Seq:
    """A sequence's block table and its full K/V, as the test knows them."""

    table: list[int]
    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[0]

    def slots(self, start: int, end: int) -> list[int]:
        bs = LAYOUT.block_size
        return [self.table[p // bs] * bs + p % bs for p in range(start, end)]


def make_seqs(lengths: list[int], generator: torch.Generator, first_block: int = 0) -> list[Seq]:
    """Sequences on disjoint, shuffled blocks of a 32-block pool."""
    blocks = (torch.randperm(32 - first_block, generator=generator) + first_block).tolist()
    seqs = []
    for length in lengths:
        count = LAYOUT.num_blocks_for(length)
        table, blocks = blocks[:count], blocks[count:]
        seqs.append(Seq(table, *kv(length, generator)))
    return seqs


def write_prefix(worker: Worker, layer: int, seqs: list[Seq], lengths: list[int]) -> None:
    """Write the first ``lengths[i]`` tokens of each sequence, one write_kv call."""
    slots = [s for seq, n in zip(seqs, lengths, strict=True) for s in seq.slots(0, n)]
    k = torch.cat([seq.k[:n] for seq, n in zip(seqs, lengths, strict=True)])
    v = torch.cat([seq.v[:n] for seq, n in zip(seqs, lengths, strict=True)])
    worker.write_kv(layer, torch.tensor(slots, dtype=torch.int64), k, v)


def plan_for(seqs: list[Seq], q_lens: list[int], *, with_slots: bool = False) -> AttendPlan:
    return AttendPlan(
        block_tables=[seq.table for seq in seqs],
        seq_lens=[seq.length for seq in seqs],
        q_lens=q_lens,
        new_slots=(
            [
                s
                for seq, n in zip(seqs, q_lens, strict=True)
                for s in seq.slots(seq.length - n, seq.length)
            ]
            if with_slots
            else None
        ),
    )


def new_kv(seqs: list[Seq], q_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = list(zip(seqs, q_lens, strict=True))
    return (
        torch.cat([seq.k[seq.length - n :] for seq, n in pairs]),
        torch.cat([seq.v[seq.length - n :] for seq, n in pairs]),
    )


def dense_attention(
    q: torch.Tensor, seqs: list[Seq], q_lens: list[int], *, sliding_window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention of each sequence's last q_len tokens over its own K/V."""
    group = NUM_Q_HEADS // LAYOUT.num_kv_heads
    scale = 1.0 / math.sqrt(LAYOUT.head_dim)
    outs, lses = [], []
    row = 0
    for seq, n in zip(seqs, q_lens, strict=True):
        k = seq.k.repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = seq.v.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,lhd->htl", q[row : row + n].double(), k.double()) * scale
        pos = torch.arange(seq.length - n, seq.length)[:, None]
        keys = torch.arange(seq.length)[None, :]
        visible = keys <= pos
        if sliding_window is not None:
            visible &= keys > pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1).T)
        outs.append(torch.einsum("htl,lhd->thd", torch.softmax(scores, dim=-1), v.double()))
        row += n
    return torch.cat(outs).float(), torch.cat(lses).float()
