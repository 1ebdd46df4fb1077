"""Bearer tokens select tenants over gRPC, and TLS with a certificate made by the test."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import Shadow, make_coordinator

from kvservice.core import errors
from kvservice.grpc_client import GrpcTransport
from kvservice.server import ServerThread

pytestmark = pytest.mark.integration

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture
def address() -> Iterator[str]:
    with ServerThread(make_coordinator(), port=0, tokens=TOKENS) as server:
        yield server.address


def test_calls_without_a_valid_token_are_unauthenticated(address: str) -> None:
    for token in (None, "tok-mallory"):
        with GrpcTransport(address, token=token, timeout=10) as c:
            with pytest.raises(errors.Unauthenticated, match="bearer token"):
                c.create_sequence([1, 2, 3])
            with pytest.raises(errors.Unauthenticated):
                c.stats()


def test_health_needs_no_token(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_token_decides_the_tenant(address: str) -> None:
    with GrpcTransport(address, token="tok-alice", timeout=10) as alice, GrpcTransport(
        address, token="tok-bob", timeout=10
    ) as bob:
        # The tenant argument may repeat the token's tenant, never name another.
        info = alice.create_sequence([1, 2, 3], tenant="alice")
        assert alice.get_sequence(info.seq_id) == info
        with pytest.raises(errors.PermissionDenied, match="'bob'"):
            alice.create_sequence([1, 2, 3], tenant="bob")
        with pytest.raises(errors.NotFound, match=f"sequence {info.seq_id} not found"):
            bob.get_sequence(info.seq_id, tenant="bob")
        with pytest.raises(errors.NotFound):
            bob.free([info.seq_id], tenant="bob")
        assert alice.get_sequence(info.seq_id, tenant="alice") == info


def test_prefixes_are_not_shared_between_tenants(address: str) -> None:
    prompt = list(range(1, 10))
    with GrpcTransport(address, token="tok-alice", timeout=10) as alice, GrpcTransport(
        address, token="tok-bob", timeout=10
    ) as bob:
        info = alice.create_sequence(prompt, tenant="alice")
        Shadow().prefill(alice, info.seq_id, len(prompt), 0, tenant="alice")
        assert max(alice.lookup_prefix(prompt, tenant="alice").values()) == 8
        assert bob.lookup_prefix(prompt, tenant="bob") == {}
        assert bob.create_sequence(prompt, tenant="bob").num_cached_tokens == 0
        assert alice.create_sequence(prompt, tenant="alice").num_cached_tokens == 8


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder: Path = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert.read_bytes(), key.read_bytes()


def test_tls_with_a_self_signed_certificate(certificate: tuple[bytes, bytes]) -> None:
    cert, key = certificate
    with ServerThread(
        make_coordinator(), port=0, tls_cert=cert, tls_key=key, tokens=TOKENS
    ) as server:
        with GrpcTransport(
            server.address, token="tok-alice", root_certificates=cert, timeout=10
        ) as c:
            info = c.create_sequence([1, 2, 3], tenant="alice")
            assert c.get_sequence(info.seq_id, tenant="alice") == info
        with GrpcTransport(server.address, token="tok-alice", timeout=5) as plaintext:
            with pytest.raises(errors.Unavailable):
                plaintext.create_sequence([1, 2, 3])


def test_an_empty_token_table_does_not_turn_authentication_off() -> None:
    with pytest.raises(errors.InvalidArgument, match="at least one token"):
        ServerThread(make_coordinator(), port=0, tokens={})
