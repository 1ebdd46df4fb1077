"""Whole-step decode over the embedded service: one plan for every layer, kernels run by
the caller on fixed step buffers (a CUDA graph on a GPU; eager here, on the CPU).

The oracle is transformers' own generate on an untouched copy of the weights, and the
per-layer ``attend`` path on the same service.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hf_fixtures import service_for, tokens
from kvservice.workers.graph_step import StepBuffers

from kvservice import Client
from kvservice.core import errors
from kvservice.decode_steps import LocalStep, run_local_step
from kvservice.integrations import SamplingParams, generate, wrap_model
from kvservice.integrations.graphs import batch_bucket, width_bucket
from kvservice.integrations.reference import random_model, reference_beam_search, reference_generate

EOS = 2
GREEDY = SamplingParams(max_new_tokens=10, eos_token_ids=(EOS,))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama() -> Any:
    return random_model("llama")


PROMPTS = [tokens(n, seed) for seed, n in enumerate((3, 16, 17, 31, 40))]


def test_decode_steps_take_the_whole_step_path_and_match_generate(llama: Any) -> None:
    expected = reference_generate(llama, PROMPTS, GREEDY)
    with service_for(llama) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        assert model.graphs is not None
        results = generate(model, PROMPTS, GREEDY)
        stats = model.graphs.stats
        assert client.stats()["sequences_live"] == 0
    assert [r.tokens for r in results] == expected
    # Every step after the prefill decodes: all of them went through the plan-once path.
    assert stats.steps >= GREEDY.max_new_tokens - 2
    assert stats.fallbacks == 0
    assert stats.replays == 0  # no CUDA here: eager on the step buffers


def test_the_per_layer_path_still_gives_the_same_tokens(llama: Any) -> None:
    with service_for(llama) as client:
        direct = generate(wrap_model(copy.deepcopy(llama), client), PROMPTS, GREEDY)
    with service_for(llama) as client:
        model = wrap_model(copy.deepcopy(llama), client, decode_graphs=False)
        assert model.graphs is None
        per_layer = generate(model, PROMPTS, GREEDY)
    assert [r.tokens for r in direct] == [r.tokens for r in per_layer]


def test_beam_search_forks_share_blocks_and_match_transformers(llama: Any) -> None:
    # Forked beams share their last block: the step's plan copies it on write first.
    params = SamplingParams(max_new_tokens=8, num_beams=4, eos_token_ids=(EOS,))
    prompt = tokens(21, 5)
    expected = reference_beam_search(llama, prompt, params)
    with service_for(llama) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        (result,) = generate(model, [prompt], params)
        assert model.graphs is not None and model.graphs.stats.steps > 0
        stats = client.stats()
    assert [h.tokens for h in result.hypotheses] == [t for t, _ in expected]
    for hypothesis, (_, score) in zip(result.hypotheses, expected, strict=True):
        assert hypothesis.score == pytest.approx(score, rel=1e-4, abs=1e-4)
    assert stats["cow_blocks"] > 0 and stats["sequences_live"] == 0


def test_swapped_sequences_are_brought_back_before_the_step(llama: Any) -> None:
    # A device tier too small for all of them: sequences are swapped out between steps.
    prompts = [tokens(40, 50 + i) for i in range(6)]
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(EOS,))
    expected = reference_generate(llama, prompts, params)
    with service_for(llama, num_gpu_blocks=12, num_cpu_blocks=64) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        results = generate(model, prompts, params, max_batch_seqs=2, max_batch_blocks=10)
        swaps = client.stats()["swaps"]
        assert model.graphs is not None and model.graphs.stats.steps > 0
    assert [r.tokens for r in results] == expected
    assert swaps["out"]["blocks"] > 0 and swaps["in"]["blocks"] > 0


def test_a_batch_over_two_workers_falls_back_to_attend(llama: Any) -> None:
    expected = reference_generate(llama, PROMPTS, GREEDY)
    with service_for(llama, num_workers=2) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        results = generate(model, PROMPTS, GREEDY)
        stats = model.graphs.stats if model.graphs else None
    assert [r.tokens for r in results] == expected
    assert stats is not None and stats.fallbacks > 0


def test_forced_on_without_an_embedded_service_is_refused(llama: Any) -> None:
    class Remote:
        layout = None

    with pytest.raises(ValueError, match="not embedded"):
        wrap_model(copy.deepcopy(llama), Remote(), decode_graphs=True)
    mistral = random_model("mistral", sliding_window=8)
    with service_for(mistral) as client:
        assert wrap_model(copy.deepcopy(mistral), client).graphs is None
        with pytest.raises(ValueError, match="sliding-window"):
            wrap_model(copy.deepcopy(mistral), client, decode_graphs=True)


# -- the coordinator's plan-once step ------------------------------------------------------


def _written(client: Client, seq_id: int) -> list[int]:
    return list(client.service._seqs[seq_id].written)


def test_local_step_checks_like_attend_and_changes_nothing_on_error(llama: Any) -> None:
    with service_for(llama) as client:
        coord = client.service
        sid = client.create_sequence(tokens(20, 1)).seq_id
        before = coord._snapshot()
        launched: list[LocalStep] = []
        with pytest.raises(errors.NotFound):
            run_local_step(coord, [sid + 100], [1], launched.append)
        # Nothing written yet: positions 0..18 have no K/V before the new token.
        with pytest.raises(errors.FailedPrecondition, match="no K/V"):
            run_local_step(coord, [sid], [1], launched.append)
        with pytest.raises(errors.InvalidArgument):
            run_local_step(coord, [sid, sid], [1, 1], launched.append)
        assert launched == []
        assert coord._snapshot() == before


def test_local_step_records_every_layer_only_after_a_launch_that_returns(llama: Any) -> None:
    num_layers = llama.config.num_hidden_layers
    with service_for(llama) as client:
        coord = client.service
        sid = client.create_sequence(tokens(20, 2)).seq_id
        layout = client.layout
        kv = torch.randn((20, layout.num_kv_heads, layout.head_dim))
        for layer in range(num_layers):
            client.write_kv(layer, [sid], [20], kv, kv)
        client.append_tokens([sid], [[7]])

        def failing(step: LocalStep) -> None:
            raise RuntimeError("launch failed")

        with pytest.raises(RuntimeError, match="launch failed"):
            run_local_step(coord, [sid], [1], failing)
        assert _written(client, sid) == [20] * num_layers

        seen: list[LocalStep] = []
        assert run_local_step(coord, [sid], [1], lambda s: seen.append(s) or "ok") == "ok"
        (step,) = seen
        assert step.seq_lens == [21] and len(step.block_tables[0]) == 2
        assert _written(client, sid) == [21] * num_layers
        assert coord._seqs[sid].computed == 21


# -- step buffers ---------------------------------------------------------------------------


def test_step_buffers_pad_rows_that_write_nothing() -> None:
    buffers = StepBuffers.allocate(4, 16, block_size=16, num_blocks=10, device=torch.device("cpu"))
    buffers.fill([[3, 5], [7]], [17, 16], [11, 12], [16, 15])
    assert buffers.tables[:, :3].tolist() == [[3, 5, 0], [7, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert buffers.seq_lens.tolist() == [17, 16, 1, 1]
    # Position 16 of the first sequence is offset 0 of its second block; 15 of the second
    # is the last slot of block 7.
    assert buffers.slots.tolist() == [5 * 16, 7 * 16 + 15, -1, -1]
    assert buffers.token_ids.tolist() == [11, 12, 0, 0]
    assert buffers.positions.tolist() == [16, 15, 0, 0]


@pytest.mark.parametrize(
    ("tables", "lens", "match"),
    [
        ([[3]], [17], "covered"),  # 17 tokens need two blocks
        ([[30]], [1], r"block ids must be in \[0, 10\)"),
        ([[1] * 17], [1], "exceeds width"),
        ([[1]] * 5, [1] * 5, "does not fit"),
        ([[1]], [0], "covered"),
    ],
)
def test_step_buffers_refuse_bad_plans_and_keep_their_contents(
    tables: list[list[int]], lens: list[int], match: str
) -> None:
    buffers = StepBuffers.allocate(4, 16, block_size=16, num_blocks=10, device=torch.device("cpu"))
    buffers.fill([[2]], [5], [9], [4])
    before = (buffers.meta32.clone(), buffers.meta64.clone())
    with pytest.raises(ValueError, match=match):
        buffers.fill(tables, lens, [1] * len(lens), [0] * len(lens))
    assert torch.equal(buffers.meta32, before[0]) and torch.equal(buffers.meta64, before[1])


def test_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 3, 17, 64, 65, 256)] == [1, 4, 24, 64, 96, 256]
    assert batch_bucket(257) is None
    assert [width_bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
