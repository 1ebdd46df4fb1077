"""The ``kvservice`` command line and the named layouts, without Ray or sockets."""

from __future__ import annotations

import sys
import types

import pytest

from kvservice import Layout, cli
from kvservice.layouts import get_layout, layout_names, parse_layout


def test_serve_defaults_match_the_documented_ones() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert (args.ray_address, args.port, args.metrics_port) == ("auto", 50051, 9108)
    assert (args.layout, args.block_size, args.num_workers) == ("llama3-8b", 16, None)
    assert cli.service_options(args) == {"high_watermark": 0.95, "low_watermark": 0.85}


def test_serve_options_reach_the_service() -> None:
    args = cli.build_parser().parse_args(
        ["serve", "--ray-address", "local", "--layout", "tiny", "--block-size", "8",
         "--gpu-mem-fraction", "0.5", "--cpu-pool-gib", "2", "--num-workers", "3",
         "--vocab-size", "1000", "--decode-graphs", "64"]
    )  # fmt: skip
    assert args.ray_address == "local" and args.num_workers == 3
    assert parse_layout(args.layout, block_size=args.block_size) == Layout(2, 2, 16, "float32", 8)
    assert cli.service_options(args) == {
        "gpu_mem_fraction": 0.5,
        "cpu_pool_gib": 2.0,
        "vocab_size": 1000,
        "decode_graphs": 64,
        "high_watermark": 0.95,
        "low_watermark": 0.85,
    }


def test_demo_is_loaded_lazily_and_gets_its_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("kvservice.demo")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvservice.demo", fake)
    assert cli.main(["demo", "--device", "cpu", "--num-chats", "2"]) == 0
    assert seen == [["--device", "cpu", "--num-chats", "2"]]


def test_unknown_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--no-such-flag"])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_status_table(capsys: pytest.CaptureFixture[str]) -> None:
    stats = {
        "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32",
                   "block_size": 4},
        "workers": {
            "0": {"device": "cpu", "tiers": {"gpu": {"total": 8, "used": 2, "cached": 1, "free": 5},
                                             "cpu": {"total": 0, "used": 0, "cached": 0, "free": 0}}},
        },
        "sequences_live": 3,
        "prefix_cache": {"hit_rate": 0.25, "hit_tokens": 4, "query_tokens": 16},
        "swaps": {"out": {"blocks": 7}, "in": {"blocks": 5}},
        "migration": {"transfers_peer": 4, "transfers_host": 1, "blocks_transferred": 40,
                      "transfer_group": {"peer_pairs": [[0, 1]]}},
    }  # fmt: skip
    cli.print_status(stats)
    out = capsys.readouterr().out
    assert "25.0%" in out and "sequences 3" in out and "swapped out 7" in out
    assert "gpu" in out and "cpu" in out
    text = " ".join(out.split())  # the console wraps long lines
    assert "4 peer, 0 group, 1 host (40 blocks) | peer copy between [[0, 1]]" in text


def test_named_and_spelled_out_layouts() -> None:
    assert "tiny" in layout_names() and "llama3-8b" in layout_names()
    assert get_layout("llama3-8b") == Layout(32, 8, 128, "bfloat16", 16)
    assert parse_layout("32,8,128,bfloat16", block_size=32) == Layout(32, 8, 128, "bfloat16", 32)
    assert parse_layout("4,2,64") == Layout(4, 2, 64, "bfloat16", 16)
    layout = Layout(1, 1, 8, "float16", 4)
    assert parse_layout(layout) is layout
    for bad in ("nope", "1,2", "a,b,c", "4,2,64,int8", "0,2,64"):
        with pytest.raises(ValueError):
            parse_layout(bad)
