"""The local channel: step-ticket attention calls from processes on the worker's host,
over a Unix socket beside Ray.

Why: a Ray actor call costs the worker's process a good part of a millisecond of host time
of its own (receiving the task, unpickling its arguments, pickling and sending the
result), about as long as the decode kernel of a 64-sequence call runs. With every worker
paced by its host side, adding workers adds less than their GPUs could. Over the channel a
call costs a header, a small pickle and the tensors' bytes read into place (pinned memory
on a GPU worker, uploaded from there).

What a call does is ``RayWorker.ticket_call``'s: under the worker's lock, fenced by the
worker's epoch and by the ticket, its kernels queued (``attend_to_host``); its output goes
back once the copy to pinned memory is done. Per connection one thread reads and queues
calls while another waits for their outputs and writes them back, in order, so a call's
output leaves while the next call's kernels run. A call's error goes back as its reply and
the connection carries on; a broken frame ends the connection.

Plans travel once per connection: a call names a plan its connection already carried by
its key (``kvservice.workers.wire``), so a decode call carries q and little more.

The socket lives in Linux's abstract namespace under a random name, which only a caller
given it (through Ray, by ``RayWorker.channel_address``) knows; its frames are pickled,
so the name is a capability, to be handed to trusted processes of the host only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

from kvservice.workers.channel_frames import (
    CALL,
    ERROR,
    OK,
    SOCKET_BUFFER_BYTES,
    ChannelClosed,
    describe,
    recv_bytes,
    recv_header,
    recv_tensors,
    send_frame,
)
from kvservice.workers.host_result import HostResult
from kvservice.workers.wire import WirePlan

logger = logging.getLogger(__name__)

# Plans a connection may hold; a client clears them (the ``reset`` flag) before that.
MAX_PLANS_PER_CONNECTION = 256

# serve(epoch, layer, plan, q, k_new, v_new, ticket=..., **options) -> HostResult
Serve = Callable[..., HostResult]


def configure(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)


def error_meta(exc: BaseException) -> bytes:
    """The exception pickled, or a RuntimeError naming it when it does not pickle."""
    try:
        return pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - any pickling failure: send what can be sent
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


class ChannelServer:
    """Accepts connections on an abstract Unix socket; each is served by two threads."""

    def __init__(self, serve: Serve, *, pin_memory: bool) -> None:
        self._serve = serve
        self._pin_memory = pin_memory
        self.address = f"\0kvservice-channel-{os.getpid()}-{secrets.token_hex(16)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(64)
        self._closed = False
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.counters = {"connections": 0, "calls": 0, "errors": 0}
        threading.Thread(target=self._accept, name="channel-accept", daemon=True).start()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counters, "open": len(self._connections)}

    def close(self) -> None:
        """Stop accepting and end every connection (their callers see the channel close)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.add(conn)
                self.counters["connections"] += 1
            configure(conn)
            replies: queue.SimpleQueue[tuple[int, Any] | None] = queue.SimpleQueue()
            threading.Thread(
                target=self._read, args=(conn, replies), name="channel-read", daemon=True
            ).start()
            threading.Thread(
                target=self._write, args=(conn, replies), name="channel-write", daemon=True
            ).start()

    def _read(
        self, conn: socket.socket, replies: queue.SimpleQueue[tuple[int, Any] | None]
    ) -> None:
        """Read calls and queue their kernels, in order; each call's HostResult (or the
        exception it raised) goes to the writer."""
        plans: dict[Any, WirePlan] = {}
        try:
            while True:
                header = recv_header(conn)
                if header is None:
                    return
                kind, meta_len, payload, seq = header
                if kind != CALL:
                    raise ChannelClosed(f"unknown frame kind {kind}")
                meta = pickle.loads(recv_bytes(conn, meta_len))  # noqa: S301 - see the module docstring
                epoch, layer, plan, layout, options, ticket, reset = meta
                tensors = recv_tensors(conn, layout, payload, pin_memory=self._pin_memory)
                replies.put(
                    (seq, self._call(plans, reset, epoch, layer, plan, tensors, ticket, options))
                )
        except (OSError, ChannelClosed, pickle.UnpicklingError, ValueError, TypeError) as exc:
            if not self._closed:
                logger.info("local channel connection ended: %s", exc)
        finally:
            replies.put(None)

    def _call(
        self,
        plans: dict[Any, WirePlan],
        reset: bool,
        epoch: int,
        layer: int,
        plan: Any,
        tensors: list[Any],
        ticket: int,
        options: dict[str, Any],
    ) -> Any:
        if reset:
            plans.clear()
        try:
            if type(plan) is WirePlan:
                if len(plans) >= MAX_PLANS_PER_CONNECTION:
                    raise ChannelClosed(
                        f"more than {MAX_PLANS_PER_CONNECTION} plans on a connection"
                    )
                plans[plan.key] = plan
            elif type(plan) is tuple:
                known = plans.get(plan)
                if known is None:
                    raise ChannelClosed(f"plan {plan} was never sent on this connection")
                plan = known
            return self._serve(epoch, layer, plan, *tensors, ticket=ticket, **options)
        except ChannelClosed:
            raise
        except BaseException as exc:  # noqa: BLE001 - the call's error is its reply
            return exc

    def _write(
        self, conn: socket.socket, replies: queue.SimpleQueue[tuple[int, Any] | None]
    ) -> None:
        try:
            while (item := replies.get()) is not None:
                seq, pending = item
                try:
                    if isinstance(pending, BaseException):
                        raise pending
                    value = pending.wait()
                except BaseException as exc:  # noqa: BLE001 - sent back to the caller
                    with self._lock:
                        self.counters["errors"] += 1
                    send_frame(conn, ERROR, seq, error_meta(exc), [])
                    continue
                tensors = value if type(value) is tuple else (value,)
                meta = pickle.dumps((type(value) is tuple, describe(tensors)))
                with self._lock:
                    self.counters["calls"] += 1
                send_frame(conn, OK, seq, meta, tensors)
        except OSError as exc:
            if not self._closed:
                logger.info("local channel connection ended while replying: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
