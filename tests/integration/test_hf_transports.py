"""A transformers model generating through the service over Ray and over gRPC (127.0.0.1).

The same checks as the embedded unit tests, on the remote transports: greedy tokens of a
ragged batch and a beam search equal transformers' ``generate``, with two workers (a
step's sequences split between them) and a device tier small enough that sequences swap.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
import torch

from kvservice import Client
from kvservice.integrations import SamplingParams, generate, layout_for, wrap_model
from kvservice.integrations.reference import random_model, reference_generate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

EOS = 2
POOLS = {"num_workers": 2, "num_gpu_blocks": 8, "num_cpu_blocks": 96}


@pytest.fixture(scope="module")
def llama() -> Any:
    return random_model("llama")


def start(transport: str, layout: Any, request: pytest.FixtureRequest) -> tuple[Client, list[Any]]:
    if transport == "ray":
        request.getfixturevalue("ray_cluster")
        name = f"kvservice-hf-{uuid.uuid4().hex[:8]}"
        return Client.ray(layout, name=name, use_gpu=False, **POOLS), []
    from kvservice.server import ServerThread
    from kvservice.transport_embedded import build_embedded

    coordinator = build_embedded(layout, device="cpu", **POOLS)
    server = ServerThread(coordinator, host="127.0.0.1", port=0)
    return Client.grpc(server.address, timeout=120), [server.stop, coordinator.close]


@pytest.mark.parametrize("transport", ["ray", "grpc"])
def test_generation_over_a_remote_transport_matches_generate(
    llama: Any, transport: str, request: pytest.FixtureRequest
) -> None:
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (3, 18, 33, 27, 9, 40)]
    greedy = SamplingParams(max_new_tokens=16, eos_token_ids=(EOS,))
    beams = SamplingParams(max_new_tokens=8, num_beams=4, eos_token_ids=(EOS,))
    expected_greedy = reference_generate(llama, prompts, greedy)
    expected_beams = reference_generate(llama, prompts[:2], beams)

    client, stops = start(transport, layout_for(llama.config, dtype="float32"), request)
    try:
        model = wrap_model(copy.deepcopy(llama), client)
        options = dict(max_batch_blocks=7, max_prefill_chunk=16)
        got_greedy = [r.tokens for r in generate(model, prompts, greedy, **options)]
        got_beams = [r.tokens for r in generate(model, prompts[:2], beams, **options)]
        stats = client.stats()
    finally:
        client.close()
        for stop in stops:
            stop()
    assert got_greedy == expected_greedy
    assert got_beams == expected_beams
    assert stats["swaps"]["out"]["blocks"] > 0 and stats["swaps"]["in"]["blocks"] > 0
    assert stats["cow_blocks"] > 0
    assert stats["sequences_live"] == 0
