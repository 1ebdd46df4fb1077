"""A continuous-batching generation loop whose KV cache lives in kvservice.

Requests join at any step (``add_request``) and leave when they end; every ``step`` packs
the new tokens of the requests it serves into one forward pass of a ``ServiceModel``:
one token per decoding sequence plus prompt chunks of requests still in prefill.

Per request:
- ``create_sequence`` returns how many prompt tokens are already cached (a shared system
  prompt); only the rest is computed, in chunks of at most ``max_prefill_chunk`` tokens
  (the sequence is cut back to the first chunk and the rest is appended chunk by chunk,
  since the service computes a sequence's LAST tokens);
- greedy or sampled decoding appends one token per step;
- beam search keeps one service sequence per beam: a beam with several children is
  forked (the children share every block, copy-on-write), one with none is freed.

Scheduling: each step serves, in queue order, the requests that fit a token budget, a
sequence budget and a block budget (the blocks a step's sequences span must fit the
service's fast tier at once). Every ``slice_steps`` steps the requests just served move
to the back of the queue (round-robin in time slices), so when more sequences are live
than the fast tier holds, the service swaps those that sit out a slice to its slow tier
and back, once per slice rather than once per step. A step the service refuses for lack
of memory is retried with fewer requests, and the step size stays reduced.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from kvservice.core.errors import ResourceExhausted
from kvservice.integrations.beam import BeamSearch, Hypothesis
from kvservice.integrations.hf import ServiceModel
from kvservice.integrations.sampling import SamplingParams, make_generator, sample_token

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class GenerationResult:
    request_id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str  # "eos" or "length"
    num_cached_tokens: int
    # Beam search: the finished hypotheses, best first (tokens and normalized log-prob);
    # ``tokens`` is the first one's.
    hypotheses: list[Hypothesis] = field(default_factory=list)


@dataclass(slots=True)
class _Branch:
    """One live service sequence of a request, and the tokens it has yet to compute."""

    seq_id: int
    length: int  # tokens in the service, pending ones included
    pending: list[int]


@dataclass(slots=True)
class _Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    branches: list[_Branch] = field(default_factory=list)
    prompt_rest: list[int] = field(default_factory=list)  # prompt not yet appended
    tokens: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    beams: BeamSearch | None = None

    def num_pending(self) -> int:
        return sum(len(branch.pending) for branch in self.branches)


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_generated: int = 0  # tokens chosen (over all beams)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    num_computed_tokens: int = 0  # tokens run through the model
    num_retries: int = 0  # steps refused for memory and retried smaller
    seconds: float = 0.0


class Engine:
    """Continuous batching over one ServiceModel. Not thread-safe: one caller steps it."""

    def __init__(
        self,
        model: ServiceModel,
        *,
        max_batch_tokens: int = 512,
        max_batch_seqs: int = 64,
        max_batch_blocks: int | None = None,
        max_prefill_chunk: int | None = None,
        max_live_seqs: int | None = None,
        slice_steps: int = 8,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_seqs < 1 or slice_steps < 1:
            raise ValueError("max_batch_tokens, max_batch_seqs and slice_steps must be >= 1")
        if max_batch_blocks is not None and model.layout is None:
            raise ValueError("max_batch_blocks needs a client that reports its layout")
        self.model = model
        self.client = model.client
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_seqs = max_batch_seqs
        self.max_batch_blocks = max_batch_blocks
        self.max_prefill_chunk = min(max_prefill_chunk or max_batch_tokens, max_batch_tokens)
        self.max_live_seqs = max_live_seqs
        self.slice_steps = slice_steps
        self.stats = EngineStats()
        self._waiting: deque[_Request] = deque()
        self._running: deque[_Request] = deque()
        self._finished: dict[int, GenerationResult] = {}
        self._next_id = 0

    # -- requests ------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if params.num_beams > self.max_batch_seqs:
            raise ValueError("num_beams exceeds max_batch_seqs: the beams must share a step")
        request_id = self._next_id
        self._next_id += 1
        generator = make_generator(params, self.model.device)
        self._waiting.append(_Request(request_id, list(prompt), params, generator))
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def num_live_seqs(self) -> int:
        return sum(len(request.branches) for request in self._running)

    def pop_finished(self) -> dict[int, GenerationResult]:
        finished, self._finished = self._finished, {}
        return finished

    def run(self) -> dict[int, GenerationResult]:
        """Step until every request has finished; returns all results not yet popped."""
        while self.has_unfinished():
            self.step()
        return self.pop_finished()

    def abort(self) -> None:
        """Free every live sequence and drop all requests."""
        seq_ids = [b.seq_id for r in self._running for b in r.branches]
        if seq_ids:
            self.client.free(seq_ids)
        self._running.clear()
        self._waiting.clear()

    # -- one step ------------------------------------------------------------------------

    def step(self) -> list[int]:
        """Run one packed forward pass; returns the ids of requests that finished in it."""
        start = time.perf_counter()
        self._admit()
        batch = self._schedule()
        if not batch:
            return []
        logits, batch = self._forward(batch)
        done = self._advance(batch, logits)
        served = {request.request_id for request in batch}
        self.stats.num_steps += 1
        if self.stats.num_steps % self.slice_steps == 0:
            # End of a time slice: whoever sat it out goes first.
            rest = [r for r in self._running if r.request_id not in served]
            again = [r for r in batch if r.request_id not in done]
            self._running = deque(rest + again)
        else:
            self._running = deque(r for r in self._running if r.request_id not in done)
        self.stats.seconds += time.perf_counter() - start
        return sorted(done)

    def _admit(self) -> None:
        while self._waiting:
            request = self._waiting[0]
            # A beam search holds one sequence now and num_beams after its prefill.
            reserved = sum(r.params.num_beams for r in self._running)
            if (
                self.max_live_seqs is not None
                and reserved
                and reserved + request.params.num_beams > self.max_live_seqs
            ):
                return
            self._waiting.popleft()
            info = self.client.create_sequence(request.prompt)
            cached = int(info.num_cached_tokens)
            if not 0 <= cached < len(request.prompt):
                raise RuntimeError(
                    f"service reported {cached} cached tokens for a prompt of {len(request.prompt)}"
                )
            end = min(len(request.prompt), cached + self.max_prefill_chunk)
            if end < len(request.prompt):
                self.client.truncate(info.seq_id, end)
            request.num_cached_tokens = cached
            request.prompt_rest = request.prompt[end:]
            request.branches = [_Branch(info.seq_id, end, request.prompt[cached:end])]
            self.stats.num_prompt_tokens += len(request.prompt)
            self.stats.num_cached_tokens += cached
            self._running.append(request)

    def _schedule(self) -> list[_Request]:
        batch: list[_Request] = []
        num_tokens = num_seqs = num_blocks = 0
        for request in self._running:
            tokens, seqs = request.num_pending(), len(request.branches)
            blocks = self._num_blocks(request)
            if batch and (
                num_tokens + tokens > self.max_batch_tokens
                or num_seqs + seqs > self.max_batch_seqs
                or (
                    self.max_batch_blocks is not None
                    and num_blocks + blocks > self.max_batch_blocks
                )
            ):
                continue
            batch.append(request)
            num_tokens += tokens
            num_seqs += seqs
            num_blocks += blocks
        return batch

    def _num_blocks(self, request: _Request) -> int:
        """Blocks the request's sequences span (an upper bound: shared blocks count twice)."""
        if self.model.layout is None:
            return 0
        return sum(self.model.layout.num_blocks_for(b.length) for b in request.branches)

    def _forward(self, batch: list[_Request]) -> tuple[torch.Tensor, list[_Request]]:
        while True:
            branches = [branch for request in batch for branch in request.branches]
            try:
                logits = self.model.step(
                    [b.seq_id for b in branches],
                    [b.pending for b in branches],
                    [b.length - len(b.pending) for b in branches],
                )
            except ResourceExhausted:
                if len(batch) == 1:
                    raise
                # Recomputing the same positions rewrites the same K/V: a retry is safe.
                batch = batch[: len(batch) // 2]
                self.max_batch_seqs = max(1, sum(len(r.branches) for r in batch))
                self.stats.num_retries += 1
                logger.info(
                    "step refused for memory; retrying with %d sequences", self.max_batch_seqs
                )
                continue
            self.stats.num_computed_tokens += sum(len(b.pending) for b in branches)
            return logits, batch

    def _advance(self, batch: list[_Request], logits: torch.Tensor) -> set[int]:
        appends: dict[int, list[int]] = {}
        frees: list[int] = []
        done: set[int] = set()
        greedy = logits.argmax(dim=-1).tolist()  # one device sync for the whole step
        row = 0
        for request in batch:
            first = row
            row += len(request.branches)
            for branch in request.branches:
                branch.pending = []
            if request.prompt_rest:
                self._next_chunk(request, appends)
            elif request.params.num_beams > 1:
                if self._advance_beams(request, logits[first:row], appends, frees):
                    done.add(request.request_id)
            else:
                if request.params.do_sample:
                    token = sample_token(logits[first], request.params, request.generator)
                else:
                    token = greedy[first]
                if self._advance_one(request, token, appends, frees):
                    done.add(request.request_id)
        if frees:
            self.client.free(frees)
        if appends:
            self.client.append_tokens(list(appends), list(appends.values()))
        return done

    def _next_chunk(self, request: _Request, appends: dict[int, list[int]]) -> None:
        branch = request.branches[0]
        chunk = request.prompt_rest[: self.max_prefill_chunk]
        request.prompt_rest = request.prompt_rest[len(chunk) :]
        branch.pending = chunk
        branch.length += len(chunk)
        appends[branch.seq_id] = chunk

    def _advance_one(
        self, request: _Request, token: int, appends: dict[int, list[int]], frees: list[int]
    ) -> bool:
        params = request.params
        request.tokens.append(token)
        self.stats.num_generated += 1
        reason = None
        if token in params.eos_token_ids:
            reason = "eos"
        elif len(request.tokens) >= params.max_new_tokens:
            reason = "length"
        branch = request.branches[0]
        if reason is not None:
            frees.append(branch.seq_id)
            request.branches = []
            self._finish(request, reason)
            return True
        branch.pending = [token]
        branch.length += 1
        appends[branch.seq_id] = [token]
        return False

    def _advance_beams(
        self,
        request: _Request,
        logits: torch.Tensor,
        appends: dict[int, list[int]],
        frees: list[int],
    ) -> bool:
        params = request.params
        if request.beams is None:
            request.beams = BeamSearch(
                params.num_beams,
                params.max_new_tokens,
                params.eos_token_ids,
                params.length_penalty,
                params.early_stopping,
            )
        beams = request.beams
        parents = beams.step(torch.log_softmax(logits.float(), dim=-1))
        self.stats.num_generated += len(parents)
        old = request.branches
        if beams.done:
            frees.extend(branch.seq_id for branch in old)
            request.branches = []
            best = beams.best()
            request.tokens = best.tokens
            reason = "eos" if best.tokens and best.tokens[-1] in params.eos_token_ids else "length"
            self._finish(request, reason, beams.finished)
            return True
        num_children = [0] * len(old)
        for parent in parents:
            num_children[parent] += 1
        # A parent's first child continues its sequence; each other child is a fork of it
        # (forked before any append, so all children start from the parent's state).
        child_seq_ids: dict[int, list[int]] = {}
        for index, (branch, n) in enumerate(zip(old, num_children, strict=True)):
            if n == 0:
                frees.append(branch.seq_id)
            else:
                forked = self.client.fork(branch.seq_id, n - 1) if n > 1 else []
                child_seq_ids[index] = [branch.seq_id, *forked]
        request.branches = []
        for parent, hypothesis in zip(parents, beams.running, strict=True):
            seq_id = child_seq_ids[parent].pop(0)
            token = hypothesis.tokens[-1]
            request.branches.append(_Branch(seq_id, old[parent].length + 1, [token]))
            appends[seq_id] = [token]
        return False

    def _finish(
        self, request: _Request, reason: str, hypotheses: list[Hypothesis] | None = None
    ) -> None:
        self._finished[request.request_id] = GenerationResult(
            request.request_id,
            request.prompt,
            list(request.tokens),
            reason,
            request.num_cached_tokens,
            list(hypotheses or []),
        )


def generate(
    model: ServiceModel,
    prompts: Iterable[Sequence[int]],
    params: SamplingParams | None = None,
    **engine_options: object,
) -> list[GenerationResult]:
    """Generate for every prompt (continuous batching) and return results in prompt order."""
    engine = Engine(model, **engine_options)  # type: ignore[arg-type]
    request_ids = [engine.add_request(prompt, params) for prompt in prompts]
    results = engine.run()
    return [results[request_id] for request_id in request_ids]
