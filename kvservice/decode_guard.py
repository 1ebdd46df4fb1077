"""Request bytes that do not parse are INVALID_ARGUMENT.

grpc parses a request with the method's deserializer before any servicer code runs, and
reports a parse failure (corrupt wire format, a truncated field, a string that is not
UTF-8) as UNKNOWN, which a client cannot tell from a server bug. ``DecodeGuard`` takes
the parsing over for every unary method: the handler receives the raw bytes, parses
them itself, and aborts with INVALID_ARGUMENT naming the message type when they are
malformed; well-formed requests reach the servicer unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Malformed requests of unary methods end as INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self) -> None:
        # method -> (the handler grpc gave, its guarded twin): built once per method.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        cached = self._guarded.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guard(handler)
        self._guarded[details.method] = (handler, guarded)
        return guarded


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    behavior = handler.unary_unary

    async def parse_then_call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        parse_then_call, request_deserializer=None, response_serializer=handler.response_serializer
    )
