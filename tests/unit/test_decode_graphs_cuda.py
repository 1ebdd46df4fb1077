"""Decode steps replayed as CUDA graphs give the tokens of transformers' generate (GPU)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hf_fixtures import service_for, tokens

from kvservice import Client
from kvservice.integrations import SamplingParams, generate, layout_for, wrap_model
from kvservice.integrations.reference import random_model, reference_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EOS = 2


@pytest.fixture(scope="module")
def llama() -> Any:
    torch.backends.cuda.matmul.allow_tf32 = False
    return random_model("llama", device="cuda")


def test_graph_replays_match_generate_on_a_ragged_batch(llama: Any) -> None:
    prompts = [tokens(n, seed) for seed, n in enumerate((3, 16, 17, 31, 40, 70))]
    params = SamplingParams(max_new_tokens=24, eos_token_ids=(EOS,))
    expected = reference_generate(llama, prompts, params)
    with service_for(llama, device="cuda", num_gpu_blocks=256) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        assert model.graphs is not None
        results = generate(model, prompts, params)
        stats = model.graphs.stats
    assert [r.tokens for r in results] == expected
    assert stats.captures > 0 and stats.replays == stats.steps > 0 and stats.fallbacks == 0


def test_captured_ahead_graphs_are_reused_and_the_pool_is_not_written_by_padding(
    llama: Any,
) -> None:
    prompts = [tokens(20 + 7 * i, 40 + i) for i in range(5)]
    params = SamplingParams(max_new_tokens=16, eos_token_ids=(EOS,))
    expected = reference_generate(llama, prompts, params)
    with service_for(llama, device="cuda", num_gpu_blocks=256) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        pool = client.service._handles[0].worker.gpu_pool
        before = pool.clone()
        made = model.capture_graphs(max_batch=8, max_tokens=100)
        # Capturing runs the forward on padding rows only: no slot of the pool is written.
        assert torch.equal(pool, before)
        assert made == model.graphs.stats.captures > 0
        results = generate(model, prompts, params)
        assert model.graphs.stats.captures == made  # every bucket was there already
    assert [r.tokens for r in results] == expected


def test_graphs_and_the_per_layer_path_agree_in_bf16(llama: Any) -> None:
    bf16 = copy.deepcopy(llama).to(torch.bfloat16)
    prompts = [tokens(n, 90 + n) for n in (5, 33, 64)]
    params = SamplingParams(max_new_tokens=6, eos_token_ids=(EOS,))
    outputs = []
    for graphs in (True, False):
        layout = layout_for(bf16.config, dtype="bfloat16", block_size=16)
        with Client.embedded(layout, device="cuda", num_gpu_blocks=64) as client:
            model = wrap_model(copy.deepcopy(bf16), client, decode_graphs=graphs)
            outputs.append([r.tokens for r in generate(model, prompts, params)])
    assert outputs[0] == outputs[1]
