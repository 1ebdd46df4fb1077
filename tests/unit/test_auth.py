"""Bearer tokens -> tenants: the check itself and the two token sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvservice.auth import TOKENS_ENV, TokenAuth, load_tokens
from kvservice.core.errors import InvalidArgument, PermissionDenied, Unauthenticated

AUTH = TokenAuth({"tok-a": "alice", "tok-b": "bob"})


@pytest.mark.parametrize(
    ("metadata", "tenant"),
    [
        ((("authorization", "Bearer tok-a"),), "alice"),
        ((("authorization", "bearer tok-b"),), "bob"),
        ((("authorization", "Bearer tok-a"), ("kvservice-tenant", "alice")), "alice"),
    ],
)
def test_a_valid_token_decides_the_tenant(metadata: tuple, tenant: str) -> None:
    assert AUTH.tenant_for(metadata) == tenant


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("kvservice-tenant", "alice"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer tok-c"),),
        (("authorization", "Basic tok-a"),),
        (("authorization", "tok-a"),),
    ],
)
def test_missing_or_invalid_tokens_are_unauthenticated(metadata: tuple) -> None:
    with pytest.raises(Unauthenticated, match="bearer token"):
        AUTH.tenant_for(metadata)


def test_naming_another_tenant_is_permission_denied() -> None:
    with pytest.raises(PermissionDenied, match="'bob'"):
        AUTH.tenant_for((("authorization", "Bearer tok-a"), ("kvservice-tenant", "bob")))


def test_tokens_are_not_kept_in_the_clear() -> None:
    assert "tok-a" not in repr(vars(AUTH))


def test_token_table_must_be_sane() -> None:
    with pytest.raises(InvalidArgument):
        TokenAuth({})
    with pytest.raises(InvalidArgument):
        TokenAuth({"": "alice"})


def test_load_tokens_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# token tenant\ntok-a alice\n\ntok-b bob  # the second\n")
    assert load_tokens(path) == {"tok-a": "alice", "tok-b": "bob"}
    path.write_text("tok-a\n")
    with pytest.raises(InvalidArgument, match=":1: expected 'token tenant'"):
        load_tokens(path)


def test_load_tokens_from_the_environment() -> None:
    env = {TOKENS_ENV: "tok-a=alice, tok-b=bob"}
    assert load_tokens(environ=env) == {"tok-a": "alice", "tok-b": "bob"}
    assert load_tokens(environ={}) == {}
    with pytest.raises(InvalidArgument, match="token=tenant"):
        load_tokens(environ={TOKENS_ENV: "tok-a"})
