"""A short ``kvservice bench service``: its own server on 127.0.0.1, one and two clients.

No timing is asserted: every phase must have made calls and every number be positive.
"""

from __future__ import annotations

import json

import pytest

from kvservice import cli

pytestmark = pytest.mark.integration


def test_the_command_reports_every_phase_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "service", "--seconds", "1", "--clients", "1,2", "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clients"] == [1, 2]
    assert set(report["results"]) == {"1", "2"}
    for rows in report["results"].values():
        assert set(rows) == {"create", "append", "attend"}
        for op, row in rows.items():
            for key in ("calls", "ops_per_s", "p50_ms", "p99_ms"):
                assert row[key] > 0, (op, key, row)
            assert row["p99_ms"] >= row["p50_ms"], (op, row)
    added = report["attend_added"]
    assert added["clients"] == 1
    assert added["attend_p50_ms"] > 0 and added["worker_attend_mean_ms"] > 0
    assert added["worker_attend_median_ms"] > 0
    assert added["attend_added_ms"] == pytest.approx(
        added["attend_p50_ms"] - added["worker_attend_median_ms"], abs=1e-2
    )
    assert set(report["targets"]) == {"append_p50_ms", "attend_added_ms"}
    assert report["floor"]["empty_append_p50_ms"] > 0
    assert len(report["load_avg"]["before"]) == len(report["load_avg"]["after"]) == 3
