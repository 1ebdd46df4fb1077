"""What the fuzzer sends: KVService requests drawn by hypothesis, as raw protobuf bytes.

``CallMaker.draw`` builds one request directly from the ``kvservice.v1`` messages, or
bytes that are no message at all (garbage, corrupt varints, another method's message).
About half the requests are well formed: real sequences of the calling tenant,
consistent lengths, tensors of the right shape and dtype, so the service gets deep
enough to allocate, copy on write, swap and attend. The others carry one fault each
(wrong dtypes and shapes, byte counts that do not match, huge and negative sizes,
integers at and past the int64 limits, unknown, freed and other tenants' ids, bad
tenants), so a refusal is that fault's and not a side effect of another. A small model
of the live sequences (lengths, K/V written per layer) steers the draws toward ids that
exist; frees, forks, truncates and appends interleave with attention on them. When the
model is wrong, the price is a NOT_FOUND.

Each ``Call`` carries what its reply must satisfy when it is OK (``check_reply``) and
how the model follows it (``on_ok``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from kvservice.core.layout import Layout
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.wire import DTYPES, decode_tensor, layout_from_proto

# Payload budgets: big enough for "huge", small enough for a 2-core machine.
MAX_TENSOR_BYTES = 1 << 20
HUGE_PROMPTS = (20_000, 100_000)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
EDGE_INTS = (
    0, 1, -1, 2, 3, 4, 5, 8, 16, 17, 4096, 4097, 2**31 - 1, 2**31, -(2**31), 2**32,
    2**53 + 1, 2**62, _INT64_MAX, _INT64_MIN,
)  # fmt: skip
TENANTS = (None, None, "alice", "bob", "")  # "" is the default tenant too
# Metadata values are printable ASCII (grpc refuses anything else on the client side).
BAD_TENANTS = ("x" * 300, "a" * 257, "eve/../../etc", " ")
TENSOR_FAULTS = ("dtype", "bad_dtype", "shape", "bytes", "bytes", "huge", "dims", "empty")
BAD_DTYPES = ("", "int8", "float8", "BFLOAT16", "float32 ", "bool", "é", "float32\x00")
METHODS = (
    "CreateSequence", "CreateSequence", "CreateSequence", "CreateSequence",
    "AppendTokens", "AppendTokens",
    "Fork", "Truncate", "Free", "Free", "WriteKV", "Attend", "Attend", "Attend",
    "LookupPrefix", "Offload", "Prefetch", "GetSequence", "Stats", "GetLayout", "raw",
)  # fmt: skip
_REQUESTS = {
    "CreateSequence": pb.CreateSequenceRequest, "AppendTokens": pb.AppendTokensRequest,
    "Fork": pb.ForkRequest, "Truncate": pb.TruncateRequest, "Free": pb.FreeRequest,
    "WriteKV": pb.WriteKVRequest, "Attend": pb.AttendRequest,
    "LookupPrefix": pb.LookupPrefixRequest, "Offload": pb.OffloadRequest,
    "Prefetch": pb.PrefetchRequest, "GetSequence": pb.GetSequenceRequest,
    "Stats": pb.StatsRequest, "GetLayout": pb.GetLayoutRequest,
}  # fmt: skip


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(EDGE_INTS), st.integers(_INT64_MIN, _INT64_MAX), st.integers(-2, 40)
    )


@dataclass
class _Seq:
    tenant: str | None
    length: int
    # written[layer]: leading positions with K/V, as far as this side knows.
    written: list[int]


@dataclass
class Call:
    """One request on the wire, and what its reply must satisfy when it is OK."""

    method: str
    payload: bytes
    tenant: str | None
    describe: str
    check_reply: Callable[[bytes], None] | None = None
    on_ok: Callable[[bytes], None] | None = None


class CallMaker:
    """Draws requests (see the module docstring) and keeps the model of live sequences."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.seqs: dict[int, _Seq] = {}
        self.prompts: list[list[int]] = []

    def draw(self, data: st.DataObject) -> Call:
        method = data.draw(st.sampled_from(METHODS), label="method")
        if method == "raw":
            return self._raw(data)
        return getattr(self, f"_draw_{method}")(data)

    @staticmethod
    def _fault(data: st.DataObject, *faults: str) -> str | None:
        """None (a well-formed call) about half the time, else one fault."""
        # Hypothesis leans to the first, simplest choice: let that be the well-formed call.
        if not data.draw(st.booleans(), label="faulty"):
            return None
        return data.draw(st.sampled_from(faults), label="fault")

    def _tenant(self, data: st.DataObject, fault: str | None) -> str | None:
        if fault == "tenant":
            return data.draw(st.sampled_from(BAD_TENANTS), label="tenant")
        owners = sorted({seq.tenant or "" for seq in self.seqs.values()})
        if owners and data.draw(st.integers(0, 3)) < 3:  # mostly one that has sequences
            return data.draw(st.sampled_from(owners), label="tenant") or None
        return data.draw(st.sampled_from(TENANTS), label="tenant")

    @staticmethod
    def _owner(tenant: str | None) -> str | None:
        """The tenant a call acts for, as the model keys it ("" is the default one too)."""
        return tenant or None

    def _own(self, data: st.DataObject, tenant: str | None, n: int) -> list[int]:
        """Up to ``n`` distinct live sequences of ``tenant`` (fewer if it has fewer)."""
        mine = sorted(s for s, seq in self.seqs.items() if seq.tenant == self._owner(tenant))
        if not mine:
            return []
        picked = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=n, unique=True))
        return picked

    def _bad_ids(self, data: st.DataObject, tenant: str | None, ids: list[int]) -> list[int]:
        """``ids`` with one thing wrong: unknown, another tenant's, a duplicate, or none."""
        kind = data.draw(st.sampled_from(["unknown", "other", "duplicate", "empty"]))
        others = sorted(s for s, seq in self.seqs.items() if seq.tenant != self._owner(tenant))
        if kind == "other" and others:
            return [*ids, data.draw(st.sampled_from(others))]
        if kind == "duplicate" and ids:
            return [*ids, ids[0]]
        if kind == "empty":
            return []
        return [*ids, data.draw(int64s())]

    def _one_id(self, data: st.DataObject, tenant: str | None, bad: bool) -> int:
        """A live sequence of ``tenant``, or (``bad`` or none live) one that is not."""
        ids = [] if bad else self._own(data, tenant, 1)
        if ids:
            return ids[0]
        others = sorted(s for s, seq in self.seqs.items() if seq.tenant != self._owner(tenant))
        if others and data.draw(st.booleans()):
            return data.draw(st.sampled_from(others))
        return data.draw(int64s())

    def _good_tokens(self, data: st.DataObject) -> list[int]:
        kind = data.draw(st.sampled_from(["small", "small", "repeat", "repeat", "long"]))
        if kind == "repeat" and self.prompts:
            prompt = data.draw(st.sampled_from(self.prompts))
            cut = data.draw(st.integers(0, len(prompt)))
            return prompt[:cut] + data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=6))
        if kind == "long":
            rng = random.Random(data.draw(st.integers(0, 2**32)))
            return [rng.randrange(50) for _ in range(data.draw(st.integers(25, 300)))]
        return data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=24))

    def _bad_tokens(self, data: st.DataObject) -> list[int]:
        kind = data.draw(st.sampled_from(["edge", "edge", "empty", "huge"]))
        if kind == "empty":
            return []
        if kind == "edge":
            return data.draw(st.lists(int64s(), min_size=1, max_size=6))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        return [rng.randrange(50) for _ in range(data.draw(st.sampled_from(HUGE_PROMPTS)))]

    def _tensor(
        self, data: st.DataObject, msg: pb.Tensor, rows: int, heads: int, *, bad: bool
    ) -> None:
        """Fill ``msg``: a well-formed [rows, heads, head_dim] tensor, or a malformed one."""
        layout = self.layout
        shape = [rows, heads, layout.head_dim]
        dtype = layout.dtype
        kind = data.draw(st.sampled_from(TENSOR_FAULTS)) if bad else "good"
        if kind == "dtype":
            dtype = data.draw(st.sampled_from(sorted(set(DTYPES) - {layout.dtype})))
        elif kind == "bad_dtype":
            msg.dtype = data.draw(st.sampled_from(BAD_DTYPES))
            msg.shape[:] = shape
            msg.data = bytes(min(4 * math.prod(shape), MAX_TENSOR_BYTES))
            return
        elif kind == "shape":
            shape = data.draw(st.lists(st.integers(0, 9), max_size=4))
        elif kind == "huge":
            msg.dtype = dtype
            msg.shape[:] = data.draw(
                st.sampled_from(
                    [[2**62, 2**62], [2**31, 2**31, layout.head_dim], [-1, heads, layout.head_dim],
                     [_INT64_MAX], [_INT64_MIN, 1], [rows, heads, -layout.head_dim]]
                )
            )  # fmt: skip
            msg.data = bytes(data.draw(st.integers(0, 64)))
            return
        elif kind == "dims":
            shape = [1] * data.draw(st.integers(9, 40))
        elif kind == "empty":
            shape = [0, heads, layout.head_dim]
        itemsize = DTYPES[dtype].itemsize
        num_bytes = math.prod(shape) * itemsize
        if num_bytes > MAX_TENSOR_BYTES:  # too big to send: a short buffer instead
            msg.dtype, msg.shape[:], msg.data = dtype, shape, bytes(16)
            return
        seed = data.draw(st.integers(0, 2**32))
        if data.draw(st.integers(0, 4)) == 0:
            payload = random.Random(seed).randbytes(num_bytes)  # NaNs and infinities too
        else:
            gen = torch.Generator().manual_seed(seed)
            values = torch.randn(math.prod(shape), generator=gen).to(DTYPES[dtype])
            payload = values.view(torch.uint8).numpy().tobytes() if values.numel() else b""
        if kind == "bytes":
            cut = data.draw(st.sampled_from([-1, 1, -itemsize, itemsize, -num_bytes, 7]))
            payload = (payload + bytes(max(cut, 0)))[: max(0, num_bytes + cut)]
            if len(payload) == num_bytes:
                payload += b"\x00"
        msg.dtype, msg.shape[:], msg.data = dtype, shape, payload

    # ---------------------------------------------------------------- one per method

    def _draw_CreateSequence(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "tokens", "tokens", "tenant")
        tenant = self._tenant(data, fault)
        tokens = self._bad_tokens(data) if fault == "tokens" else self._good_tokens(data)
        request = pb.CreateSequenceRequest(tokens=tokens)
        layers = self.layout.num_layers

        def on_ok(reply: bytes) -> None:
            info = pb.SequenceInfo.FromString(reply)
            assert info.length == len(tokens), (info.length, len(tokens))
            assert 0 <= info.num_cached_tokens < len(tokens), info
            assert info.num_cached_tokens % self.layout.block_size == 0, info
            assert info.num_blocks == len(info.tiers) == -(-len(tokens) // self.layout.block_size), info
            self.seqs[info.seq_id] = _Seq(self._owner(tenant), len(tokens), [info.num_cached_tokens] * layers)
            if len(tokens) <= 64:
                self.prompts = [*self.prompts[-15:], list(tokens)]

        return Call("CreateSequence", request.SerializeToString(), tenant,
                    f"CreateSequence({_short(tokens)}) tenant={tenant!r}", on_ok=on_ok)  # fmt: skip

    def _draw_AppendTokens(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "ids", "count", "tokens", "tenant")
        tenant = self._tenant(data, fault)
        seq_ids = self._own(data, tenant, 4)
        if fault == "ids":
            seq_ids = self._bad_ids(data, tenant, seq_ids)
        lists = [data.draw(st.lists(st.integers(0, 50), max_size=9)) for _ in seq_ids]
        if fault == "count":
            lists = lists[1:] if lists and data.draw(st.booleans()) else [*lists, [1]]
        elif fault == "tokens":
            lists = [self._bad_tokens(data), *lists[1:]]
        request = pb.AppendTokensRequest(seq_ids=seq_ids, tokens=[pb.TokenList(tokens=t) for t in lists])

        def on_ok(_reply: bytes) -> None:
            for sid, new in zip(seq_ids, lists, strict=True):
                if sid in self.seqs:
                    self.seqs[sid].length += len(new)

        return Call("AppendTokens", request.SerializeToString(), tenant,
                    f"AppendTokens({seq_ids}, {[_short(t) for t in lists]}) tenant={tenant!r}",
                    on_ok=on_ok)  # fmt: skip

    def _draw_Fork(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "id", "n", "n", "tenant")
        tenant = self._tenant(data, fault)
        seq_id = self._one_id(data, tenant, fault == "id")
        n = data.draw(st.integers(1, 3))
        if fault == "n":
            n = data.draw(st.one_of(st.sampled_from([0, -1, 4096, 4097, _INT64_MAX]), int64s()))
        request = pb.ForkRequest(seq_id=seq_id, n=n)

        def on_ok(reply: bytes) -> None:
            children = list(pb.ForkResponse.FromString(reply).child_ids)
            assert len(children) == n and len(set(children)) == n, (len(children), n)
            parent = self.seqs.get(seq_id)
            if parent is not None:
                for child in children[:8]:
                    self.seqs[child] = _Seq(parent.tenant, parent.length, list(parent.written))

        return Call("Fork", request.SerializeToString(), tenant,
                    f"Fork({seq_id}, {n}) tenant={tenant!r}", on_ok=on_ok)  # fmt: skip

    def _draw_Truncate(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "id", "length", "length", "tenant")
        tenant = self._tenant(data, fault)
        seq_id = self._one_id(data, tenant, fault == "id")
        seq = self.seqs.get(seq_id)
        length = seq.length if seq else 0
        new = data.draw(st.integers(0, length))
        if fault == "length":
            new = data.draw(st.one_of(st.sampled_from([length + 1, -1]), int64s()))
        request = pb.TruncateRequest(seq_id=seq_id, length=new)

        def on_ok(_reply: bytes) -> None:
            if seq_id in self.seqs:
                seq = self.seqs[seq_id]
                seq.length = new
                seq.written = [min(w, new) for w in seq.written]

        return Call("Truncate", request.SerializeToString(), tenant,
                    f"Truncate({seq_id}, {new}) tenant={tenant!r}", on_ok=on_ok)  # fmt: skip

    def _draw_Free(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "ids", "tenant")
        tenant = self._tenant(data, fault)
        seq_ids = self._own(data, tenant, 3)
        if fault == "ids":
            seq_ids = self._bad_ids(data, tenant, seq_ids)
        request = pb.FreeRequest(seq_ids=seq_ids)

        def on_ok(_reply: bytes) -> None:
            for sid in seq_ids:
                self.seqs.pop(sid, None)

        return Call("Free", request.SerializeToString(), tenant,
                    f"Free({seq_ids}) tenant={tenant!r}", on_ok=on_ok)  # fmt: skip

    def _data_plane(self, data: st.DataObject, attend: bool) -> Call:
        faults = ["layer", "ids", "q_lens", "k", "v", "tenant"]
        if attend:
            faults += ["q", "q", "heads", "scale", "window", "v_missing"]
        fault = self._fault(data, *faults)
        tenant = self._tenant(data, fault)
        layout = self.layout
        kv = layout.num_kv_heads
        layer = data.draw(st.integers(0, layout.num_layers - 1))
        if fault == "layer":
            layer = data.draw(st.one_of(st.sampled_from([layout.num_layers, -1]), int64s()))
        seq_ids = self._own(data, tenant, 3)
        if fault == "ids":
            seq_ids = self._bad_ids(data, tenant, seq_ids)
        q_lens = []
        for sid in seq_ids:
            seq = self.seqs.get(sid)
            if seq is None or not 0 <= layer < layout.num_layers:
                q_lens.append(1)
                continue
            todo = seq.length - seq.written[layer]
            q_lens.append(todo if todo > 0 else data.draw(st.integers(1, max(1, min(seq.length, 4)))))
        if fault == "q_lens":
            kind = data.draw(st.sampled_from(["value", "count"]))
            if kind == "count" or not q_lens:
                q_lens = q_lens[:-1] if q_lens and data.draw(st.booleans()) else [*q_lens, 1]
            else:
                q_lens[0] = data.draw(st.one_of(st.sampled_from([0, -1, q_lens[0] + 10**6]), int64s()))
        rows = sum(q_lens) if all(0 <= q <= 4096 for q in q_lens) else data.draw(st.integers(0, 8))
        rows = min(rows, 4096)
        starts = {
            sid: self.seqs[sid].length - q
            for sid, q in zip(seq_ids, q_lens, strict=False)
            if sid in self.seqs
        }

        def record_writes(_reply: bytes) -> None:
            for sid, start in starts.items():
                seq = self.seqs.get(sid)
                if seq is not None and start <= seq.written[layer]:
                    seq.written[layer] = seq.length

        if attend:
            heads = data.draw(st.sampled_from([kv, 2 * kv]))
            if fault == "heads":
                heads = data.draw(st.sampled_from([0, 1, 3 * kv + 1])) if kv > 1 else 0
            request = pb.AttendRequest(layer=layer, seq_ids=seq_ids, q_lens=q_lens)
            self._tensor(data, request.q, rows, heads, bad=fault == "q")
            with_kv = fault in ("k", "v", "v_missing") or data.draw(st.integers(0, 4)) > 0
            if with_kv:
                self._tensor(data, request.k_new, rows, kv, bad=fault == "k")
                if fault != "v_missing":
                    self._tensor(data, request.v_new, rows, kv, bad=fault == "v")
            if fault == "scale":
                request.scale = data.draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 1e300]))
            elif data.draw(st.integers(0, 3)) == 0:
                request.scale = data.draw(st.floats(0.01, 2.0))
            if fault == "window":
                request.sliding_window = data.draw(st.one_of(st.sampled_from([0, -1, 2**31, _INT64_MAX]), int64s()))
            elif data.draw(st.integers(0, 3)) == 0:
                request.sliding_window = data.draw(st.integers(1, 40))
            request.return_lse = data.draw(st.booleans())

            def check_reply(reply: bytes) -> None:
                answer = pb.AttendResponse.FromString(reply)
                out = decode_tensor(answer.out, "out")
                assert tuple(out.shape) == (rows, heads, layout.head_dim), tuple(out.shape)
                assert answer.HasField("lse") == request.return_lse
                if with_kv:
                    record_writes(reply)

            describe = (
                f"Attend(layer={layer}, seq_ids={seq_ids}, q_lens={q_lens}, q={_tensor_text(request.q)}, "
                f"k_new={_tensor_text(request.k_new)}, v_new={_tensor_text(request.v_new)}, "
                f"scale={request.scale if request.HasField('scale') else None}, "
                f"window={request.sliding_window if request.HasField('sliding_window') else None}) "
                f"tenant={tenant!r} fault={fault}"
            )
            return Call("Attend", request.SerializeToString(), tenant, describe, check_reply=check_reply)
        request = pb.WriteKVRequest(layer=layer, seq_ids=seq_ids, q_lens=q_lens)
        self._tensor(data, request.k, rows, kv, bad=fault in ("k", "q"))
        self._tensor(data, request.v, rows, kv, bad=fault == "v")
        describe = (
            f"WriteKV(layer={layer}, seq_ids={seq_ids}, q_lens={q_lens}, "
            f"k={_tensor_text(request.k)}, v={_tensor_text(request.v)}) tenant={tenant!r} fault={fault}"
        )
        return Call("WriteKV", request.SerializeToString(), tenant, describe, on_ok=record_writes)

    def _draw_WriteKV(self, data: st.DataObject) -> Call:
        return self._data_plane(data, attend=False)

    def _draw_Attend(self, data: st.DataObject) -> Call:
        return self._data_plane(data, attend=True)

    def _draw_LookupPrefix(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "tokens", "tenant")
        tenant = self._tenant(data, fault)
        tokens = self._bad_tokens(data) if fault == "tokens" else self._good_tokens(data)
        request = pb.LookupPrefixRequest(tokens=tokens)

        def check_reply(reply: bytes) -> None:
            found = dict(pb.LookupPrefixResponse.FromString(reply).num_cached_tokens)
            for cached in found.values():
                assert 0 < cached < len(tokens) and cached % self.layout.block_size == 0, found

        return Call("LookupPrefix", request.SerializeToString(), tenant,
                    f"LookupPrefix({_short(tokens)}) tenant={tenant!r}", check_reply=check_reply)  # fmt: skip

    def _hint(self, data: st.DataObject, method: str) -> Call:
        fault = self._fault(data, "ids", "tenant")
        tenant = self._tenant(data, fault)
        seq_ids = self._own(data, tenant, 3)
        if fault == "ids":
            seq_ids = self._bad_ids(data, tenant, seq_ids)
        request = _REQUESTS[method](seq_ids=seq_ids)
        return Call(method, request.SerializeToString(), tenant, f"{method}({seq_ids}) tenant={tenant!r}")

    def _draw_Offload(self, data: st.DataObject) -> Call:
        return self._hint(data, "Offload")

    def _draw_Prefetch(self, data: st.DataObject) -> Call:
        return self._hint(data, "Prefetch")

    def _draw_GetSequence(self, data: st.DataObject) -> Call:
        fault = self._fault(data, "id", "tenant")
        tenant = self._tenant(data, fault)
        seq_id = self._one_id(data, tenant, fault == "id")

        def check_reply(reply: bytes) -> None:
            info = pb.SequenceInfo.FromString(reply)
            assert info.seq_id == seq_id and info.num_blocks == len(info.tiers), info
            seq = self.seqs.get(seq_id)
            assert seq is None or info.length == seq.length, (info, seq)

        return Call("GetSequence", pb.GetSequenceRequest(seq_id=seq_id).SerializeToString(), tenant,
                    f"GetSequence({seq_id}) tenant={tenant!r}", check_reply=check_reply)  # fmt: skip

    def _draw_Stats(self, data: st.DataObject) -> Call:
        return Call("Stats", b"", None, "Stats()",
                    check_reply=lambda reply: json.loads(pb.StatsResponse.FromString(reply).json))  # fmt: skip

    def _draw_GetLayout(self, data: st.DataObject) -> Call:
        def check_reply(reply: bytes) -> None:
            assert layout_from_proto(pb.Layout.FromString(reply)) == self.layout

        return Call("GetLayout", b"", None, "GetLayout()", check_reply=check_reply)

    def _raw(self, data: st.DataObject) -> Call:
        """Bytes that are not the method's message: garbage, corrupt varints, another type."""
        method = data.draw(st.sampled_from(sorted(_REQUESTS)), label="raw method")
        kind = data.draw(st.sampled_from(["bytes", "varint", "string", "crossed"]))
        if kind == "bytes":
            payload = data.draw(st.binary(max_size=48))
        elif kind == "varint":  # field 1 or 2 as an over-long or truncated varint
            field_tag = data.draw(st.sampled_from([0x08, 0x10, 0x0A, 0x12]))
            payload = bytes([field_tag]) + b"\xff" * data.draw(st.integers(1, 12))
            if data.draw(st.booleans()):
                payload += b"\x01"
        elif kind == "string":  # a length-delimited field longer than the message, or bad UTF-8
            payload = bytes([0x22, 0x05, 0x0A, 0x03]) + data.draw(st.sampled_from([b"\xff\xfe\xfd", b"abc", b"a"]))
        else:
            other = data.draw(st.sampled_from(sorted(_REQUESTS)))
            msg = _REQUESTS[other]()
            for fd in msg.DESCRIPTOR.fields:
                if fd.is_repeated and fd.type == fd.TYPE_INT64:
                    getattr(msg, fd.name).extend(data.draw(st.lists(int64s(), max_size=4)))
                elif fd.type == fd.TYPE_INT64:
                    setattr(msg, fd.name, data.draw(int64s()))
            payload = msg.SerializeToString()
        return Call(method, payload, None, f"{method}(raw {kind} {payload[:40]!r})")

def _short(tokens: list[int]) -> str:
    return repr(tokens) if len(tokens) <= 8 else f"<{len(tokens)} tokens {tokens[:4]}...>"


def _tensor_text(msg: pb.Tensor) -> str:
    return f"{msg.dtype!r}{list(msg.shape)}:{len(msg.data)}B"
