"""Sequence: one request's tokens, state and timing as the scheduler sees it.

A sequence's KV cache covers its first `num_computed_tokens` tokens. The scheduler gives it
`num_tokens - num_computed_tokens` new tokens to compute (a prefill chunk, or 1 when decoding);
recompute preemption sets num_computed_tokens back to 0 and keeps the output generated so far.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from remap import ModelId, SeqId
from replicas.engine.sampling import SamplingParams


STOP_TAIL_TOKENS_PER_CHAR = 4  # a character is at most 4 byte-level tokens (UTF-8)


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks (new, or preempted by recompute)
    RUNNING = "running"  # holds KV blocks on device
    SWAPPED = "swapped"  # its KV blocks sit in host memory
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # eos, a stop token id or a stop string
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # this request's part of a step failed (Sequence.error says why); nobody else's


@dataclass(eq=False)
class Sequence:
    seq_id: SeqId
    model: ModelId
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float  # engine clock when the request arrived
    eos_token_ids: tuple[int, ...] = ()  # the model's eos ids (ignored with params.ignore_eos)
    generator: torch.Generator | None = None  # per-request sampling state (None for greedy)
    detokenize: Callable[[list[int]], str] | None = None  # for stop strings; None when there are none
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    finish_reason: FinishReason | None = None
    first_token_s: float | None = None  # engine clock of the first output token
    token_times_s: list[float] = field(default_factory=list)  # engine clock of every output token
    num_preemptions: int = 0
    admitted: int = 0  # the scheduler's count at its latest admission (vllm-v0 preempts the latest)
    error: str | None = None  # why it failed, with finish_reason ERROR

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        """Tokens this request has generated, counting those from before a move (params.num_generated)."""
        return self.params.num_generated + len(self.output_token_ids)

    @property
    def generated_token_ids(self) -> list[int]:
        """Everything this request generated: a continuation's earlier output (the prompt's tail), then its own."""
        k = self.params.num_generated
        return (self.prompt_token_ids[len(self.prompt_token_ids) - k:] if k else []) + self.output_token_ids

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus every token it may generate: what its KV can grow to (admission's figure)."""
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def order(self) -> tuple[float, SeqId]:
        """Its place in first-come-first-served order: earlier arrivals keep memory, later ones yield."""
        return (self.arrival_s, self.seq_id)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + output."""
        n = len(self.prompt_token_ids)
        ids = self.prompt_token_ids[start:stop] if start < n else []
        if stop > n:
            ids = ids + self.output_token_ids[max(start - n, 0) : stop - n]
        return ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int, now_s: float) -> None:
        self.output_token_ids.append(token_id)
        self.token_times_s.append(now_s)
        if self.first_token_s is None:
            self.first_token_s = now_s

    def check_stop(self) -> FinishReason | None:
        """Whether the last appended token ends the sequence."""
        last = self.output_token_ids[-1]
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return FinishReason.STOP
        if last in self.params.stop_token_ids:
            return FinishReason.STOP
        if self.params.stop and self.detokenize is not None and self.num_generated >= self.params.min_tokens:
            # Only the tail the new token can complete: a stop string of L characters ending in it
            # lies within the last L characters, and STOP_TAIL_TOKENS_PER_CHAR tokens per character
            # cover even byte-level tokens of 4-byte characters. The cost per token does not grow
            # with the output (decoding it all was quadratic).
            longest = max(len(stop) for stop in self.params.stop)
            text = self.detokenize(self.generated_token_ids[-(STOP_TAIL_TOKENS_PER_CHAR * longest + 4):])
            if any(stop in text for stop in self.params.stop):
                return FinishReason.STOP
        if len(self.output_token_ids) >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None
