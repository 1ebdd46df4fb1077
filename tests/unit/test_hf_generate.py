"""A transformers model generating through the embedded service gives transformers' tokens.

Small random-weight models (fp32, CPU); the oracle is ``model.generate`` with the model's
own cache on an untouched copy of the same weights.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hf_fixtures import service_for, tokens

from kvservice.integrations import (
    Engine,
    SamplingParams,
    generate,
    load_model,
    wrap_model,
)
from kvservice.integrations.reference import (
    random_model,
    reference_beam_search,
    reference_generate,
)

EOS = 2
GREEDY = SamplingParams(max_new_tokens=12, eos_token_ids=(EOS,))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def used_blocks(stats: dict[str, Any], tier: str = "gpu") -> int:
    return sum(w["tiers"][tier]["used"] for w in stats["workers"].values())


@pytest.fixture(scope="module")
def llama() -> Any:
    return random_model("llama")


RAGGED = [tokens(n, seed) for seed, n in enumerate((1, 5, 17, 33, 40))]


@pytest.mark.parametrize(
    ("model_type", "sliding_window"),
    [("llama", None), ("mistral", 8), ("qwen2", None), ("qwen3", None)],
)
def test_packed_step_gives_the_models_logits(model_type: str, sliding_window: int | None) -> None:
    reference = random_model(model_type, sliding_window=sliding_window)
    with service_for(reference) as client:
        model = wrap_model(copy.deepcopy(reference), client)
        seq_ids = [client.create_sequence(p).seq_id for p in RAGGED]
        logits = model.step(seq_ids, RAGGED, [0] * len(RAGGED))
    assert logits.shape == (len(RAGGED), reference.config.vocab_size)
    for row, prompt in enumerate(RAGGED):
        expected = reference(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("model_type", "sliding_window"),
    [("llama", None), ("mistral", 8), ("qwen2", None), ("qwen3", None)],
)
def test_greedy_ragged_batch_matches_generate(model_type: str, sliding_window: int | None) -> None:
    reference = random_model(model_type, sliding_window=sliding_window)
    expected = reference_generate(reference, RAGGED, GREEDY)
    with service_for(reference) as client:
        model = wrap_model(copy.deepcopy(reference), client)
        # Prompts longer than a chunk are prefilled in pieces.
        results = generate(model, RAGGED, GREEDY, max_prefill_chunk=16)
        assert client.stats()["sequences_live"] == 0
    assert [r.tokens for r in results] == expected
    assert all(len(r.tokens) == GREEDY.max_new_tokens or r.tokens[-1] == EOS for r in results)


def test_the_sliding_window_changes_the_output() -> None:
    # Guards the test above: with a window much shorter than the prompts it must matter.
    windowed = reference_generate(random_model("mistral", sliding_window=4), RAGGED, GREEDY)
    full = reference_generate(random_model("mistral"), RAGGED, GREEDY)
    assert windowed != full


def test_continuous_batching_joins_and_leaves(llama: Any) -> None:
    prompts = [tokens(n, 100 + n) for n in (9, 30, 3, 21, 14, 48)]
    lengths = [4, 12, 7, 1, 10, 6]
    params = [SamplingParams(max_new_tokens=n, eos_token_ids=(EOS,)) for n in lengths]
    expected = [reference_generate(llama, [p], q)[0] for p, q in zip(prompts, params, strict=True)]
    with service_for(llama) as client:
        engine = Engine(wrap_model(copy.deepcopy(llama), client), max_batch_tokens=40)
        request_ids: list[int] = []
        finished_at: dict[int, int] = {}
        step = 0
        while len(request_ids) < len(prompts) or engine.has_unfinished():
            if step % 2 == 0 and len(request_ids) < len(prompts):  # one joins every other step
                i = len(request_ids)
                request_ids.append(engine.add_request(prompts[i], params[i]))
            for request_id in engine.step():
                finished_at[request_id] = step
            step += 1
        results = engine.pop_finished()
    assert [results[r].tokens for r in request_ids] == expected
    assert len(set(finished_at.values())) > 1


def test_shared_prefix_is_computed_once_and_its_blocks_shared(llama: Any) -> None:
    system = tokens(48, 7)  # three full blocks
    prompts = [system + tokens(n, 200 + n) for n in (5, 11, 20)]
    expected = reference_generate(llama, prompts, GREEDY)
    with service_for(llama) as client:
        engine = Engine(wrap_model(copy.deepcopy(llama), client))
        first = engine.add_request(prompts[0], GREEDY)
        engine.step()  # prefill: the system prompt's blocks enter the prefix cache
        others = [engine.add_request(p, GREEDY) for p in prompts[1:]]
        engine.step()
        # All three live: each spans its own blocks, but the three system blocks are shared.
        spans = sum(-(-(len(p) + 1) // 16) for p in prompts)
        assert engine.num_live_seqs() == 3
        assert used_blocks(client.stats()) == spans - 2 * 3
        results = engine.run()
    assert results[first].num_cached_tokens == 0
    assert [results[r].num_cached_tokens for r in others] == [48, 48]
    assert [results[r].tokens for r in (first, *others)] == expected
    assert engine.stats.num_computed_tokens < sum(map(len, prompts)) + 3 * GREEDY.max_new_tokens


def assert_same_hypotheses(result: Any, expected: list[tuple[list[int], float]]) -> None:
    assert [h.tokens for h in result.hypotheses] == [tokens for tokens, _ in expected]
    for hypothesis, (_, score) in zip(result.hypotheses, expected, strict=True):
        assert hypothesis.score == pytest.approx(score, rel=1e-4, abs=1e-4)
    assert result.tokens == expected[0][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_matches_transformers(llama: Any, seed: int) -> None:
    params = SamplingParams(max_new_tokens=10, num_beams=4, eos_token_ids=(EOS,))
    prompts = [tokens(n, 300 + 10 * seed + n) for n in (6, 19, 31)]
    expected = [reference_beam_search(llama, p, params) for p in prompts]
    with service_for(llama) as client:
        results = generate(wrap_model(copy.deepcopy(llama), client), prompts, params)
        stats = client.stats()
    for result, hypotheses in zip(results, expected, strict=True):
        assert_same_hypotheses(result, hypotheses)
    assert stats["cow_blocks"] > 0  # beams shared their history and copied on divergence
    assert stats["sequences_live"] == 0


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"), [(1.0, False), (2.0, False), (0.0, "never"), (2.0, True)]
)
def test_beam_search_stopping_rules_match_transformers(
    llama: Any, length_penalty: float, early_stopping: bool | str
) -> None:
    # Many EOS tokens make hypotheses finish early, so the stopping rules shape the result.
    params = SamplingParams(
        max_new_tokens=8, num_beams=4, eos_token_ids=tuple(range(3, 40)),
        length_penalty=length_penalty, early_stopping=early_stopping,
    )  # fmt: skip
    prompts = [tokens(n, 400 + n) for n in (4, 13, 22)]
    expected = [reference_beam_search(llama, p, params) for p in prompts]
    with service_for(llama) as client:
        results = generate(wrap_model(copy.deepcopy(llama), client), prompts, params)
    for result, hypotheses in zip(results, expected, strict=True):
        assert_same_hypotheses(result, hypotheses)


def test_small_fast_tier_swaps_sequences_out_and_back(llama: Any) -> None:
    prompts = [tokens(n, 500 + n) for n in (20, 35, 26, 41, 30, 17, 38, 23)]
    params = SamplingParams(max_new_tokens=20, eos_token_ids=(EOS,))
    expected = reference_generate(llama, prompts, params)
    # Eight sequences of 3-4 blocks against a fast tier of 12: most wait on the slow tier.
    with service_for(llama, num_gpu_blocks=12, num_cpu_blocks=64) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        results = generate(model, prompts, params, max_batch_blocks=10, max_prefill_chunk=64)
        stats = client.stats()
    assert [r.tokens for r in results] == expected
    assert stats["swaps"]["out"]["blocks"] > 0
    assert stats["swaps"]["in"]["blocks"] > 0


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama: Any) -> None:
    prompts = RAGGED[1:4]
    with service_for(llama) as client:
        model = wrap_model(copy.deepcopy(llama), client)

        def sample(**options: Any) -> list[list[int]]:
            params = SamplingParams(max_new_tokens=10, do_sample=True, **options)
            return [r.tokens for r in generate(model, prompts, params)]

        first, again = sample(seed=1, temperature=1.5), sample(seed=1, temperature=1.5)
        other = sample(seed=2, temperature=1.5)
        top1 = sample(seed=3, top_k=1)
    assert first == again
    assert first != other
    assert all(0 <= t < llama.config.vocab_size for row in first + other for t in row)
    assert top1 == reference_generate(llama, prompts, SamplingParams(max_new_tokens=10))


def test_a_wrapped_model_refuses_a_call_without_the_service(llama: Any) -> None:
    with service_for(llama) as client:
        model = wrap_model(copy.deepcopy(llama), client)
        with pytest.raises(RuntimeError, match="ServiceModel"):
            model.model(torch.tensor([[5, 6, 7]]))


def test_a_model_that_does_not_fit_the_layout_is_refused(llama: Any) -> None:
    other = random_model("llama", num_kv_heads=4)
    with service_for(llama) as client, pytest.raises(ValueError, match="does not fit"):
        wrap_model(copy.deepcopy(other), client)


def test_a_step_refused_for_memory_is_retried_smaller(llama: Any) -> None:
    # No block budget: the first step asks for all four prompts (3 blocks each) on a
    # device tier of 8 blocks, the service refuses, and the engine halves the step.
    prompts = [tokens(40, 600 + i) for i in range(4)]
    expected = reference_generate(llama, prompts, GREEDY)
    with service_for(llama, num_gpu_blocks=8, num_cpu_blocks=64) as client:
        engine = Engine(wrap_model(copy.deepcopy(llama), client))
        request_ids = [engine.add_request(p, GREEDY) for p in prompts]
        results = engine.run()
    assert [results[r].tokens for r in request_ids] == expected
    assert engine.stats.num_retries > 0
    assert engine.max_batch_seqs < len(prompts)


def test_admission_keeps_live_sequences_bounded(llama: Any) -> None:
    prompts = [tokens(n, 700 + n) for n in (5, 9, 14, 20, 3)]
    params = [GREEDY, GREEDY, SamplingParams(max_new_tokens=6, num_beams=3), GREEDY, GREEDY]
    with service_for(llama) as client:
        engine = Engine(wrap_model(copy.deepcopy(llama), client), max_live_seqs=3)
        for prompt, p in zip(prompts, params, strict=True):
            engine.add_request(prompt, p)
        most = 0
        while engine.has_unfinished():
            engine.step()
            most = max(most, engine.num_live_seqs())
            assert client.stats()["sequences_live"] == engine.num_live_seqs()
    assert most == 3


def test_abort_frees_every_live_sequence(llama: Any) -> None:
    with service_for(llama) as client:
        engine = Engine(wrap_model(copy.deepcopy(llama), client))
        engine.add_request(tokens(9, 800), SamplingParams(max_new_tokens=6, num_beams=3))
        engine.add_request(tokens(12, 801), GREEDY)
        engine.add_request(tokens(5, 802), GREEDY)
        engine.step()
        engine.step()
        assert client.stats()["sequences_live"] == 3 + 1 + 1
        engine.abort()
        assert client.stats()["sequences_live"] == 0
        assert not engine.has_unfinished()


def test_load_model_from_a_saved_checkpoint(llama: Any, tmp_path: Any) -> None:
    llama.save_pretrained(tmp_path)
    prompts = RAGGED[:3]
    with service_for(llama) as client:
        model = load_model(str(tmp_path), client, dtype=torch.float32)
        assert model.model.config._attn_implementation == "kvservice"
        results = generate(model, prompts, GREEDY)
    assert [r.tokens for r in results] == reference_generate(llama, prompts, GREEDY)
