"""The server's life cycle: health, reflection, deadlines, and a graceful stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_fixtures import make_coordinator

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.grpc_client import GrpcTransport
from kvservice.server import SERVICE_NAME, ServerThread

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(address: str, service: str = SERVICE_NAME) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_not_serving_and_unavailable_until_the_service_is_attached() -> None:
    with ServerThread(port=0) as server:
        assert _health(server.address) == NOT_SERVING
        assert _health(server.address, "") == NOT_SERVING
        with GrpcTransport(server.address, timeout=10) as c:
            with pytest.raises(errors.Unavailable, match="starting"):
                c.create_sequence([1, 2, 3])
            server.attach(make_coordinator())
            assert _health(server.address) == SERVING
            assert c.create_sequence([1, 2, 3]).length == 3


def test_reflection_lists_the_services() -> None:
    with ServerThread(make_coordinator(), port=0) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            names = {s.name for s in reply.list_services_response.service}
            assert {"kvservice.v1.KVService", "grpc.health.v1.Health"} <= names
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            assert reply.file_descriptor_response.file_descriptor_proto


class Gated:
    """The real coordinator, with ``stats`` held until the test opens the gate."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.entered = threading.Event()
        self.gate = threading.Event()

    def stats(self) -> dict:
        self.entered.set()
        self.gate.wait(30)
        return self.coordinator.stats()

    def __getattr__(self, name: str) -> object:
        return getattr(self.coordinator, name)


@pytest.fixture
def gated() -> Iterator[tuple[Gated, ServerThread]]:
    service = Gated(make_coordinator())
    with ServerThread(service, port=0, max_workers=1) as server:
        yield service, server
        service.gate.set()


def test_a_call_whose_deadline_passes_while_queued_never_runs(
    gated: tuple[Gated, ServerThread],
) -> None:
    service, server = gated
    with GrpcTransport(server.address, timeout=30) as slow, GrpcTransport(
        server.address, timeout=0.3
    ) as hurried:
        blocker = threading.Thread(target=slow.stats)
        blocker.start()
        assert service.entered.wait(10)  # the only pool thread is now busy
        with pytest.raises(grpc.RpcError) as late:
            hurried.create_sequence([1, 2, 3])
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        service.gate.set()
        blocker.join(30)
        time.sleep(0.2)  # had the queued call run, it would have finished by now
        assert slow.stats()["sequences_live"] == 0


_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {fixtures!r})
    from service_fixtures import make_coordinator
    from kvservice.server import serve

    class Slow:
        def __init__(self):
            self.coordinator = make_coordinator()
        def stats(self):
            time.sleep(1.5)
            return self.coordinator.stats()
        def __getattr__(self, name):
            return getattr(self.coordinator, name)

    def make_service():
        time.sleep(1.0)  # workers take a while to come up
        return Slow()

    serve(make_service=make_service, host="127.0.0.1", port=0, grace=10,
          on_started=lambda server: print(server.port, flush=True))
    print("stopped", flush=True)
    """
)


def test_serve_reports_startup_and_drains_on_sigterm() -> None:
    script = _SERVE_SCRIPT.format(fixtures=str(ROOT / "tests"))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = int(proc.stdout.readline())
        address = f"127.0.0.1:{port}"
        assert _health(address) == NOT_SERVING  # still building the service
        deadline = time.monotonic() + 30
        while _health(address) != SERVING:
            assert time.monotonic() < deadline, "never became SERVING"
            time.sleep(0.05)
        with GrpcTransport(address, timeout=30) as c:
            c.create_sequence([1, 2, 3])
            in_flight: list[object] = []
            call = threading.Thread(target=lambda: in_flight.append(c.stats()))
            call.start()
            time.sleep(0.5)  # the stats call is now running on the server
            proc.send_signal(signal.SIGTERM)
            call.join(30)
            assert in_flight and in_flight[0]["sequences_live"] == 1  # drained, not cut
            assert proc.wait(30) == 0
            assert proc.stdout.read().strip() == "stopped"
            with pytest.raises(errors.Unavailable), GrpcTransport(address, timeout=2) as late:
                late.get_sequence(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
