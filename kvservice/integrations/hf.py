"""Run a transformers model's attention inside kvservice.

``wrap_model`` points a Llama-family model (Llama, Mistral, Qwen2, Qwen3: every model whose
attention calls ``attention_interface(module, query, key, value, mask, scaling=...,
sliding_window=...)``) at the attention function registered here as ``"kvservice"``.
The model then keeps no cache of its own: each layer hands the new tokens' query, key and
value (after RoPE) to ``client.attend``, which writes the K/V into the service's pages and
returns the attention output over the sequence's whole cached past.

One forward step is a *packed* batch: the new tokens of every sequence in the step are
concatenated into a single row (batch 1), with explicit position ids, so a ragged batch
needs no padding and no mask. Which sequences the row holds travels as the keyword argument
``kvservice_step`` (a ``StepContext``), which transformers forwards untouched from the
model's ``forward`` down to the attention function.

Invariant: a sequence's new tokens are its LAST ``q_len`` tokens in the service, in order,
at positions ``length - q_len .. length - 1``; the caller appends tokens before the step
that computes them.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from kvservice.core.layout import Layout
from kvservice.integrations.graphs import DecodeGraphs
from kvservice.workers.graph_step import DirectDecode, StepBuffers

ATTN_IMPLEMENTATION = "kvservice"
STEP_KWARG = "kvservice_step"

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class StepContext:
    """Which sequences one packed forward step holds, in row order."""

    client: Any
    seq_ids: list[int]
    q_lens: list[int]
    kv_dtype: torch.dtype | None = None
    # A decode step planned once for every layer (kvservice.integrations.graphs): each
    # layer's attention runs on its fixed buffers instead of calling the client.
    direct: Any = None


def kvservice_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls per layer: query [1, Hq, T, D], key/value
    [1, Hkv, T, D] of the step's new tokens; returns ([1, T, Hq, D], None)."""
    step = kwargs.get(STEP_KWARG)
    if not isinstance(step, StepContext):
        raise RuntimeError(
            "a kvservice-wrapped model must be called through ServiceModel (no step context given)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"kvservice attention expects one packed row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("kvservice attention is for inference: dropout must be 0")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by kvservice")
    # [T, H, D] views, not copies: after RoPE q and k are laid out head-major, and the
    # service takes any layout with unit-stride rows.
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if step.kv_dtype is not None and q.dtype != step.kv_dtype:
        q, k, v = q.to(step.kv_dtype), k.to(step.kv_dtype), v.to(step.kv_dtype)
    if step.direct is not None:
        out = step.direct.attend(
            module.layer_idx, q, k, v, scale=scaling, sliding_window=sliding_window
        )
        if out.dtype != query.dtype:
            out = out.to(query.dtype)
        return out.unsqueeze(0), None
    out = step.client.attend(
        module.layer_idx,
        step.seq_ids,
        step.q_lens,
        q,
        k_new=k,
        v_new=v,
        scale=scaling,
        sliding_window=sliding_window,
    )
    if out.device != query.device or out.dtype != query.dtype:
        out = out.to(device=query.device, dtype=query.dtype)
    return out.unsqueeze(0), None


def register() -> None:
    """Make ``"kvservice"`` a known attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kvservice_attention)


def layout_for(config: Any, *, dtype: str = "bfloat16", block_size: int = 16) -> Layout:
    """The service layout that holds the KV cache of a model with this transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Layout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        block_size=block_size,
    )


def torch_dtype(layout: Layout) -> torch.dtype:
    return _TORCH_DTYPES[layout.dtype]


class ServiceModel:
    """A causal LM whose attention runs in kvservice, stepped on packed ragged batches."""

    def __init__(self, model: Any, client: Any, *, decode_graphs: bool | None = None) -> None:
        self.model = model
        self.client = client
        layout = getattr(client, "layout", None)
        if callable(layout):
            layout = layout()
        if layout is not None:
            expected = layout_for(model.config, dtype=layout.dtype, block_size=layout.block_size)
            if expected != layout:
                raise ValueError(f"the service layout {layout} does not fit the model ({expected})")
        self.layout: Layout | None = layout
        self.kv_dtype = torch_dtype(layout) if layout is not None else None
        self.device = next(model.parameters()).device
        self.graphs = self._decode_graphs(decode_graphs)

    def _decode_graphs(self, wanted: bool | None) -> DecodeGraphs | None:
        """Whole-step decode (a CUDA graph on a GPU) when the service is embedded on the
        model's device and the model has no sliding-window layers; ``wanted`` None = where
        possible, False = never, True = or raise."""
        if wanted is False:
            return None
        coord = getattr(self.client, "service", None)
        why = None
        if not DecodeGraphs.supports(coord, self.device):
            why = "the service is not embedded with its workers on the model's device"
        elif _has_sliding_window(self.model.config):
            why = "the model has sliding-window attention"
        if why is not None:
            if wanted:
                raise ValueError(f"decode graphs unavailable: {why}")
            return None
        return DecodeGraphs(
            coord, self.device, self._forward_buffers, tenant=getattr(self.client, "tenant", None)
        )

    def capture_graphs(self, max_batch: int, max_tokens: int) -> int:
        """Capture the decode graphs of up to ``max_batch`` sequences of ``max_tokens``
        tokens now (else each on first use); returns how many there are (0: none used)."""
        if self.graphs is None:
            return 0
        with torch.inference_mode():
            return self.graphs.capture(max_batch, max_tokens)

    def _forward_buffers(self, buffers: StepBuffers, direct: DirectDecode) -> torch.Tensor:
        """The model over a decode step's fixed buffers: float32 logits [rows, vocab]."""
        context = StepContext(None, [], [], self.kv_dtype, direct)
        output = self.model(
            input_ids=buffers.token_ids.unsqueeze(0),
            position_ids=buffers.positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=0,
            **{STEP_KWARG: context},
        )
        return output.logits[0].float()

    @torch.inference_mode()
    def step(
        self,
        seq_ids: Sequence[int],
        new_tokens: Sequence[Sequence[int]],
        start_positions: Sequence[int],
    ) -> torch.Tensor:
        """Compute the new tokens of each sequence (already appended in the service, at
        positions ``start .. start + len - 1``) and return float32 logits [B, V] of each
        sequence's last new token."""
        if not (len(seq_ids) == len(new_tokens) == len(start_positions)) or not seq_ids:
            raise ValueError("step needs one token list and one start position per sequence")
        q_lens = [len(tokens) for tokens in new_tokens]
        if min(q_lens) < 1:
            raise ValueError("every sequence in a step needs at least one new token")
        if self.graphs is not None and max(q_lens) == 1:
            logits = self.graphs.step(
                list(seq_ids), [tokens[0] for tokens in new_tokens], list(start_positions)
            )
            if logits is not None:
                return logits
        flat = [token for tokens in new_tokens for token in tokens]
        positions = [
            p
            for start, n in zip(start_positions, q_lens, strict=True)
            for p in range(start, start + n)
        ]
        last_rows = list(accumulate(q_lens, initial=-1))[1:]
        # One host-to-device copy for all three, asynchronous from pinned memory.
        packed = torch.frombuffer(array("q", flat + positions + last_rows), dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        num_rows = len(flat)
        context = StepContext(self.client, list(seq_ids), q_lens, self.kv_dtype)
        output = self.model(
            input_ids=packed[:num_rows].unsqueeze(0),
            position_ids=packed[num_rows : 2 * num_rows].unsqueeze(0),
            use_cache=False,
            logits_to_keep=packed[2 * num_rows :],
            **{STEP_KWARG: context},
        )
        return output.logits[0].float()


def _has_sliding_window(config: Any) -> bool:
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    if getattr(config, "use_sliding_window", True) is False:
        return False
    return getattr(config, "sliding_window", None) is not None


def wrap_model(model: Any, client: Any, *, decode_graphs: bool | None = None) -> ServiceModel:
    """Switch ``model`` (in place) to kvservice attention and return it ready to step.
    ``decode_graphs``: see ``ServiceModel`` (whole-step decode over an embedded service)."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.eval()
    return ServiceModel(model, client, decode_graphs=decode_graphs)


def load_model(
    name_or_path: str,
    client: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> ServiceModel:
    """``AutoModelForCausalLM.from_pretrained`` with kvservice attention."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs
    )
    if device is not None:
        model = model.to(device)
    return wrap_model(model, client)
