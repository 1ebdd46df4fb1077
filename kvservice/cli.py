"""The ``kvservice`` command.

    kvservice serve   [--ray-address auto|local|HOST:PORT] [--host H] [--port 50051]
                      [--metrics-port 9108] [--layout NAME|L,H,D,dtype] [--block-size 16]
                      [--gpu-mem-fraction F] [--cpu-pool-gib G] [--num-workers N] ...
    kvservice status  [--address 127.0.0.1:50051] [--token T] [--json]
    kvservice demo    [demo options]
    kvservice bench   fuzz|load [--address HOST:PORT] [--json] ...   (see kvservice.bench)
    kvservice scale   [--workers N | --drain ID... | --auto] [--ray-address auto] [--namespace NS]

``serve`` joins a Ray cluster (``auto``: the running one; ``local``: start one in this
process), binds the gRPC port at once (health NOT_SERVING), starts one worker actor per
GPU (or ``--num-workers`` CPU workers on a cluster without GPUs), then serves; SIGTERM
drains in-flight calls and stops the workers. Live worker actors already registered in
the namespace (a restarted server) are adopted and the tables rebuilt from their ledgers.
Metrics are served over HTTP on ``--metrics-port`` (0 turns them off).
``scale`` asks a running server (through its Ray cluster) to add or drain workers; a
server without ``--num-workers`` on GPUs also adds one worker per GPU that joins
(see ``kvservice.scaling``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kvservice.bench import add_parser as add_bench_parser
from kvservice.layouts import DEFAULT_BLOCK_SIZE, layout_names, parse_layout
from kvservice.metrics import DEFAULT_METRICS_PORT
from kvservice.quotas import parse_quotas
from kvservice.scaling import add_parser as add_scale_parser

DEFAULT_PORT = 50051
log = logging.getLogger("kvservice")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvservice", description="A distributed, paged KV-cache memory service."
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service: gRPC over Ray workers")
    serve.add_argument(
        "--ray-address", default="auto",
        help="'auto' (join the running cluster), 'local' (start one here) or HOST:PORT",
    )  # fmt: skip
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (gRPC and metrics)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port")
    serve.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
        help="Prometheus metrics port (0: off)",
    )  # fmt: skip
    serve.add_argument(
        "--layout", default="llama3-8b",
        help=f"a name ({', '.join(layout_names())}) or L,H,D[,dtype]",
    )  # fmt: skip
    serve.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per block"
    )
    serve.add_argument(
        "--gpu-mem-fraction", type=float, default=None,
        help="share of each GPU's memory for its block pool (default 0.9)",
    )  # fmt: skip
    serve.add_argument(
        "--num-gpu-blocks", type=int, default=None, help="device-tier blocks per worker"
    )
    serve.add_argument("--cpu-pool-gib", type=float, default=None, help="host-tier GiB per worker")
    serve.add_argument(
        "--num-cpu-blocks", type=int, default=None, help="host-tier blocks per worker"
    )
    serve.add_argument(
        "--num-workers", type=int, default=None,
        help="worker actors (default: one per GPU in the cluster, or 1)",
    )  # fmt: skip
    serve.add_argument(
        "--namespace", default=None,
        help="Ray namespace of the worker actors (with --coordinator-actor: of that actor)",
    )  # fmt: skip
    serve.add_argument(
        "--decode-graphs", type=int, default=None, metavar="N",
        help="CUDA graphs each GPU worker keeps for step tickets' decode calls (default 0)",
    )  # fmt: skip
    serve.add_argument(
        "--coordinator-actor", default=None, metavar="NAME",
        help="run the coordinator as Ray actor NAME, shared with Ray clients "
        "(Client.ray(name=NAME, namespace=...)); each gRPC call then takes one more hop",
    )  # fmt: skip
    serve.add_argument("--high-watermark", type=float, default=0.95)
    serve.add_argument("--low-watermark", type=float, default=0.85)
    serve.add_argument("--vocab-size", type=int, default=None, help="reject token ids >= this")
    serve.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (TLS on)")
    serve.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    serve.add_argument(
        "--tokens", type=Path, default=None,
        help="file of 'token tenant' lines: bearer-token authentication on "
        "(or set KVSERVICE_TOKENS=token=tenant,...)",
    )  # fmt: skip
    serve.add_argument("--grace", type=float, default=30.0, help="seconds to drain on SIGTERM")
    serve.add_argument(
        "--no-local-endpoint", dest="local_endpoint", action="store_false",
        help="serve gRPC only: no Unix socket for clients on this host",
    )  # fmt: skip
    serve.add_argument(
        "--quota", action="append", default=None, metavar="TENANT=BLOCKS",
        help="the most blocks a tenant may hold (repeat for more tenants)",
    )  # fmt: skip
    serve.add_argument(
        "--default-quota", type=int, default=None,
        help="the most blocks a tenant without --quota may hold (default: no limit)",
    )  # fmt: skip
    serve.add_argument(
        "--lease-ttl-s", type=float, default=None,
        help="free a sequence no call has named for this many seconds (default: never)",
    )  # fmt: skip
    serve.set_defaults(run=run_serve)

    status = commands.add_parser("status", help="workers, tiers, usage and hit rate of a server")
    status.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}")
    status.add_argument("--token", default=None, help="bearer token")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds")
    status.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    status.set_defaults(run=run_status)

    commands.add_parser("demo", help="a small model generating through the service", add_help=False)
    add_bench_parser(commands)
    add_scale_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "demo":  # the demo parses its own options
        return run_demo(rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args) or 0)


def run_demo(argv: list[str]) -> int:
    from kvservice.demo import main as demo_main

    return int(demo_main(argv) or 0)


def service_options(args: argparse.Namespace) -> dict[str, Any]:
    """Pool sizes and coordinator options given on the command line (unset ones left out)."""
    options = {
        "num_gpu_blocks": args.num_gpu_blocks,
        "gpu_mem_fraction": args.gpu_mem_fraction,
        "num_cpu_blocks": args.num_cpu_blocks,
        "cpu_pool_gib": args.cpu_pool_gib,
        "decode_graphs": args.decode_graphs,
        "vocab_size": args.vocab_size,
        "quotas": parse_quotas(args.quota) if args.quota else None,
        "default_quota": args.default_quota,
    }
    options = {k: v for k, v in options.items() if v is not None}
    options["high_watermark"] = args.high_watermark
    options["low_watermark"] = args.low_watermark
    return options


def run_serve(args: argparse.Namespace) -> int:
    import ray

    from kvservice import server
    from kvservice.metrics import Metrics, start_metrics_server
    from kvservice.transport_ray import start_ray_service

    layout = parse_layout(args.layout, block_size=args.block_size)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    tokens = None
    if args.tokens is not None or _tokens_in_env():
        from kvservice.auth import load_tokens

        tokens = load_tokens(args.tokens)
    if args.ray_address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=args.ray_address, log_to_driver=False)
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    num_workers = args.num_workers or max(1, num_gpus)
    metrics = Metrics()
    if args.metrics_port and not args.coordinator_actor:  # else the actor serves them
        start_metrics_server(metrics, args.metrics_port, args.host)
    log.info(
        "layout %s, %d worker(s) on %s", layout.key(), num_workers, "GPUs" if num_gpus else "CPUs"
    )

    def make_service() -> Any:
        scaling = {
            "scaling": True,  # kvservice scale; and one worker per GPU that joins, unless sized
            "follow_gpus": args.num_workers is None and num_gpus > 0,
        }
        if args.coordinator_actor:
            service = start_coordinator_actor(args, layout, num_workers, scaling)
        else:
            service = start_ray_service(
                layout,
                num_workers=num_workers,
                namespace=args.namespace,
                metrics=metrics,
                **scaling,
                **service_options(args),
            )
        if args.lease_ttl_s is None:
            return service
        from kvservice.leases import LeasedService

        return LeasedService(service, ttl_s=args.lease_ttl_s)

    try:
        server.serve(
            make_service=make_service,
            grace=args.grace,
            host=args.host,
            port=args.port,
            tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
            tls_key=args.tls_key.read_bytes() if args.tls_key else None,
            tokens=tokens,
            local_endpoint=args.local_endpoint,
        )
    finally:
        ray.shutdown()
    return 0


def start_coordinator_actor(
    args: argparse.Namespace, layout: Any, num_workers: int, scaling: dict[str, bool]
) -> Any:
    """The coordinator as Ray actor ``--coordinator-actor`` (in ``--namespace``), on this
    node, started here with its workers and stopped with this server (or joined, when it
    runs already); the gRPC calls go to it as any Ray client's do. The actor serves the
    Prometheus endpoint (``--metrics-port`` on ``--host``): the metrics are its own."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kvservice.transport_ray import RayTransport

    name = args.coordinator_actor
    log.info("coordinator actor %r in namespace %r", name, args.namespace)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    metrics = {"metrics_port": args.metrics_port, "metrics_addr": args.host}
    return RayTransport.connect(
        layout,
        name=name,
        namespace=args.namespace,
        num_workers=num_workers,
        actor_options={"scheduling_strategy": here},
        **scaling,
        **(metrics if args.metrics_port else {}),
        **service_options(args),
    )


def _tokens_in_env() -> bool:
    import os

    from kvservice.auth import TOKENS_ENV

    return bool(os.environ.get(TOKENS_ENV))


def run_status(args: argparse.Namespace) -> int:
    from kvservice.client import Client

    with Client.grpc(args.address, args.token, timeout=args.timeout) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print_status(stats)
    return 0


def print_status(stats: dict[str, Any]) -> None:
    """A table of workers and tiers, then the sequences, hit rate and swaps."""
    from rich.console import Console
    from rich.table import Table

    layout = stats.get("layout", {})
    table = Table(title="kvservice workers")
    for column in ("worker", "device", "tier", "total", "used", "cached", "free", "usage"):
        table.add_column(column, justify="left" if column in ("device", "tier") else "right")
    for worker_id, worker in sorted(stats.get("workers", {}).items(), key=lambda kv: int(kv[0])):
        for tier, counts in worker.get("tiers", {}).items():
            total = counts.get("total", 0)
            used = counts.get("used", 0)
            table.add_row(
                str(worker_id), str(worker.get("device", "")), tier, str(total), str(used),
                str(counts.get("cached", 0)), str(counts.get("free", 0)),
                f"{100 * used / total:.1f}%" if total else "-",
            )  # fmt: skip
    console = Console()
    console.print(table)
    prefix = stats.get("prefix_cache", {})
    swaps = stats.get("swaps", {})
    moves = stats.get("migration", {})
    paths = {p: moves.get(f"transfers_{p}", 0) for p in ("peer", "group", "host")}
    pairs = (moves.get("transfer_group") or {}).get("peer_pairs", [])
    console.print(
        f"layout L{layout.get('num_layers')} H{layout.get('num_kv_heads')} "
        f"D{layout.get('head_dim')} {layout.get('dtype')} block {layout.get('block_size')} | "
        f"sequences {stats.get('sequences_live', 0)} | "
        f"prefix hit rate {100 * prefix.get('hit_rate', 0.0):.1f}% "
        f"({prefix.get('hit_tokens', 0)}/{prefix.get('query_tokens', 0)} tokens) | "
        f"swapped out {swaps.get('out', {}).get('blocks', 0)} / "
        f"in {swaps.get('in', {}).get('blocks', 0)} blocks"
    )
    console.print(
        "transfers between workers: "
        + ", ".join(f"{n} {p}" for p, n in paths.items())
        + f" ({moves.get('blocks_transferred', 0)} blocks)"
        + (f" | peer copy between {pairs}" if pairs else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
