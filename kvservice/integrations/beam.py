"""Beam search bookkeeping for one request, scored exactly as transformers scores it.

Pure selection logic: given the log-probabilities of the live beams it says which beam
each new beam continues and with which token. The caller maps that onto the service
(fork a parent once per extra child, free a parent with no child), so beams that share a
history share its KV blocks and only diverge, copy-on-write, in their last block.

Transformers' rules, kept here: each step keeps the top ``2 * num_beams`` (more with several
EOS tokens) continuations over all beams; those among the first ``num_beams`` that end (EOS
or the length limit) become finished hypotheses scored ``sum_logprobs / length **
length_penalty``; the best ``num_beams`` unfinished ones run on; the search stops at the
length limit, or once ``num_beams`` hypotheses are finished and no running beam can beat
the worst of them (``early_stopping``: True stops as soon as ``num_beams`` are finished).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Hypothesis:
    tokens: list[int]
    score: float


@dataclass(slots=True)
class BeamSearch:
    num_beams: int
    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    running: list[Hypothesis] = field(default_factory=lambda: [Hypothesis([], 0.0)])
    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False
    _improvable: bool = True

    def step(self, log_probs: torch.Tensor) -> list[int]:
        """Advance one token. ``log_probs`` [len(running), V] are the live beams' next-token
        log-probabilities. Returns, for each new running beam, the index of the old beam it
        continues (``self.running`` then holds the new beams, tokens included)."""
        if self.done:
            raise RuntimeError("beam search already finished")
        num_live, vocab_size = log_probs.shape
        if num_live != len(self.running):
            raise ValueError(f"expected log-probs of {len(self.running)} beams, got {num_live}")
        scores = torch.tensor([beam.score for beam in self.running], dtype=torch.float32)
        accumulated = (log_probs.float().cpu() + scores[:, None]).reshape(-1)
        num_keep = min(max(2, 1 + len(self.eos_token_ids)) * self.num_beams, accumulated.numel())
        top_scores, top_indices = torch.topk(accumulated, num_keep)
        generated = len(self.running[0].tokens) + 1
        candidates = []
        for score, index in zip(top_scores.tolist(), top_indices.tolist(), strict=True):
            parent, token = divmod(index, vocab_size)
            ends = token in self.eos_token_ids or generated >= self.max_new_tokens
            candidates.append((parent, token, score, ends))

        self._add_finished(candidates[: self.num_beams], generated)
        survivors = [c for c in candidates if not c[3]][: self.num_beams]
        parents = [parent for parent, _, _, _ in survivors]
        self.running = [
            Hypothesis(self.running[parent].tokens + [token], score)
            for parent, token, score, _ in survivors
        ]
        self._update_done(generated, all(c[3] for c in candidates))
        return parents

    def best(self) -> Hypothesis:
        if not self.finished:
            raise RuntimeError("beam search has no finished hypothesis yet")
        return self.finished[0]

    def _add_finished(self, candidates: list[tuple[int, int, float, bool]], generated: int) -> None:
        if self.early_stopping is True and len(self.finished) >= self.num_beams:
            return
        for parent, token, score, ends in candidates:
            if ends:
                tokens = self.running[parent].tokens + [token]
                self.finished.append(Hypothesis(tokens, score / generated**self.length_penalty))
        # Stable sort: on a tie the older hypothesis stays first, as in transformers' merge.
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.num_beams :]

    def _update_done(self, generated: int, no_continuation: bool) -> None:
        full = len(self.finished) >= self.num_beams
        if full and self.running:
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_length = self.max_new_tokens
            else:
                best_length = generated
            best_possible = self.running[0].score / best_length**self.length_penalty
            if best_possible <= self.finished[-1].score:
                self._improvable = False
        self.done = (
            no_continuation
            or not self.running
            or not self._improvable
            or (self.early_stopping is True and full)
        )
