"""``Worker``: the block pools of one device and the kernels that run next to them.

A plain class (no Ray): the embedded transport uses it directly, and the Ray actor is
this class wrapped by ``make_worker_actor``. The worker keeps no page tables: the
coordinator sends block ids and slots with every call, and the worker checks them.

Invariants:
- Every entry point checks all its arguments (shapes, dtypes, devices, layer, tier,
  block ids, slots) before it touches any state: a bad call raises InvalidArgument and
  changes nothing.
- No operation touches a block while a swap into or out of it is in flight: device work
  waits on the copy's event (no host stall), host reads and writes of the CPU tier block
  until the copy is done. Swaps run in order on one side stream that first waits for the
  compute stream, so a swap never reads a block before an earlier write to it, nor
  overwrites a block an earlier kernel still reads.
- Outputs come back on the device the query came from (a CPU query -> a CPU output), so
  a caller without a GPU can use a GPU worker through Ray.
- On a CPU worker both tiers are CPU tensors and the kernels run their torch references.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import kvservice.kernels as kernels
import torch
from kvservice.workers.checks import (
    check_block_ids,
    check_index,
    check_pairs,
    check_slots,
    check_tensor,
    check_tier,
)
from kvservice.workers.decode_graphs import DEFAULT_MAX_GRAPHS, DecodeGraphs
from kvservice.workers.host_result import HostResult
from kvservice.workers.pending import PendingCopies
from kvservice.workers.plan import AttendPlan, DevicePlan, PlanCache, PreparedPlan, prepare_plan
from kvservice.workers.pools import (
    allocate_pool,
    num_cpu_tier_blocks,
    num_gpu_tier_blocks,
    resolve_device,
    torch_dtype,
)
from kvservice.workers.records import Ledger, LedgerBook, WorkerInfo, new_epoch
from kvservice.workers.tiered import TieredAttention, has_cold_blocks
from kvservice.workers.timing import KernelTimer
from kvservice.workers.transfer import TransferMixin

from kvservice.core.errors import FailedPrecondition, InvalidArgument
from kvservice.core.ids import Tier
from kvservice.core.layout import Layout
from kvservice.core.records import RecordDelta, SeqRecord

logger = logging.getLogger(__name__)

# On CUDA the attention path's kernels are timed every _SAMPLE-th call (per op): the timing
# events of every layer cost host time, and the step is bound by host time.
_SAMPLE = 8


class StaleEpoch(RuntimeError):
    """A call fenced for an earlier incarnation of this worker (it restarted since)."""

    def __init__(self, worker_id: int, expected: int, actual: int) -> None:
        super().__init__(worker_id, expected, actual)
        self.worker_id = worker_id

    def __str__(self) -> str:
        worker_id, expected, actual = self.args
        return f"worker {worker_id} restarted: epoch {actual}, the call was for epoch {expected}"


RECENT_CALLS = 1024  # per entry point, for the median of ``stats()["call_time"]``


def _check_graph_count(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"decode_graphs must be an int >= 0, got {value!r}")


class Worker(TransferMixin):
    def __init__(
        self,
        worker_id: int,
        layout: Layout,
        *,
        device: str | torch.device = "cpu",
        num_gpu_blocks: int | None = None,
        gpu_mem_fraction: float | None = None,
        num_cpu_blocks: int | None = None,
        cpu_pool_gib: float | None = None,
        decode_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        if not isinstance(layout, Layout):
            raise InvalidArgument(f"layout must be a Layout, got {type(layout).__name__}")
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise InvalidArgument(f"worker_id must be an int >= 0, got {worker_id!r}")
        _check_graph_count(decode_graphs)
        self.worker_id = worker_id
        self.layout = layout
        self.device = resolve_device(device)
        self._device_index = self.device.index if self.device.type == "cuda" else None
        self.epoch = new_epoch()
        num_gpu = num_gpu_tier_blocks(layout, self.device, num_gpu_blocks, gpu_mem_fraction)
        num_cpu = num_cpu_tier_blocks(layout, num_cpu_blocks, cpu_pool_gib)
        is_cuda = self.device.type == "cuda"
        with self._on_device():
            self.gpu_pool = allocate_pool(layout, num_gpu, self.device)
            self.cpu_pool = allocate_pool(layout, num_cpu, torch.device("cpu"), pin_memory=is_cuda)
            self._swap_stream = torch.cuda.Stream(self.device) if is_cuda else None
        self._dtype = torch_dtype(layout)
        # Per-layer cache views, made once (indexing a tensor costs more than a list).
        self._layer_caches = [
            (self.gpu_pool[:, layer, 0], self.gpu_pool[:, layer, 1])
            for layer in range(layout.num_layers)
        ]
        self.tiered = TieredAttention(self)
        self._pending = PendingCopies()
        self._plans = PlanCache(size=16)  # a few steps' plans, several clients' tickets
        # Decode calls that return through pinned memory replay CUDA graphs, at most this
        # many kept (0: never; kvservice.workers.decode_graphs).
        self._decode_graphs = DecodeGraphs(decode_graphs) if is_cuda and decode_graphs else None
        self._timer = KernelTimer(self.device)
        self._ledger = LedgerBook()
        # Ids of the step tickets the coordinator opened here and has not closed: a call
        # through any other ticket is refused (kvservice.tickets).
        self._tickets: set[int] = set()
        self._counters: dict[str, int] = defaultdict(int)
        self._call_calls: dict[str, int] = defaultdict(int)
        self._call_seconds: dict[str, float] = defaultdict(float)
        # The last calls' own times per entry point, for a median: a mean is pulled up
        # by the few calls a busy host stalls, so it under-states what a call usually costs.
        self._call_recent: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=RECENT_CALLS))
        logger.info(
            "worker %d epoch %d on %s: %d device-tier and %d host-tier blocks of %d bytes",
            worker_id, self.epoch, self.device, num_gpu, num_cpu, layout.block_bytes,
        )  # fmt: skip

    # ----------------------------------------------------------------- helpers
    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu_pool.shape[0]

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu_pool.shape[0]

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        index = self._device_index
        if index is None or torch.cuda.current_device() == index:
            return contextlib.nullcontext()  # switching costs more than asking
        return torch.cuda.device(index)

    @contextlib.contextmanager
    def _entry(self, name: str) -> Iterator[None]:
        """The device context, and the host time the call took (counted when it succeeds)."""
        start = time.perf_counter()
        with self._on_device():
            yield
        seconds = time.perf_counter() - start
        self._call_calls[name] += 1
        self._call_seconds[name] += seconds
        self._call_recent[name].append(seconds)

    def _compute_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the worker's device with a unit-stride last dim (what the kernels need: they
        take the other strides, so a transposed q or k is used as it is, not copied)."""
        if tensor.device != self.device:
            tensor = tensor.to(self.device, non_blocking=tensor.is_pinned())
        if tensor.dim() and tensor.stride(-1) != 1:
            tensor = tensor.contiguous()
        return tensor

    def _staged_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``_to_device`` that never makes the host wait for the device: a pageable host
        tensor is copied into pinned memory first (a pageable upload waits for all work
        queued before it). The pinned block is not reused before the upload is done (the
        caching host allocator records the copy's stream)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            tensor = pinned.copy_(tensor)
        return self._to_device(tensor)

    def _upload(self, prepared: PreparedPlan) -> DevicePlan:
        """The plan's kernel tensors on the device: one pinned, asynchronous copy of the
        int32 metadata and one of the slots, so the host never waits for the device here
        (a pageable copy would wait for every kernel queued before it)."""
        if self.device.type != "cuda":
            return DevicePlan(
                prepared,
                prepared.block_tables,
                prepared.seq_lens,
                prepared.cu_q_lens,
                prepared.write_slots,
            )
        tables = prepared.block_tables
        num_table, batch = tables.numel(), prepared.seq_lens.numel()
        # Each part starts 16-byte aligned (a multiple of 4 int32s): Triton compiles a
        # kernel again for a pointer argument whose alignment differs.
        gap = -batch % 4
        parts = [tables.reshape(-1), prepared.seq_lens, tables.new_zeros(gap), prepared.cu_q_lens]
        meta = torch.cat(parts).pin_memory().to(self.device, non_blocking=True)
        cu_start = num_table + batch + gap
        slots = prepared.write_slots.pin_memory().to(self.device, non_blocking=True)
        return DevicePlan(
            prepared,
            meta[:num_table].view(tables.shape),
            meta[num_table : num_table + batch],
            meta[cu_start:],
            slots,
        )

    def _pool(self, tier: Tier) -> torch.Tensor:
        return self.gpu_pool if tier is Tier.GPU else self.cpu_pool

    def _caches(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layer_caches[layer]

    def _kv_shape(self, num_tokens: int | None) -> tuple[int | None, int, int]:
        return (num_tokens, self.layout.num_kv_heads, self.layout.head_dim)

    # ----------------------------------------------------------------- identity
    def fenced(self, epoch: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)``, if this is still the worker of ``epoch``.

        A restarted actor (a new epoch: empty pools and ledger) must not serve calls
        planned for the one that died: it raises StaleEpoch, and the caller learns the
        worker was lost instead of reading or writing blocks that hold nothing.
        """
        if epoch != self.epoch:
            raise StaleEpoch(self.worker_id, epoch, self.epoch)
        if method.startswith("_"):
            raise InvalidArgument(f"{method!r} is not a worker call")
        return getattr(self, method)(*args, **kwargs)

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            epoch=self.epoch,
            device=str(self.device),
            layout=self.layout,
            num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=self.num_cpu_blocks,
        )

    # ----------------------------------------------------------------- KV and attention
    def write_kv(
        self, layer: int, slots: Any, k: torch.Tensor, v: torch.Tensor, *, ticket: int | None = None
    ) -> None:
        """Write ``k``/``v`` ``[T, Hkv, D]`` of ``layer`` at ``slots`` ``[T]`` (-1 = skip)."""
        with self._entry("write_kv"):
            self._check_ticket(ticket)
            layer = check_index("layer", layer, self.layout.num_layers)
            k = check_tensor("k", k, self._kv_shape(None), self._dtype, self.device)
            num_tokens = k.shape[0]
            v = check_tensor("v", v, self._kv_shape(num_tokens), self._dtype, self.device)
            num_slots = self.num_gpu_blocks * self.layout.block_size
            slot_ids = check_slots(slots, num_slots, num_tokens)
            if num_tokens == 0:
                return
            blocks = torch.unique(slot_ids[slot_ids >= 0] // self.layout.block_size).tolist()
            self._pending.wait_on_stream(Tier.GPU, blocks, self._compute_stream())
            k_cache, v_cache = self._caches(layer)
            with self._timer.region("write_kv"):
                kernels.write_kv(
                    k_cache, v_cache, self._to_device(k), self._to_device(v),
                    self._to_device(slot_ids), check_indices=False,
                )  # fmt: skip

    def attend(
        self,
        layer: int,
        plan: AttendPlan,
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
        ticket: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of a mixed decode/extend batch over ``layer``'s cache.

        ``q`` ``[T, Hq, D]`` holds the sequences' new tokens, concatenated; ``k_new`` and
        ``v_new`` ``[T, Hkv, D]``, when given, are written into the new tokens' slots first.
        Returns ``out`` ``[T, Hq, D]`` on ``q``'s device, with ``lse`` ``[T, Hq]`` float32
        when ``return_lse``. A batch of single-token queries takes the decode kernel.
        ``ticket``: the step ticket the call runs under (refused once it is closed).
        """
        with self._entry("attend"):
            result, host = self._attend_on_device(
                layer, plan, q, k_new, v_new, scale=scale, sliding_window=sliding_window,
                return_lse=return_lse, ticket=ticket, staged=False,
            )  # fmt: skip
            if host is None:
                return result
            if return_lse:
                out, lse = result
                return out.to(host), lse.to(host)
            return result.to(host)

    def attend_to_host(
        self,
        layer: int,
        plan: AttendPlan,
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
        ticket: int | None = None,
    ) -> HostResult:
        """``attend`` that returns once its work is queued: host inputs go up through
        pinned staging and the output comes down into pinned memory, both without the host
        waiting for the device, so the next call can be queued while this one's kernels
        run. ``HostResult.wait()`` gives ``attend``'s result."""
        with self._entry("attend"):
            result, host = self._attend_on_device(
                layer, plan, q, k_new, v_new, scale=scale, sliding_window=sliding_window,
                return_lse=return_lse, ticket=ticket, staged=True,
            )  # fmt: skip
            if host is None:
                return HostResult.ready(result)
            return HostResult.copy_from(result, self._compute_stream())

    def _attend_on_device(
        self,
        layer: int,
        plan: AttendPlan,
        q: torch.Tensor,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
        *,
        scale: float | None,
        sliding_window: int | None,
        return_lse: bool,
        ticket: int | None,
        staged: bool,
    ) -> tuple[Any, torch.device | None]:
        """The checked call, queued: its result on this worker's device and the device
        it must reach (q's), or None when it is there already. ``staged``: host inputs
        go up through pinned memory (no host wait for the device)."""
        self._check_ticket(ticket)
        layer = check_index("layer", layer, self.layout.num_layers)
        q = check_tensor("q", q, (None, None, self.layout.head_dim), self._dtype, self.device)
        num_tokens, num_q_heads = q.shape[0], q.shape[1]
        if num_q_heads == 0 or num_q_heads % self.layout.num_kv_heads:
            raise InvalidArgument(
                f"q has {num_q_heads} heads, not a positive multiple of the layout's "
                f"{self.layout.num_kv_heads} KV heads"
            )
        if (k_new is None) != (v_new is None):
            raise InvalidArgument("give both k_new and v_new, or neither")
        if k_new is not None:
            kv_shape = self._kv_shape(num_tokens)
            k_new = check_tensor("k_new", k_new, kv_shape, self._dtype, self.device)
            v_new = check_tensor("v_new", v_new, kv_shape, self._dtype, self.device)
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise InvalidArgument(f"scale must be a number, got {scale!r}")
            if not (math.isfinite(scale) and scale > 0):
                raise InvalidArgument(f"scale must be finite and positive, got {scale!r}")
            scale = float(scale)
        if sliding_window is not None:
            sliding_window = check_index("sliding_window", sliding_window, 2**31)
            if sliding_window < 1:
                raise InvalidArgument("sliding_window must be >= 1")
        if not isinstance(return_lse, bool):
            raise InvalidArgument(f"return_lse must be a bool, got {return_lse!r}")
        if has_cold_blocks(plan):
            tiered = self.tiered.attend(
                layer, plan, q, k_new, v_new,
                scale=scale, sliding_window=sliding_window, return_lse=return_lse,
            )  # fmt: skip
            return tiered, None  # on q's device already
        writes = k_new is not None
        dev = self._plans.get(plan, num_tokens, writes)
        if dev is None:
            prepared = prepare_plan(
                plan,
                block_size=self.layout.block_size,
                num_blocks=self.num_gpu_blocks,
                num_q_rows=num_tokens,
                writes=writes,
            )
            dev = self._upload(prepared)
            self._plans.put(plan, num_tokens, writes, dev)
        prepared = dev.prepared
        block_tables, seq_lens = dev.block_tables, dev.seq_lens

        # The current stream, asked once: the waits and the timing events go on it.
        stream = self._compute_stream()
        self._pending.wait_on_stream(Tier.GPU, prepared.read_blocks, stream)
        k_cache, v_cache = self._caches(layer)
        up = self._staged_to_device if staged else self._to_device
        q_dev = up(q)
        # A graph's output is overwritten by its next replay: only for a call whose output
        # is copied off the device next on this stream (q from the host, attend_to_host).
        replayable = staged and prepared.is_decode and sliding_window is None
        graphs = self._decode_graphs if replayable and q.device != self.device else None
        if graphs is not None:
            writes = (
                None if k_new is None or v_new is None else (up(k_new), up(v_new), dev.write_slots)
            )
            with self._timer.region("paged_decode", stream, sample=_SAMPLE):
                result = graphs.decode(
                    layer, k_cache, v_cache, q_dev, block_tables, seq_lens,
                    scale=scale, return_lse=return_lse, writes=writes,
                )  # fmt: skip
            return result, q.device
        if k_new is not None and v_new is not None:
            with self._timer.region("write_kv", stream, sample=_SAMPLE):
                kernels.write_kv(
                    k_cache, v_cache, up(k_new), up(v_new),
                    dev.write_slots, check_indices=False,
                )  # fmt: skip
        if prepared.is_decode and sliding_window is None:
            with self._timer.region("paged_decode", stream, sample=_SAMPLE):
                result = kernels.paged_decode(
                    q_dev, k_cache, v_cache, block_tables, seq_lens,
                    scale=scale, return_lse=return_lse, check_indices=False,
                )  # fmt: skip
        else:
            with self._timer.region("paged_extend", stream, sample=_SAMPLE):
                result = kernels.paged_extend(
                    q_dev, k_cache, v_cache, block_tables, dev.cu_q_lens, seq_lens,
                    scale=scale, sliding_window=sliding_window, return_lse=return_lse,
                    check_indices=False,
                )  # fmt: skip
        return result, (None if q.device == self.device else q.device)

    # ----------------------------------------------------------------- block moves
    def copy_blocks(self, pairs: Sequence[tuple[int, int]] | torch.Tensor) -> None:
        """Copy whole device-tier blocks ``src -> dst`` (all layers): copy-on-write."""
        with self._entry("copy_blocks"):
            n = self.num_gpu_blocks
            checked = check_pairs(
                "pairs", pairs, num_src_blocks=n, num_dst_blocks=n, same_pool=True
            )
            if checked.shape[0] == 0:
                return
            self._pending.wait_on_stream(
                Tier.GPU, checked.flatten().tolist(), self._compute_stream()
            )
            with self._timer.region("copy_blocks"):
                kernels.copy_blocks(self.gpu_pool, self._to_device(checked), check_indices=False)
            self._counters["blocks_copied"] += checked.shape[0]

    def swap_out(self, pairs: Sequence[tuple[int, int]] | torch.Tensor) -> None:
        """Start copying device-tier blocks to host-tier blocks: ``(gpu_block, cpu_block)``."""
        with self._entry("swap_out"):
            checked = check_pairs(
                "pairs", pairs, num_src_blocks=self.num_gpu_blocks,
                num_dst_blocks=self.num_cpu_blocks, same_pool=False,
            )  # fmt: skip
            self._swap(checked, Tier.GPU, "gpu_to_cpu")

    def swap_in(self, pairs: Sequence[tuple[int, int]] | torch.Tensor) -> None:
        """Start copying host-tier blocks to device-tier blocks: ``(cpu_block, gpu_block)``."""
        with self._entry("swap_in"):
            checked = check_pairs(
                "pairs", pairs, num_src_blocks=self.num_cpu_blocks,
                num_dst_blocks=self.num_gpu_blocks, same_pool=False,
            )  # fmt: skip
            self._swap(checked, Tier.CPU, "cpu_to_gpu")

    def _swap(self, pairs: torch.Tensor, src_tier: Tier, direction: str) -> None:
        if pairs.shape[0] == 0:
            return
        src_pool, dst_pool = (
            (self.gpu_pool, self.cpu_pool)
            if src_tier is Tier.GPU
            else (self.cpu_pool, self.gpu_pool)
        )
        if self._swap_stream is not None:
            # Ordered here, not only inside swap_blocks, so the timed region is the copy alone.
            self._swap_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._timer.region(f"swap_{direction}", stream=self._swap_stream):
            handle = kernels.swap_blocks(
                src_pool, dst_pool, pairs, stream=self._swap_stream, check_indices=False
            )
        src_ids, dst_ids = pairs[:, 0].tolist(), pairs[:, 1].tolist()
        gpu_ids, cpu_ids = (src_ids, dst_ids) if src_tier is Tier.GPU else (dst_ids, src_ids)
        self._pending.add(handle, gpu_ids, cpu_ids)
        self._counters[f"blocks_{direction}"] += len(src_ids)

    def export_blocks(self, tier: int, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The contents of blocks, ``[n, *block_shape]``, as a CPU tensor."""
        with self._entry("export_blocks"):
            which = check_tier(tier)
            pool = self._pool(which)
            ids = check_block_ids("block_ids", block_ids, pool.shape[0], unique=False)
            blocks = ids.tolist()
            if which is Tier.GPU:
                self._pending.wait_on_stream(which, blocks, self._compute_stream())
                data = pool[self._to_device(ids)].cpu()
            else:
                self._pending.wait_on_host(which, blocks)
                data = pool[ids]
            self._counters["blocks_exported"] += len(blocks)
            return data

    def import_blocks(
        self, tier: int, block_ids: Sequence[int] | torch.Tensor, data: torch.Tensor
    ) -> None:
        """Overwrite blocks with ``data`` ``[n, *block_shape]`` (from export_blocks)."""
        with self._entry("import_blocks"):
            which = check_tier(tier)
            pool = self._pool(which)
            ids = check_block_ids("block_ids", block_ids, pool.shape[0], unique=True)
            shape = (ids.numel(), *self.layout.block_shape)
            data = check_tensor("data", data, shape, self._dtype, pool.device)
            blocks = ids.tolist()
            if not blocks:
                return
            if which is Tier.GPU:
                self._pending.wait_on_stream(which, blocks, self._compute_stream())
                pool[self._to_device(ids)] = self._to_device(data)
            else:
                self._pending.wait_on_host(which, blocks)
                pool[ids] = data.to("cpu")
            self._counters["blocks_imported"] += len(blocks)

    # ----------------------------------------------------------------- step tickets
    def open_ticket(self, ticket_id: int) -> None:
        self._tickets.add(check_index("ticket_id", ticket_id, 1 << 62))

    def close_ticket(self, ticket_id: int) -> None:
        """Calls through ``ticket_id`` are refused from now on (closing twice is harmless)."""
        self._tickets.discard(ticket_id)

    def set_decode_graphs(self, max_graphs: int) -> None:
        """Keep up to ``max_graphs`` decode graphs from now on (0: none), as
        ``Worker(decode_graphs=...)`` would; a new count drops the graphs kept so far
        (once the device is done with them). CPU workers keep none whatever the count."""
        _check_graph_count(max_graphs)
        with self._entry("set_decode_graphs"):
            graphs = self._decode_graphs
            if self.device.type != "cuda" or (
                graphs is not None and graphs.max_graphs == max_graphs
            ):
                return
            if graphs is not None:
                torch.cuda.synchronize(self.device)  # a replay's output may still be read
            self._decode_graphs = DecodeGraphs(max_graphs) if max_graphs else None

    def _check_ticket(self, ticket: int | None) -> None:
        if ticket is not None and ticket not in self._tickets:
            raise FailedPrecondition(
                f"ticket {ticket} is closed or was revoked (its blocks moved): plan the step again"
            )

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k_cache, v_cache) views of the device tier, for a caller in this
        process that launches the kernels itself (``kvservice.workers.graph_step``)."""
        return list(self._layer_caches)

    def wait_for_blocks(self, blocks: Iterable[int]) -> None:
        """Order the current stream after pending copies into these device-tier blocks
        (swap-ins still in flight), as ``attend`` does before reading them."""
        self._pending.wait_on_stream(Tier.GPU, blocks, self._compute_stream())

    def synchronize(self) -> None:
        """Wait until every copy and kernel this worker started has finished."""
        with self._entry("synchronize"):
            self._pending.wait_all()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------- ledger and stats
    def update_ledger(
        self,
        upserts: Mapping[int, SeqRecord],
        deletes: Sequence[int] = (),
        delta: RecordDelta | None = None,
    ) -> None:
        """Store (replace) the records in ``upserts``, drop those of ``deletes``, and fold
        ``delta`` (changes to records held before this call) into its records.

        Each record must name its own key as ``seq_id`` and only blocks of this worker's
        pools. Deleting an unknown sequence is not an error, so a retried update is
        harmless; a delta for a record not held is (nothing is applied then).
        """
        with self._entry("update_ledger"):
            sizes = (self.num_gpu_blocks, self.num_cpu_blocks)
            self._ledger.update(upserts, deletes, sizes, delta)

    def update_progress(self, progress: Mapping[int, int]) -> None:
        """``{seq_id: num_computed_tokens}`` for records this ledger holds: the computed
        count a whole record would carry, sent without the record (the end of a decode
        step). The next record sent for a sequence replaces it; ``ledger()`` reports it."""
        with self._entry("update_progress"):
            self._ledger.update_progress(progress)

    def ledger(self) -> Ledger:
        with self._entry("ledger"):
            return self._ledger.snapshot(self.epoch)

    def stats(self) -> dict[str, Any]:
        """Pool sizes, copies in flight, blocks and bytes moved, kernel and call times.

        Kernel time is device time on CUDA (reading it waits for queued kernels); call
        time is host time inside the worker's methods.
        """
        block_bytes = self.layout.block_bytes
        counters = dict(self._counters)
        tiers = {}
        held = self._ledger.blocks_held()
        for tier in Tier:
            num = self._pool(tier).shape[0]
            tiers[tier.name.lower()] = {
                "num_blocks": num,
                "bytes": num * block_bytes,
                "blocks_in_ledger": len(held[tier]),
                "blocks_in_flight": len(self._pending.blocks_in_flight(tier)),
            }
        moved = ("gpu_to_cpu", "cpu_to_gpu")
        graphs = self._decode_graphs
        no_graphs = {"graphs": 0, "captures": 0, "replays": 0}
        return {
            "worker_id": self.worker_id,
            "epoch": self.epoch,
            "device": str(self.device),
            "num_sequences": len(self._ledger),
            "tiers": tiers,
            "blocks_swapped": {d: counters.get(f"blocks_{d}", 0) for d in moved},
            "bytes_swapped": {d: counters.get(f"blocks_{d}", 0) * block_bytes for d in moved},
            "blocks_copied": counters.get("blocks_copied", 0),
            "blocks_exported": counters.get("blocks_exported", 0),
            "blocks_imported": counters.get("blocks_imported", 0),
            "blocks_sent": counters.get("blocks_sent", 0),
            "blocks_received": counters.get("blocks_received", 0),
            "tiered": self.tiered.stats(),
            "decode_graphs": graphs.stats() if graphs is not None else no_graphs,
            "kernel_time": self._timer.totals(),
            "call_time": {
                name: {
                    "calls": self._call_calls[name],
                    "seconds": self._call_seconds[name],
                    "recent_median_s": statistics.median(self._call_recent[name]),
                    "recent_calls": len(self._call_recent[name]),
                }
                for name in sorted(self._call_calls)
            },
        }
