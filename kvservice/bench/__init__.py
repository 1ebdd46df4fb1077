"""``kvservice bench``: stress runs and benchmarks against a gRPC server.

    kvservice bench fuzz --calls 10000 [--seed S] [--address HOST:PORT] [--json]
    kvservice bench load --clients 32 --seconds 60 [--address HOST:PORT] [--json]
    kvservice bench service --clients 1,8,32 --seconds 5 [--address HOST:PORT] [--json]

Every command starts its own server on 127.0.0.1 (a coordinator over CPU workers in
this process, see ``kvservice.bench.target``) unless ``--address`` names a running one.
Each prints a short table, or one JSON object with ``--json``, and exits non-zero when
its check fails.

The options live here and each command's module is imported only when it runs (they
pull in torch, grpc and hypothesis), so building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any


def _fuzz_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=10_000, help="requests to send")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument(
        "--calls-per-case", type=int, default=25,
        help="requests per generated case (each case starts from a fresh service when the "
        "server is our own)",
    )  # fmt: skip


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to drive the load")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument(
        "--num-gpu-blocks", type=int, default=1024,
        help="device-tier blocks of our own server's worker (small: RESOURCE_EXHAUSTED happens)",
    )  # fmt: skip


def _service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients", default="1,8,32", help="comma-separated concurrent client counts"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per phase")
    parser.add_argument(
        "--grpc-only", action="store_true", help="keep every call on gRPC (no local endpoint)"
    )
    parser.add_argument(
        "--compare-grpc", action="store_true",
        help="also run the first client count over gRPC only (reported as grpc_only)",
    )  # fmt: skip


# name -> (module with main(args) -> int, help, options)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "fuzz": (
        "kvservice.bench.fuzz",
        "random and malformed gRPC requests: proper statuses only, invariants hold",
        _fuzz_arguments,
    ),
    "load": (
        "kvservice.bench.load",
        "concurrent clients, mixed workload: ops/s, p50/p99, errors, memory back to start",
        _load_arguments,
    ),
    "service": (
        "kvservice.bench.service",
        "CreateSequence, AppendTokens(256), Attend(64): ops/s and p50/p99 at 1, 8, 32 clients",
        _service_arguments,
    ),
}


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``bench`` and its subcommands to the CLI's subparsers."""
    bench = commands.add_parser("bench", help="stress runs and benchmarks against a server")
    subcommands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, (module_name, help_text, add_options) in COMMANDS.items():
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--address", default=None,
            help="a running server (HOST:PORT); default: start one on 127.0.0.1",
        )  # fmt: skip
        sub.add_argument("--token", default=None, help="bearer token for --address")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        add_options(sub)
        sub.set_defaults(run=_runner(module_name))
    return bench


def _runner(module_name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module_name).main(args))

    return run
