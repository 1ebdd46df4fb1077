"""The gRPC server process: KVService, health checking and reflection on one grpc.aio server.

Life cycle:
- ``start_server`` binds the port and serves at once, with health NOT_SERVING and every
  KVService call UNAVAILABLE until a service is attached (the workers are up); then
  SERVING. So a load balancer or ``grpc_health_probe`` can watch a slow start.
- ``KVServer.stop(grace)``: health goes NOT_SERVING, new calls are refused, calls in
  flight get ``grace`` seconds to finish, then the server stops.
- ``serve(...)`` runs all of that in the foreground and stops gracefully on SIGTERM or
  SIGINT; it is what ``kvservice serve`` calls. ``ServerThread`` runs a server on a
  background thread for synchronous programs, tests and benchmarks.

Tensor payloads are large, so message limits are raised (``max_message_bytes``). TLS is
on when a certificate and key are given; bearer tokens (``kvservice.auth``) select tenants.
Clients on the server's host may send the same calls to its local endpoint
(``kvservice.local_server``), which starts and stops with the gRPC server unless
``local_endpoint=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvservice.api import Service
from kvservice.auth import AuthInterceptor, TokenAuth
from kvservice.decode_guard import DecodeGuard
from kvservice.local_server import LocalEndpoint
from kvservice.servicer import KVServicer, tenant_from_metadata
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.v1 import kvservice_pb2_grpc as pb_grpc
from kvservice.wire import MAX_MESSAGE_BYTES, message_options

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVService"].full_name
DEFAULT_GRACE_S = 30.0


class KVServer:
    """A started server; ``attach`` the service when the workers are up, ``stop`` to drain."""

    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: KVServicer,
        health_servicer: health.aio.HealthServicer,
        executor: ThreadPoolExecutor,
        port: int,
        local: LocalEndpoint | None = None,
    ) -> None:
        self._server = server
        self._servicer = servicer
        self._health = health_servicer
        self._executor = executor
        self._local = local
        self.port = port

    @property
    def local_address(self) -> str | None:
        """The local endpoint's address (``kvservice.local_server``), or None without one."""
        return None if self._local is None else self._local.address

    @property
    def service(self) -> Service | None:
        return self._servicer.service

    async def attach(self, service: Service) -> None:
        """Start answering KVService calls with ``service``; health turns SERVING."""
        self._servicer.attach(service)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d", SERVICE_NAME, self.port)

    async def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Refuse new calls, give calls in flight ``grace`` seconds, then stop."""
        await self._health.enter_graceful_shutdown()
        stopping = [self._server.stop(grace)]
        if self._local is not None:
            stopping.append(self._local.stop(grace))
        await asyncio.gather(*stopping)
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("server on port %d stopped", self.port)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def start_server(
    service: Service | None = None,
    *,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    max_workers: int = 16,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    tokens: Mapping[str, str] | None = None,
    inline_local: bool = True,
    local_endpoint: bool = True,
) -> KVServer:
    """Binds ``host:port`` (0 picks a free port: see ``KVServer.port``) and starts serving.

    With ``service`` the server is SERVING at once; without, call ``attach`` later.
    ``tls_cert``/``tls_key`` (PEM) turn on TLS; ``tokens`` (token -> tenant) turn on
    bearer-token authentication. ``inline_local``: run calls on the event loop when the
    service's workers are all in this process (``kvservice.servicer``). ``local_endpoint``:
    also serve clients on this host over a Unix socket (``kvservice.local_server``). Must
    be awaited on the loop that will run the server.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    auth = TokenAuth(tokens) if tokens is not None else None  # an empty table is an error
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvservice-rpc")
    servicer = KVServicer(
        executor,
        resolve_tenant=auth.tenant_for if auth else tenant_from_metadata,
        inline_local=inline_local,
    )
    server = grpc.aio.server(
        # Tokens are checked before a request is parsed; a request that does not parse
        # is INVALID_ARGUMENT (grpc itself would say UNKNOWN).
        interceptors=[*([AuthInterceptor(auth)] if auth else []), DecodeGuard()],
        options=message_options(max_message_bytes),
    )
    pb_grpc.add_KVServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    if tls_cert is not None and tls_key is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        executor.shutdown(wait=False)
        raise OSError(f"could not bind {address}")
    local: LocalEndpoint | None = None
    if local_endpoint:
        local = LocalEndpoint(
            servicer,
            max_message_bytes=max_message_bytes,
            check_metadata=auth.tenant_for if auth else None,
        )
        await local.start()
        servicer.local_address = local.address
        log.info("local endpoint for clients on this host: @%s", local.address)
    await server.start()
    kv_server = KVServer(server, servicer, health_servicer, executor, bound, local)
    log.info("listening on %s:%d (%s)", host, bound, "TLS" if tls_cert else "plaintext")
    if service is not None:
        await kv_server.attach(service)
    return kv_server


def serve(
    service: Service | None = None,
    *,
    make_service: Callable[[], Service] | None = None,
    grace: float = DEFAULT_GRACE_S,
    on_started: Callable[[KVServer], None] | None = None,
    **server_kwargs: Any,
) -> None:
    """Serves in the foreground until SIGTERM or SIGINT, then drains and stops.

    Give a ready ``service``, or ``make_service`` to build one (start workers) while the
    port already answers health checks with NOT_SERVING; a service built here is closed
    on the way out. ``server_kwargs`` go to ``start_server`` (host, port, tls_cert, ...).
    Must run on the main thread (signal handlers).
    """
    if (service is None) == (make_service is None):
        raise ValueError("give exactly one of service and make_service")
    asyncio.run(_serve(service, make_service, grace, on_started, server_kwargs))


async def _serve(
    service: Service | None,
    make_service: Callable[[], Service] | None,
    grace: float,
    on_started: Callable[[KVServer], None] | None,
    server_kwargs: dict[str, Any],
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    server = await start_server(service, **server_kwargs)
    if on_started is not None:
        on_started(server)
    built: Service | None = None
    try:
        if make_service is not None:
            build = loop.run_in_executor(None, make_service)
            done, _ = await asyncio.wait(
                [build, asyncio.ensure_future(stopping.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if build in done:
                built = build.result()
                await server.attach(built)
            else:
                built = await build  # finish starting so the workers can be shut down
        await stopping.wait()
        log.info("stopping: draining calls in flight (up to %.0f s)", grace)
    finally:
        await server.stop(grace)
        if built is not None:
            built.close()


class ServerThread:
    """A server on its own event loop in a daemon thread, for synchronous code.

    with ServerThread(coordinator, host="127.0.0.1", port=0) as server:
        client = GrpcTransport(server.address)
    """

    def __init__(self, service: Service | None = None, **server_kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvservice-grpc", daemon=True
        )
        self._thread.start()
        server_kwargs.setdefault("host", "127.0.0.1")
        self._host = server_kwargs["host"]
        try:
            self.server: KVServer = self._await(start_server(service, **server_kwargs))
        except BaseException:
            self._shutdown_loop()
            raise

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host
        return f"{host}:{self.port}"

    def attach(self, service: Service) -> None:
        self._await(self.server.attach(service))

    def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        if self._loop.is_closed():
            return
        try:
            self._await(self.server.stop(grace))
        finally:
            self._shutdown_loop()

    def _await(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)
