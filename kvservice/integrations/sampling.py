"""How one request picks its next tokens: the parameters and the sampled choice.

The filters run in transformers' order (temperature, then top-k, then top-p) so that a
seeded run means the same thing here as in ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What to generate for one request.

    ``num_beams > 1`` runs beam search (greedy over beams, transformers' scoring:
    ``length_penalty`` and ``early_stopping`` mean what they mean there).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search here is deterministic: do_sample needs num_beams == 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError("early_stopping must be True, False or 'never'")


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if not params.do_sample:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to float logits [N, V]; removed entries are -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Sample one token from one row of logits [V] (greedy choice is the caller's argmax)."""
    probs = filter_logits(logits[None], params).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0, 0])
