"""The unit-test guard itself must be able to fail: opening a socket raises."""

import socket

import pytest


def test_socket_connect_is_refused_in_unit_tests() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(RuntimeError, match="unit tests must not"):
            s.connect(("127.0.0.1", 9))
    finally:
        s.close()
