"""SamplingParams (validated at the edge) and the sampler that turns logits into token ids.

Greedy is argmax over float32 logits, so it is exactly reproducible. Random sampling uses one torch
Generator per sequence, seeded from the request's seed (or a fresh one), so a seeded request draws
the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


GREEDY_BELOW = 1e-5  # temperature under which sampling is greedy


class InvalidRequest(ValueError):
    """Bad user input for one request; the edge turns it into a 4xx, nothing else is affected."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate, >= 1
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus mass, (0, 1]
    seed: int | None = None  # per-request generator seed; None = nondeterministic
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized output (needs a detokenizer)
    ignore_eos: bool = False  # keep going past the model's eos token
    logprobs: int | None = None  # return the top-N logprobs of each generated token (0 = the chosen only)
    extra: dict = field(default_factory=dict, compare=False)  # unknown fields, kept for the edge

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        t = self.temperature
        _check(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0,
               f"temperature must be a finite number >= 0, got {t}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}")
        p = self.top_p
        _check(isinstance(p, (int, float)) and math.isfinite(p) and 0 < p <= 1, f"top_p must be in (0, 1], got {p}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be an integer in [0, 20], got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW sample greedily (vLLM's rule): dividing by them
        overflows float32 and the distribution is a point mass anyway."""
        return self.temperature < GREEDY_BELOW


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(message)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]):
    """Token ids [B] (and log-softmax [B, V] when any request wants logprobs) for float32 logits [B, V],
    and the rows that failed: {row: why}. A failure of one row (non-finite logits, a sampler error)
    is that request's alone; the other rows keep their tokens."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    failed: dict[int, str] = {}
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    for i, p in enumerate(params):
        if not finite[i]:
            failed[i] = "the model produced non-finite logits for this request"
            continue
        if p.greedy:
            continue
        try:
            tokens[i] = _sample_row(logits[i], p, generators[i])
        except Exception as exc:  # noqa: BLE001 - whatever went wrong belongs to this request alone
            failed[i] = f"sampling failed: {type(exc).__name__}: {exc}"
    logprobs = logits.log_softmax(-1) if any(p.logprobs is not None for p in params) else None
    return tokens, logprobs, failed


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from finite float32 logits [V]: scaled after subtracting the max, so no temperature
    >= GREEDY_BELOW can overflow, then top-k, top-p and a draw from the row's generator."""
    row = (logits - logits.max()) / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    probs = row.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
