"""Small random-weight models and transformers' own generate: the oracle for the service path.

``random_model`` builds a Llama-family causal LM from a config alone (no download), with a
larger weight scale than transformers' default so that greedy choices are far apart and
the generated text varies (at the default scale a tiny model soon repeats two tokens).
``reference_generate`` runs ``model.generate`` with its own cache: greedy over a
left-padded batch, beam search one prompt at a time; it returns the generated tokens of
each prompt, cut after the first EOS, comparable with ``GenerationResult.tokens``.
``reference_beam_search`` returns every hypothesis of one beam search with its score,
comparable with ``GenerationResult.hypotheses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvservice.integrations.sampling import SamplingParams

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def random_model(
    model_type: str = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    sliding_window: int | None = None,
    initializer_range: float = 0.2,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Any:
    """A causal LM of the given family with random weights, in eval mode, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}")
    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if model_type in ("mistral", "qwen2", "qwen3"):
        options["sliding_window"] = sliding_window
        if model_type != "mistral":
            options["use_sliding_window"] = sliding_window is not None
            options["max_window_layers"] = 0
    elif sliding_window is not None:
        raise ValueError("llama has no sliding window; use mistral or qwen2")
    config = AutoConfig.for_model(model_type, **options)
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.device(device):  # initialize in place: a 1B model is slow to fill on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@torch.inference_mode()
def reference_generate(
    model: Any, prompts: Sequence[Sequence[int]], params: SamplingParams, *, pad_token_id: int = 0
) -> list[list[int]]:
    """Greedy or beam-search tokens of transformers' ``generate`` for each prompt."""
    device = next(model.parameters()).device
    common = _generate_options(params, pad_token_id)
    if params.num_beams > 1:
        return [reference_beam_search(model, prompt, params)[0][0] for prompt in prompts]
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), device=device)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(ids, attention_mask=mask, **common)
    return [_cut(row[width:].tolist(), params.eos_token_ids) for row in out]


@torch.inference_mode()
def reference_beam_search(
    model: Any, prompt: Sequence[int], params: SamplingParams, *, pad_token_id: int = 0
) -> list[tuple[list[int], float]]:
    """All ``num_beams`` hypotheses of transformers' beam search, best first, with their
    scores (sum of log-probs over length ** length_penalty)."""
    device = next(model.parameters()).device
    out = model.generate(
        torch.tensor([list(prompt)], device=device),
        num_beams=params.num_beams,
        num_return_sequences=params.num_beams,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        return_dict_in_generate=True,
        output_scores=True,
        **_generate_options(params, pad_token_id),
    )
    return [
        (_cut(row[len(prompt) :].tolist(), params.eos_token_ids), float(score))
        for row, score in zip(out.sequences, out.sequences_scores, strict=True)
    ]


def _generate_options(params: SamplingParams, pad_token_id: int) -> dict[str, Any]:
    if params.do_sample:
        raise ValueError("the reference is deterministic: do_sample must be False")
    return dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        eos_token_id=list(params.eos_token_ids) or None,
        pad_token_id=pad_token_id,
    )


def _cut(tokens: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens
