"""A short ``kvservice bench load``: concurrent clients over gRPC on 127.0.0.1.

The device tier is small on purpose, so the run swaps and sometimes refuses with
RESOURCE_EXHAUSTED: that is the only error allowed, every operation of the mix must
have succeeded many times, the blocks in use must come back to their starting level
once the clients free what they hold, and the coordinator's invariants must hold.
No timing is asserted.
"""

from __future__ import annotations

import pytest

from kvservice import cli
from kvservice.bench.load import run_load

pytestmark = pytest.mark.integration


def test_ten_seconds_of_concurrent_clients_leave_nothing_behind() -> None:
    report = run_load(clients=8, seconds=10, num_gpu_blocks=128, seed=1)
    assert report["errors"]["unexpected"] == {}, report
    assert set(report["errors"]["expected"]) <= {"RESOURCE_EXHAUSTED"}
    for op in ("create", "prefill", "append", "attend", "fork", "free"):
        assert report["per_op"][op]["ok"] >= 5, (op, report["per_op"])
    memory = report["memory"]
    assert memory["returned"] and memory["used_blocks_end"] == memory["used_blocks_start"] == 0
    assert report["invariants_checked"] and report["ok"]


def test_the_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "load", "--clients", "2", "--seconds", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"ops_per_s"' in out and '"returned": true' in out
