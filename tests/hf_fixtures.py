"""Helpers of the tests that run small transformers models through the service."""

from __future__ import annotations

from typing import Any

import torch

from kvservice import Client
from kvservice.integrations import layout_for


def tokens(n: int, seed: int, vocab_size: int = 128) -> list[int]:
    """``n`` random token ids of the small models' vocabulary (0-2 are pad, bos, eos)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=gen).tolist()


def service_for(model: Any, *, device: str = "cpu", **options: Any) -> Client:
    """An embedded service (fp32, 16-token blocks) that holds ``model``'s KV cache; pool
    sizes default to 64 blocks per tier."""
    layout = layout_for(model.config, dtype="float32", block_size=16)
    options = {"num_gpu_blocks": 64, "num_cpu_blocks": 64, **options}
    return Client.embedded(layout, device=device, **options)
