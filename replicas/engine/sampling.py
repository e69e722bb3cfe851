"""SamplingParams (validated at the edge) and the sampler that turns logits into token ids.

Greedy is argmax over float32 logits, so it is exactly reproducible. Random sampling uses one torch
Generator per sequence. A seeded request reseeds it before each draw from its seed and the token's
position in its output, so it draws the same tokens whatever else is in its batch, and a request
continued elsewhere (a failover: `num_generated`) draws what it would have drawn where it started.
An unseeded request's generator starts from fresh entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


GREEDY_BELOW = 1e-5  # temperature under which sampling is greedy


class InvalidRequest(ValueError):
    """Bad user input for one request; the edge turns it into a 4xx, nothing else is affected."""


# The fields a model's generation_config.json may default for requests that leave them unset (as vLLM does)
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


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
    include_stop_str_in_output: bool = False  # the edge keeps the stop string in the text (the engine stops either way)
    logprobs: int | None = None  # return the top-N logprobs of each generated token (0 = the chosen only)
    min_tokens: int = 0  # eos and stop ids are masked, and stop strings not checked, until this many
    repetition_penalty: float = 1.0  # > 0; logits of tokens in prompt or output: / p if > 0, else * p
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted from the logits of tokens in the output
    frequency_penalty: float = 0.0  # in [-2, 2]; times each token's count in the output, subtracted
    min_p: float = 0.0  # in [0, 1]; drop tokens less likely than min_p x the most likely (sampling only)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits
    # A continuation (failover): the prompt's last num_generated tokens are this request's own output
    # from before it moved. Penalties, min_tokens and stop strings count them as output, seeded draws
    # go on at their position; max_tokens is what is left to generate.
    num_generated: int = 0
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
        _check(isinstance(self.num_generated, int) and self.num_generated >= 0,
               f"num_generated must be an integer >= 0, got {self.num_generated}")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens + self.num_generated,
               f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        r = self.repetition_penalty
        _check(isinstance(r, (int, float)) and math.isfinite(r) and r > 0, f"repetition_penalty must be > 0, got {r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v}")
        m = self.min_p
        _check(isinstance(m, (int, float)) and 0 <= m <= 1, f"min_p must be in [0, 1], got {m}")
        bias = tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items())
        _check(all(-100 <= b <= 100 for _, b in bias), "logit_bias values must be in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties, a bias or min_tokens change the logits before sampling."""
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens)

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


@dataclass(frozen=True)
class History:
    """What a row's logit adjustments read: the request's tokens so far and what ends it."""
    prompt: list[int]
    output: list[int]
    stop_ids: tuple[int, ...]  # eos (unless ignore_eos) and stop_token_ids: masked before min_tokens


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> torch.Tensor:
    """float32 logits [B, V] with logit_bias, min_tokens, repetition, presence and frequency penalties
    applied, batched over the rows (vLLM's semantics: repetition over prompt and output, presence and
    frequency over the output)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    sub = logits[rows]
    bias = torch.zeros_like(sub)
    for r, i in enumerate(rows):
        for token, b in params[i].logit_bias:
            bias[r, token] += b
    sub += bias
    out_counts = _counts([histories[i].output for i in rows], vocab)
    seen = (out_counts + _counts([histories[i].prompt for i in rows], vocab)) > 0
    rep = torch.tensor([params[i].repetition_penalty for i in rows], dtype=sub.dtype).unsqueeze(1)
    sub = torch.where(seen, torch.where(sub < 0, sub * rep, sub / rep), sub)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], dtype=sub.dtype).unsqueeze(1)
    pres = torch.tensor([params[i].presence_penalty for i in rows], dtype=sub.dtype).unsqueeze(1)
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    for r, i in enumerate(rows):
        if len(histories[i].output) < params[i].min_tokens and histories[i].stop_ids:
            sub[r, list(histories[i].stop_ids)] = -math.inf
    logits[rows] = sub
    return logits


def _counts(token_lists: list[list[int]], vocab: int) -> torch.Tensor:
    """[rows, vocab] float counts of each token id in each list (one scatter over padded ids)."""
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), width + 1), vocab, dtype=torch.long)  # column `vocab`: padding
    for r, tokens in enumerate(token_lists):
        ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    counts = torch.zeros(len(token_lists), vocab + 1).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def position_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw at output `position` (splitmix64 of both)."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           positions: list[int] | None = None):
    """Token ids [B] (and log-softmax [B, V] when any request wants logprobs) for float32 logits [B, V],
    and the rows that failed: {row: why}. A failure of one row (non-finite logits, a sampler error)
    is that request's alone; the other rows keep their tokens. `positions`: each row's output position
    (tokens it generated so far), which seeded rows draw at."""
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
            if p.seed is not None and generators[i] is not None:
                generators[i].manual_seed(position_seed(p.seed, positions[i] if positions else 0))
            tokens[i] = _sample_row(logits[i], p, generators[i])
        except Exception as exc:  # noqa: BLE001 - whatever went wrong belongs to this request alone
            failed[i] = f"sampling failed: {type(exc).__name__}: {exc}"
    logprobs = logits.log_softmax(-1) if any(p.logprobs is not None for p in params) else None
    return tokens, logprobs, failed


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from finite float32 logits [V]: warped, then a draw from the row's generator."""
    return int(torch.multinomial(warp(logits, p).softmax(-1), 1, generator=generator).item())


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Logits [V] scaled by the temperature after subtracting the max (so no temperature >=
    GREEDY_BELOW overflows), then min_p, top-k and top-p as vLLM orders them (-inf = dropped)."""
    row = (logits - logits.max()) / p.temperature
    if p.min_p:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return row
