"""A sequence twice the GPU tier (and one longer than a worker) generates exactly the
tokens of transformers' own generate, through the continuous-batching engine: its cold
segments live in the CPU tier and are streamed for attention, never swapped back whole.

A tiny random Llama in fp32 on the CPU; the service embedded, and over gRPC (127.0.0.1).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hf_fixtures import tokens

from kvservice import Client
from kvservice.integrations import SamplingParams, generate, layout_for, wrap_model
from kvservice.integrations.reference import random_model, reference_generate
from kvservice.server import ServerThread
from kvservice.transport_embedded import build_embedded

BLOCK = 16
SEGMENT = 2 * BLOCK
PARAMS = SamplingParams(max_new_tokens=24, eos_token_ids=())

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama() -> Any:
    return random_model("llama", vocab_size=128, hidden_size=64, num_layers=2)


def service(model: Any, **sizes: int) -> Client:
    layout = layout_for(model.config, dtype="float32", block_size=BLOCK)
    return Client.embedded(layout, device="cpu", segment_tokens=SEGMENT, **sizes)


@pytest.mark.parametrize(
    ("num_workers", "num_gpu_blocks", "num_cpu_blocks"),
    [(1, 12, 24), (2, 8, 8)],  # twice the GPU tier on one worker; spread over two
)
def test_a_sequence_twice_the_gpu_tier_generates_the_reference_tokens(
    llama: Any, num_workers: int, num_gpu_blocks: int, num_cpu_blocks: int
) -> None:
    long_prompt = tokens(360, seed=1)  # + 24 new = 384 tokens = 24 blocks
    assert len(long_prompt) + PARAMS.max_new_tokens >= 2 * num_gpu_blocks * BLOCK
    want = reference_generate(llama, [long_prompt], PARAMS)
    with service(
        llama, num_workers=num_workers, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks
    ) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        (result,) = generate(model, [long_prompt], PARAMS, max_prefill_chunk=40)
        stats = client.stats()
    assert result.tokens == want[0]
    workers = stats["workers"].values()
    cold = sum(w["worker"]["tiered"].get("cold_blocks", 0) for w in workers)
    assert cold > 0  # attention streamed CPU-tier blocks
    assert stats["long_sequences"]["attention_read_bytes"]["cold"] > 0
    if num_workers == 2:
        assert all(w["worker"]["call_time"]["attend"]["calls"] > 0 for w in workers)


def test_a_sequence_spread_over_two_workers_over_grpc(llama: Any) -> None:
    long_prompt = tokens(210, seed=5)  # 14 blocks: more than one worker holds (12)
    params = SamplingParams(max_new_tokens=6, eos_token_ids=())
    want = reference_generate(llama, [long_prompt], params)
    layout = layout_for(llama.config, dtype="float32", block_size=BLOCK)
    pools = {"num_workers": 2, "num_gpu_blocks": 6, "num_cpu_blocks": 6, "segment_tokens": SEGMENT}
    coordinator = build_embedded(layout, device="cpu", **pools)
    server = ServerThread(coordinator, host="127.0.0.1", port=0)
    client = Client.grpc(server.address, timeout=120)
    try:
        model = wrap_model(copy.deepcopy(llama), client)
        (result,) = generate(model, [long_prompt], params, max_prefill_chunk=64)
        stats = client.stats()
    finally:
        client.close()
        server.stop()
        coordinator.close()
    assert result.tokens == want[0]
    assert stats["long_sequences"]["attention_read_bytes"]["cold"] > 0
    assert all(w["worker"]["call_time"]["attend"]["calls"] > 0 for w in stats["workers"].values())


def test_long_and_short_requests_share_steps(llama: Any) -> None:
    prompts = [tokens(300, seed=2), tokens(7, seed=3), tokens(45, seed=4)]
    want = reference_generate(llama, prompts, PARAMS)
    with service(llama, num_gpu_blocks=12, num_cpu_blocks=24) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        results = generate(model, prompts, PARAMS, max_prefill_chunk=40)
        stats = client.stats()
    assert [r.tokens for r in results] == want
    assert stats["long_sequences"]["attention_read_bytes"]["cold"] > 0
