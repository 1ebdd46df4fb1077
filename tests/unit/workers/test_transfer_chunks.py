"""How a block transfer is cut into chunks: both sides cut alike from the block count, every
block goes in exactly one chunk, in order, and no chunk exceeds the largest size; and when
the chunks' index tables are made."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from kvservice.workers.transfer_chunks import ChunkIndexes, HostTimes, chunk_lengths


def test_even_chunks() -> None:
    assert chunk_lengths(0, 32) == []
    assert chunk_lengths(64, 32) == [32, 32]
    assert chunk_lengths(70, 32) == [32, 32, 6]
    assert chunk_lengths(5, 32, None) == [5]


def test_ramped_chunks_double_from_both_ends() -> None:
    # 1 GiB of 2 MiB blocks, 256 MiB chunks ramping from 16 MiB.
    assert chunk_lengths(512, 128, 8) == [8, 16, 32, 64, 128, 128, 16, 64, 32, 16, 8]
    assert chunk_lengths(20, 128, 8) == [8, 4, 8]
    assert chunk_lengths(100, 32, 32) == chunk_lengths(100, 32)  # first = largest: even


@given(
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=1, max_value=300),
    st.one_of(st.none(), st.integers(min_value=1, max_value=300)),
)
def test_every_block_once_within_bounds(num_blocks: int, per_chunk: int, first: int | None) -> None:
    lengths = chunk_lengths(num_blocks, per_chunk, first)
    assert sum(lengths) == num_blocks
    assert all(0 < n <= per_chunk for n in lengths)
    even = -(-num_blocks // per_chunk)
    if first is None or first >= per_chunk:
        assert len(lengths) == even
    else:  # the ramp costs at most two chunks per doubling
        doublings = max(0, (per_chunk - 1).bit_length() - (first - 1).bit_length() + 1)
        assert len(lengths) <= even + 2 * doublings


def test_chunk_tables_are_made_first_alone_then_the_rest_together() -> None:
    # The first chunk's tables come at once (it starts without the others'); the next ask
    # makes every other chunk's in one call (one upload), and nothing is made twice.
    runs = [np.full((n, 2), i) for i, n in enumerate([2, 3, 1])]
    calls: list[list[int]] = []

    def make(asked: list[np.ndarray]) -> list[list]:
        calls.append([int(run[0, 0]) for run in asked])
        return [[("tables of", int(run[0, 0]))] for run in asked]

    host = HostTimes()
    indexes = ChunkIndexes(make, runs, host)
    assert indexes[0] == [("tables of", 0)] and calls == [[0]]
    assert indexes[1] == [("tables of", 1)] and calls == [[0], [1, 2]]
    assert indexes[2] == [("tables of", 2)] and indexes[0] and len(calls) == 2
    assert host.spent()["index"] > 0 and host.spent()["post"] == 0


def test_pair_rows_take_pairs_arrays_and_bytes() -> None:
    import pytest
    from kvservice.workers.transfer_chunks import pair_rows

    from kvservice.core.errors import InvalidArgument

    table = np.array([[0, 5], [1, 2], [0, 7]], dtype=np.int64)
    for form in (table, table.tolist(), [tuple(r) for r in table.tolist()], table.tobytes()):
        got = pair_rows(form)
        assert got.dtype == np.int64 and got.tolist() == table.tolist()
    assert pair_rows([]).shape == (0, 2) and pair_rows(b"").shape == (0, 2)
    for bad in (table.tobytes()[:-8], [(0, 1, 2)], [(0, 1.5)], [[0], [1]], "ab", [("a", "b")]):
        with pytest.raises(InvalidArgument):
            pair_rows(bad)
