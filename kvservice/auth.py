"""Bearer tokens -> tenants for the gRPC server.

With tokens configured, every KVService call must carry ``authorization: Bearer <token>``
(UNAUTHENTICATED otherwise); the token decides the tenant, and a call that names another
tenant in ``kvservice-tenant`` is PERMISSION_DENIED. Health checks and reflection need no
token. Tokens are kept only as SHA-256 digests, so looking one up takes the same time
whatever its prefix, and a dump of the table does not reveal them.

Token sources: a file of ``token tenant`` lines (``#`` comments) or the environment
variable ``KVSERVICE_TOKENS`` as ``token=tenant,token=tenant``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from kvservice.core.errors import InvalidArgument, KVServiceError, PermissionDenied, Unauthenticated
from kvservice.status import status_of
from kvservice.wire import TENANT_KEY

TOKENS_ENV = "KVSERVICE_TOKENS"
_GUARDED_PREFIX = "/kvservice.v1.KVService/"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """The token table; ``tenant_for(metadata)`` is the whole check."""

    def __init__(self, token_to_tenant: Mapping[str, str]) -> None:
        if not token_to_tenant:
            raise InvalidArgument("authentication needs at least one token")
        for token, tenant in token_to_tenant.items():
            if not token or not tenant:
                raise InvalidArgument("tokens and tenants must be non-empty")
        self._digest_to_tenant = {_digest(t): tenant for t, tenant in token_to_tenant.items()}

    def tenant_for(self, metadata: Sequence[tuple[str, Any]]) -> str:
        header = named = None
        for key, value in metadata:
            if key == "authorization":
                header = value
            elif key == TENANT_KEY:
                named = value
        scheme, _, token = (header or "").partition(" ")
        tenant = self._digest_to_tenant.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthenticated("missing or invalid bearer token")
        if named and named != tenant:
            raise PermissionDenied(f"this token does not act for tenant {named!r}")
        return tenant


def load_tokens(path: str | Path | None = None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """token -> tenant from a ``token tenant`` file, else from ``KVSERVICE_TOKENS``."""
    pairs: list[tuple[str, str]] = []
    if path is not None:
        for num, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise InvalidArgument(f"{path}:{num}: expected 'token tenant'")
            pairs.append((fields[0], fields[1]))
    else:
        for item in environ.get(TOKENS_ENV, "").split(","):
            if item.strip():
                token, sep, tenant = item.strip().partition("=")
                if not sep:
                    raise InvalidArgument(f"{TOKENS_ENV}: expected token=tenant, got {item!r}")
                pairs.append((token, tenant))
    return dict(pairs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses KVService calls without a valid token before their request is even parsed."""

    def __init__(self, auth: TokenAuth) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_GUARDED_PREFIX):
            try:
                self._auth.tenant_for(details.invocation_metadata or ())
            except KVServiceError as exc:
                return _refusal(exc)
        return await continuation(details)


def _refusal(exc: KVServiceError) -> grpc.RpcMethodHandler:
    code, details, _ = status_of(exc)

    async def refuse(_request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(refuse)
