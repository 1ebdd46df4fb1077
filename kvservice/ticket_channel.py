"""The caller's end of a worker's local channel (``kvservice.workers.channel``): a step
ticket's attention calls to a worker on this host, over a Unix socket instead of Ray.

One connection per worker and process, shared by the process's threads and its copies of
the worker's handle: a call is
written whole under the send lock, and replies come back in the order of the calls, so a
thread waiting for its reply reads (under the receive lock) every reply before it and
leaves each for its own waiter. A connection that breaks (the worker died, or closed its
channel) fails its calls in flight with ``WorkerLost``; the handle then goes back to Ray.

``KVSERVICE_TICKET_CHANNEL=0`` in a caller's environment keeps its calls on Ray.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable
from typing import Any

import torch

from kvservice.coordinator_workers import WorkerLost
from kvservice.core.errors import KVServiceError
from kvservice.workers.channel import MAX_PLANS_PER_CONNECTION, configure
from kvservice.workers.channel_frames import (
    CALL,
    OK,
    ChannelClosed,
    describe,
    recv_bytes,
    recv_header,
    recv_tensors,
    send_frame,
    skip,
)
from kvservice.workers.wire import WirePlan
from kvservice.workers.worker import StaleEpoch

logger = logging.getLogger(__name__)

ENV = "KVSERVICE_TICKET_CHANNEL"

# This process's connections by worker (its actor's id): every copy of a worker's handle
# (each ticket a process receives carries its own) shares one.
_LOCK = threading.Lock()
_OPEN: dict[tuple[int, Any], ChannelConnection] = {}
_REFUSED: set[tuple[int, Any]] = set()  # workers this process found no channel to use


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def shared_connection(
    worker_key: Any, worker_id: int, ask_address: Callable[[], str]
) -> ChannelConnection | None:
    """This process's connection to the worker's channel, made on first use (the address
    from ``ask_address``, which raises OSError when there is none to use); None when
    this process cannot use one (then it asks no more, and its calls go through Ray)."""
    if not enabled_by_env():
        return None
    key = (os.getpid(), worker_key)
    conn = _OPEN.get(key)
    if conn is not None and conn.broken is None:
        return conn
    with _LOCK:
        conn = _OPEN.get(key)
        if conn is not None and conn.broken is None:
            return conn
        _OPEN.pop(key, None)
        if key in _REFUSED:
            return None
        try:
            conn = ChannelConnection(ask_address(), worker_id)
        except (OSError, KVServiceError, AttributeError, WorkerLost) as exc:
            # Ray then reports a lost worker at the call's result, as ever.
            logger.debug("worker %d: ticket calls stay on Ray (%s)", worker_id, exc)
            _REFUSED.add(key)
            return None
        _OPEN[key] = conn
        return conn


class ChannelConnection:
    """One connection to a worker's channel; ``submit`` then ``ChannelCall.result``."""

    def __init__(self, address: str, worker_id: int) -> None:
        self.worker_id = worker_id
        self.pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(address)
        except OSError:
            self._sock.close()
            raise
        configure(self._sock)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._seq = itertools.count()
        self._done: dict[int, tuple[bool, Any]] = {}
        self._plans_sent: set[Any] = set()
        self.broken: BaseException | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def submit(
        self,
        epoch: int,
        layer: int,
        plan: Any,
        tensors: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        ticket: int,
        options: dict[str, Any],
    ) -> ChannelCall:
        """Send one call: (q, k_new, v_new) as bytes; a ``WirePlan`` this connection
        carried before goes by its key. A broken connection fails the call at its
        ``result()`` (``WorkerLost``), as a Ray call fails at its result."""
        cpu = tuple(None if t is None else t.detach().cpu() for t in tensors)
        with self._send_lock:
            seq = next(self._seq)
            if self.broken is not None:
                return ChannelCall(self, seq)
            reset = False
            if type(plan) is WirePlan:
                if plan.key in self._plans_sent:
                    plan = plan.key
                else:
                    if len(self._plans_sent) >= MAX_PLANS_PER_CONNECTION:
                        self._plans_sent.clear()
                        reset = True
                    self._plans_sent.add(plan.key)
            meta = pickle.dumps((epoch, layer, plan, describe(cpu), options, ticket, reset))
            try:
                send_frame(self._sock, CALL, seq, meta, cpu)
            except OSError as exc:
                self._break(exc)
        return ChannelCall(self, seq)

    def wait(self, seq: int) -> Any:
        with self._recv_lock:
            while seq not in self._done:
                self._check()
                try:
                    self._read_reply()
                except (OSError, ChannelClosed, pickle.UnpicklingError) as exc:
                    raise self._break(exc) from exc
            ok, value = self._done.pop(seq)
        if ok:
            return value
        if isinstance(value, StaleEpoch):
            raise WorkerLost(self.worker_id, value)
        raise value

    def _read_reply(self) -> None:
        header = recv_header(self._sock)
        if header is None:
            raise ChannelClosed("the worker closed the channel")
        status, meta_len, payload, seq = header
        meta = pickle.loads(recv_bytes(self._sock, meta_len))  # noqa: S301 - our worker's reply
        if status != OK:
            skip(self._sock, payload)
            self._done[seq] = (False, meta)
            return
        is_tuple, layout = meta
        tensors = recv_tensors(self._sock, layout, payload)
        self._done[seq] = (True, tuple(tensors) if is_tuple else tensors[0])

    def _check(self) -> None:
        if self.broken is not None:
            raise WorkerLost(self.worker_id, self.broken)

    def _break(self, exc: BaseException) -> WorkerLost:
        self.broken = exc
        self.close()
        return WorkerLost(self.worker_id, exc)


class ChannelCall:
    """A call in flight on a channel (a ``PendingCall``)."""

    __slots__ = ("_conn", "_seq")

    def __init__(self, conn: ChannelConnection, seq: int) -> None:
        self._conn = conn
        self._seq = seq

    def result(self) -> Any:
        return self._conn.wait(self._seq)
