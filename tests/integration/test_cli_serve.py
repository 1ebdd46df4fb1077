"""``kvservice serve`` as a real process on the test's Ray cluster: health, gRPC calls,
metrics over HTTP, ``kvservice status``, recovery after a crash, and a clean SIGTERM; and
with its coordinator as a named Ray actor, shared by gRPC and Ray clients."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import ATOL, LAYOUT, Shadow

from kvservice import Client

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    def __init__(self, gcs_address: str, namespace: str, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port()
        layout = f"{LAYOUT.num_layers},{LAYOUT.num_kv_heads},{LAYOUT.head_dim},{LAYOUT.dtype}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvservice.cli",
                "serve",
                "--ray-address",
                gcs_address,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--layout",
                layout,
                "--block-size",
                str(LAYOUT.block_size),
                "--num-workers",
                "1",
                "--num-gpu-blocks",
                "32",
                "--num-cpu-blocks",
                "32",
                "--namespace",
                namespace,
                "--grace",
                "5",
                *extra,
            ],  # fmt: skip
            stdout=log_path.open("w"),  # a file, not a pipe: a full pipe would block it
            stderr=subprocess.STDOUT,
        )
        self.address = f"127.0.0.1:{self.port}"

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.output()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise AssertionError(f"server not SERVING in {START_TIMEOUT_S}s:\n{self.output()}")

    def metrics(self) -> str:
        """The text of the server's Prometheus endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def namespace(ray_cluster: None) -> Iterator[str]:
    from kvservice.workers import find_worker_actors

    name = f"kvservice-serve-{uuid.uuid4().hex[:8]}"
    yield name
    import ray

    for actor in find_worker_actors(name).values():  # whatever a failed test left behind
        ray.kill(actor, no_restart=True)


def test_serve_recovers_after_a_crash_and_stops_on_sigterm(namespace: str, tmp_path: Path) -> None:
    import ray
    from kvservice.workers import find_worker_actors

    gcs = ray.get_runtime_context().gcs_address
    shadow = Shadow(seed=7)
    first = ServeProcess(gcs, namespace, tmp_path / "first.log")
    try:
        first.wait_serving()
        with Client.grpc(first.address, timeout=60) as client:
            info = client.create_sequence(list(range(10)))
            shadow.prefill(client, info.seq_id, 10, 0)
            before = client.get_sequence(info.seq_id)
        metrics = first.metrics()
        assert "kvservice_sequences_live 1.0" in metrics
        assert 'kvservice_rpc_latency_seconds_count{method="attend"}' in metrics
        status = subprocess.run(
            [sys.executable, "-m", "kvservice.cli", "status", "--address", first.address],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "kvservice workers" in status.stdout and "prefix hit rate" in status.stdout
    finally:
        assert first.stop(signal.SIGKILL) != 0  # a crash: the worker actors live on

    assert list(find_worker_actors(namespace)) == [0]
    second = ServeProcess(gcs, namespace, tmp_path / "second.log")
    try:
        second.wait_serving()
        with Client.grpc(second.address, timeout=60) as client:
            assert client.get_sequence(info.seq_id) == before
            client.append_tokens([info.seq_id], [[3]])
            for layer in range(LAYOUT.num_layers):
                out, expected = shadow.attend(client, layer, [info.seq_id], [1], [11])
                assert (out - expected).abs().max() <= ATOL * 10
            client.free([info.seq_id])
    finally:
        code = second.stop(signal.SIGTERM)
    assert code == 0, second.output()
    assert find_worker_actors(namespace) == {}


def test_serve_shares_its_coordinator_actor_with_ray_clients(
    namespace: str, tmp_path: Path
) -> None:
    import ray

    gcs = ray.get_runtime_context().gcs_address
    shadow = Shadow(seed=8)
    name = f"coordinator-{namespace}"
    serve = ServeProcess(
        gcs, namespace, tmp_path / "actor.log", "--coordinator-actor", name,
        "--decode-graphs", "4",  # a worker option passed through the actor (CPU: no graphs)
    )  # fmt: skip
    try:
        serve.wait_serving()
        with Client.grpc(serve.address, timeout=60) as client:
            info = client.create_sequence(list(range(10)))
            shadow.prefill(client, info.seq_id, 10, 0)
            seen = client.get_sequence(info.seq_id)
        # A Ray client attaches to the same coordinator: the sequence gRPC made is there,
        # and what the Ray client does is seen over gRPC.
        with Client.ray(name=name, namespace=namespace) as ray_client:
            assert ray_client.get_sequence(info.seq_id) == seen
            ray_client.append_tokens([info.seq_id], [[3]])
            for layer in range(LAYOUT.num_layers):
                out, expected = shadow.attend(ray_client, layer, [info.seq_id], [1], [11])
                assert (out - expected).abs().max() <= ATOL * 10
        with Client.grpc(serve.address, timeout=60) as client:
            assert client.get_sequence(info.seq_id).length == 11  # the Ray client's append
            client.free([info.seq_id])
        metrics = serve.metrics()
        assert 'kvservice_rpc_latency_seconds_count{method="attend"}' in metrics
    finally:
        code = serve.stop(signal.SIGTERM)
    assert code == 0, serve.output()
    with pytest.raises(ValueError):  # stopped with the server that started it
        ray.get_actor(name, namespace=namespace)
