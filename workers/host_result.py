"""A call's output on its way from the device to pinned host memory.

``Worker.attend_to_host`` queues its kernels and the copy of their output into pinned
memory, records an event after the copy and returns at once. ``wait`` blocks until the
event (the GIL is released meanwhile), so the thread that returns one call's output does
not hold back the launch of the next call on another thread.
"""

from __future__ import annotations

from typing import Any

import torch


class HostResult:
    """``wait()`` gives the call's result (a tensor or a tuple of tensors) on the host."""

    __slots__ = ("_event", "_value")

    def __init__(self, value: Any, event: torch.cuda.Event | None) -> None:
        self._value = value
        self._event = event

    @classmethod
    def ready(cls, value: Any) -> HostResult:
        """A result already where it must be (computed on the host, or by a host path)."""
        return cls(value, None)

    @classmethod
    def copy_from(cls, value: Any, stream: torch.cuda.Stream | None) -> HostResult:
        """Start copying device tensor(s) ``value`` to pinned host memory on ``stream``
        (after the work that makes them). The pinned blocks come from torch's caching
        host allocator, which does not hand them out again before the copy is done."""
        tensors = value if type(value) is tuple else (value,)
        host = tuple(
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in tensors
        )
        event = torch.cuda.Event()
        event.record(stream)
        return cls(host if type(value) is tuple else host[0], event)

    def wait(self) -> Any:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._value
