"""SamplingParams (validated at the edge) and the sampler that turns logits into token ids.

Greedy is argmax over float32 logits, so it is exactly reproducible. Random sampling is batched on
the logits' device: every row is warped (temperature, min_p, top-k, top-p, each a per-row tensor)
in the same few ops whatever the batch holds, and draws by inverse CDF with one uniform number per
row that the host decides with the sequence's CPU torch.Generator:

    seeded row:    reseeded with splitmix64(seed, output position), then one draw
    unseeded row:  one draw (the generator was seeded from entropy)
    token = first index whose cumulative probability (float64) exceeds u x total

The draw never runs on the device, so a seeded request draws the same tokens whatever else is in
its batch, on CPU or GPU (unless u falls within float rounding, ~1e-7, of a boundary between two
tokens, where the devices' softmax may differ in the last bit), and a request continued elsewhere
(a failover: `num_generated`) draws what it would have drawn where it started. No row reads
anything back from the device: the knobs and uniforms go down in one copy (pinned, asynchronous
on CUDA) and the tokens come back in one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from replicas.engine.models.ops import to_device

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
    """A sequence's host generator: its unseeded draws' entropy (seeded draws do not read it).
    The sampler draws from it on the host, so it belongs on the CPU whatever device computes."""
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
    frequency over the output). What the histories say is built on the host and copied down once."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    bias = torch.zeros(len(rows), vocab)
    stop = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for r, i in enumerate(rows):
        for token, b in params[i].logit_bias:
            bias[r, token] += b
        if len(histories[i].output) < params[i].min_tokens and histories[i].stop_ids:
            stop[r, list(histories[i].stop_ids)] = True
    out_counts = _counts([histories[i].output for i in rows], vocab)
    seen = (out_counts + _counts([histories[i].prompt for i in rows], vocab)) > 0
    knobs = torch.tensor([[params[i].repetition_penalty, params[i].frequency_penalty, params[i].presence_penalty]
                          for i in rows])
    index, bias, stop, out_counts, seen, knobs = (
        to_device(t, dev) for t in (torch.tensor(rows), bias, stop, out_counts, seen, knobs))
    rep, freq, pres = (knobs[:, j : j + 1] for j in range(3))
    sub = logits[index] + bias
    sub = torch.where(seen, torch.where(sub < 0, sub * rep, sub / rep), sub)
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    return logits.index_put((index,), sub.masked_fill(stop, -math.inf))


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


def uniform(p: SamplingParams, generator: torch.Generator | None, position: int) -> float:
    """The row's draw in [0, 1) from its host generator, reseeded from (seed, position) when seeded."""
    if generator is None:  # a caller without per-sequence generators
        generator = torch.Generator()
        if p.seed is None:
            generator.seed()
    if p.seed is not None:
        generator.manual_seed(position_seed(p.seed, position))
    return float(torch.rand((), dtype=torch.float64, generator=generator, device=generator.device))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: Sequence[torch.Generator | None],
           positions: Sequence[int] | None = None):
    """Token ids [B] on the CPU (and log-softmax [B, V] on the logits' device when any request wants
    logprobs) for float32 logits [B, V], and the rows that failed: {row: why}. A failure of one row
    (non-finite logits, a sampler error) is that request's alone; the other rows keep their tokens
    (a failed row's token is -1). `positions`: each row's output position (tokens it generated so
    far), which seeded rows draw at. One device->host copy, at the end."""
    logits = logits.float()
    finite = logits.amax(-1).isfinite() & logits.amin(-1).isfinite()  # as isfinite().all(-1), 15x faster on the CPU
    tokens = logits.argmax(dim=-1)
    failed: dict[int, str] = {}
    if not all(p.greedy for p in params):
        u = [0.0] * len(params)
        for i, (p, g) in enumerate(zip(params, generators)):
            try:
                u[i] = 0.0 if p.greedy else uniform(p, g, positions[i] if positions else 0)
            except Exception as exc:  # noqa: BLE001 - this request's generator, nobody else's
                failed[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        try:
            tokens = _draw(logits, finite, params, u)
        except Exception:  # noqa: BLE001 - find whose it is, row by row (syncs, but only on this path)
            tokens = tokens.clone()
            for i, p in enumerate(params):
                if p.greedy or i in failed:
                    continue
                try:
                    tokens[i] = _draw(logits[i : i + 1], finite[i : i + 1], [p], u[i : i + 1])[0]
                except Exception as exc:  # noqa: BLE001 - whatever went wrong belongs to this request alone
                    failed[i] = f"sampling failed: {type(exc).__name__}: {exc}"
    host = torch.where(finite, tokens, -1).cpu()  # the only device->host copy
    for i in (host < 0).nonzero().flatten().tolist():
        failed[i] = "the model produced non-finite logits for this request"
    for i in failed:
        host[i] = -1
    logprobs = logits.log_softmax(-1) if any(p.logprobs is not None for p in params) else None
    return host, logprobs, failed


def _draw(logits: torch.Tensor, finite: torch.Tensor, params: Sequence[SamplingParams], u: Sequence[float]):
    """Token ids [B] on the logits' device: argmax for greedy rows, an inverse-CDF draw at u for the rest."""
    knobs = to_device(_knobs(params, u), logits.device)  # the one host->device copy
    safe = torch.where(finite[:, None], logits, 0.0)  # a non-finite row fails anyway; keep it from poisoning ops
    probs = warp_rows(safe, params, knobs).softmax(-1)
    cdf = probs.double().cumsum(-1)
    target = knobs[:, _U] * cdf[:, -1]
    drawn = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=logits.shape[1] - 1)
    return torch.where(knobs[:, _GREEDY] > 0, logits.argmax(dim=-1), drawn)


_TEMPERATURE, _MIN_P, _TOP_K, _TOP_P, _U, _GREEDY = range(6)  # columns of _knobs


def _knobs(params: Sequence[SamplingParams], u: Sequence[float]) -> torch.Tensor:
    """float64 [B, 6] per-row sampling knobs on the host; neutral values where a knob is off (greedy
    rows warp at temperature 1, top_p 1 becomes 2 so that rounding in the cumsum never drops a token)."""
    return torch.tensor([[1.0 if p.greedy else p.temperature, p.min_p, p.top_k, p.top_p if p.top_p < 1.0 else 2.0,
                          x, float(p.greedy)] for p, x in zip(params, u)], dtype=torch.float64)


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's warped logits [V] (see warp_rows)."""
    return warp_rows(logits[None], [p], to_device(_knobs([p], [0.0]), logits.device))[0]


def warp_rows(logits: torch.Tensor, params: Sequence[SamplingParams], knobs: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] scaled by each row's temperature after subtracting its max (so no temperature >=
    GREEDY_BELOW overflows), then min_p, top-k and top-p as vLLM orders them (-inf = dropped). Each
    knob is a column of `knobs` (_knobs, on the logits' device); a step no row uses is skipped."""
    vocab = logits.shape[1]
    temperature, min_p, top_p = (knobs[:, j : j + 1].to(logits.dtype) for j in (_TEMPERATURE, _MIN_P, _TOP_P))
    row = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if any(p.min_p for p in params):
        probs = row.softmax(-1)
        row = row.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, -math.inf)
    max_k = min(max(p.top_k for p in params), vocab)
    if max_k:
        k = knobs[:, _TOP_K].long().clamp(max=vocab)
        top = torch.topk(row, max_k).values  # [B, max_k], descending
        kth = top.gather(1, (k.clamp(min=1) - 1)[:, None])
        row = row.masked_fill((row < kth) & (k > 0)[:, None], -math.inf)
    if any(p.top_p < 1.0 for p in params):
        sorted_logits, order = torch.sort(row, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
    return row
