"""Seeded multi-tenant workloads: who asks, when, how long a prompt and how many tokens back.

A `Workload` is a sorted tuple of `Request`s plus the generator's name, parameters and seed, so that a
result file says exactly what was replayed and `load(path)` replays it again. Invariant: requests are
sorted by `arrival_s`, which starts at or after 0; every length is >= 1. Tenants are named `t0`, `t1`,
... in decreasing Zipf popularity (`t0` is the most popular); the client maps them to model names.

Generators (all pure functions of their arguments):
  zipf_poisson  Poisson arrivals (exponential gaps) at `rate_per_s` for `duration_s`, Zipf tenants.
  gamma         Gamma gaps with mean 1/rate and coefficient of variation `cv` (shape 1/cv^2):
                cv = 1 is Poisson, cv > 1 is burstier, cv < 1 smoother.
  azure_trace   arrivals and lengths of the Azure LLM inference trace 2023 (Splitwise, ISCA'24),
                TIMESTAMP / ContextTokens / GeneratedTokens, tenants drawn by Zipf popularity.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

FORMAT_VERSION = 1  # of the JSON written by `save`


@dataclass(frozen=True)
class Request:
    arrival_s: float  # when to send it, seconds after the run starts
    tenant: str  # tenant name ("t0" is the most popular); the client maps it to a model
    prompt_len: int  # prompt length in tokens (>= 1)
    output_len: int  # tokens to generate, exactly (ignore_eos) (>= 1)


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, clipped to [1, max_len].

    fixed      always `value`
    uniform    integers in [low, high], both ends included
    lognormal  lognormal whose *mean* is `mean` tokens (not the underlying normal's mu) with log-space
               standard deviation `sigma`, rounded to the nearest integer
    """

    kind: str  # "fixed" | "uniform" | "lognormal"
    value: int = 0  # fixed: the length
    low: int = 0  # uniform: smallest length
    high: int = 0  # uniform: largest length
    mean: float = 0.0  # lognormal: mean length in tokens
    sigma: float = 0.0  # lognormal: standard deviation of log(length)
    max_len: int = 1 << 20  # every sample is clipped to [1, max_len]

    def __post_init__(self) -> None:
        problems = {
            "fixed": self.value < 1,
            "uniform": not 1 <= self.low <= self.high,
            "lognormal": self.mean <= 0 or self.sigma < 0,
        }
        if self.kind not in problems:
            raise ValueError(f"length distribution kind must be fixed, uniform or lognormal, got {self.kind!r}")
        if problems[self.kind] or self.max_len < 1:
            raise ValueError(f"bad {self.kind} length distribution: {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            xs = np.full(n, self.value)
        elif self.kind == "uniform":
            xs = rng.integers(self.low, self.high + 1, size=n)
        else:
            mu = math.log(self.mean) - self.sigma ** 2 / 2  # so that E[X] = mean
            xs = np.rint(rng.lognormal(mu, self.sigma, size=n))
        return np.clip(xs, 1, self.max_len).astype(int)

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """From a CLI spec: `fixed:N`, `uniform:LO:HI`, `lognormal:MEAN:SIGMA`, each with an optional `:MAX`."""
        kind, *nums = spec.split(":")
        arity = {"fixed": 1, "uniform": 2, "lognormal": 2}.get(kind)
        if arity is None or len(nums) not in (arity, arity + 1):
            raise ValueError(f"length spec {spec!r}: use fixed:N, uniform:LO:HI or lognormal:MEAN:SIGMA (+ :MAX)")
        try:
            extra = {"max_len": int(nums[arity])} if len(nums) > arity else {}
            if kind == "fixed":
                return cls("fixed", value=int(nums[0]), **extra)
            if kind == "uniform":
                return cls("uniform", low=int(nums[0]), high=int(nums[1]), **extra)
            return cls("lognormal", mean=float(nums[0]), sigma=float(nums[1]), **extra)
        except ValueError as exc:
            raise ValueError(f"length spec {spec!r}: {exc}") from None


@dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]  # sorted by arrival_s
    generator: str  # name of the function that built it
    params: dict[str, Any] = field(default_factory=dict)  # its arguments (JSON values), seed excluded
    seed: int = 0  # the seed it was built with

    @property
    def tenants(self) -> list[str]:
        return sorted({r.tenant for r in self.requests}, key=_tenant_order)


def tenant_name(i: int) -> str:
    return f"t{i}"


def _tenant_order(name: str) -> tuple[int, str]:
    return (int(name[1:]), "") if name[:1] == "t" and name[1:].isdigit() else (1 << 30, name)


def zipf_weights(num_tenants: int, zipf_s: float) -> np.ndarray:
    """Popularity of tenant i proportional to 1 / (i + 1)^s; s = 0 is uniform."""
    if num_tenants < 1 or zipf_s < 0:
        raise ValueError(f"need num_tenants >= 1 and zipf_s >= 0, got {num_tenants}, {zipf_s}")
    w = 1.0 / np.arange(1, num_tenants + 1) ** zipf_s
    return w / w.sum()


def _requests(rng: np.random.Generator, arrivals: np.ndarray, num_tenants: int, zipf_s: float,
              prompt_len: LengthDist, output_len: LengthDist) -> tuple[Request, ...]:
    n = len(arrivals)
    tenants = rng.choice(num_tenants, size=n, p=zipf_weights(num_tenants, zipf_s))
    prompts, outputs = prompt_len.sample(rng, n), output_len.sample(rng, n)
    return tuple(Request(float(a), tenant_name(int(t)), int(p), int(o))
                 for a, t, p, o in zip(arrivals, tenants, prompts, outputs))


def _arrivals(rng: np.random.Generator, rate_per_s: float, duration_s: float, cv: float | None) -> np.ndarray:
    """Arrival times in [0, duration_s): exponential gaps (cv None) or Gamma gaps of shape 1/cv^2."""
    if rate_per_s <= 0 or duration_s <= 0 or (cv is not None and cv <= 0):
        raise ValueError(f"need rate_per_s, duration_s (and cv) > 0, got {rate_per_s}, {duration_s}, {cv}")
    out: list[np.ndarray] = []
    t, chunk = 0.0, max(16, int(rate_per_s * duration_s * 1.2))
    while t < duration_s:  # draw gaps in chunks until past the end
        if cv is None:
            gaps = rng.exponential(1 / rate_per_s, size=chunk)
        else:
            shape = 1 / cv ** 2
            gaps = rng.gamma(shape, 1 / (rate_per_s * shape), size=chunk)
        times = t + np.cumsum(gaps)
        out.append(times)
        t = float(times[-1])
    times = np.concatenate(out)
    return times[times < duration_s]


def zipf_poisson(num_tenants: int, rate_per_s: float, duration_s: float, zipf_s: float = 1.0,
                 prompt_len: LengthDist = LengthDist("uniform", low=16, high=128),
                 output_len: LengthDist = LengthDist("fixed", value=32), seed: int = 0) -> Workload:
    """Poisson arrivals at `rate_per_s` over `duration_s`, tenants by Zipf(`zipf_s`) popularity."""
    rng = np.random.default_rng(seed)
    reqs = _requests(rng, _arrivals(rng, rate_per_s, duration_s, None), num_tenants, zipf_s, prompt_len, output_len)
    params = {"num_tenants": num_tenants, "rate_per_s": rate_per_s, "duration_s": duration_s, "zipf_s": zipf_s,
              "prompt_len": asdict(prompt_len), "output_len": asdict(output_len)}
    return Workload(reqs, "zipf_poisson", params, seed)


def gamma(num_tenants: int, rate_per_s: float, duration_s: float, cv: float = 2.0, zipf_s: float = 1.0,
          prompt_len: LengthDist = LengthDist("uniform", low=16, high=128),
          output_len: LengthDist = LengthDist("fixed", value=32), seed: int = 0) -> Workload:
    """Gamma inter-arrivals with mean 1/`rate_per_s` and burstiness `cv` (their coefficient of variation)."""
    rng = np.random.default_rng(seed)
    reqs = _requests(rng, _arrivals(rng, rate_per_s, duration_s, cv), num_tenants, zipf_s, prompt_len, output_len)
    params = {"num_tenants": num_tenants, "rate_per_s": rate_per_s, "duration_s": duration_s, "cv": cv,
              "zipf_s": zipf_s, "prompt_len": asdict(prompt_len), "output_len": asdict(output_len)}
    return Workload(reqs, "gamma", params, seed)


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch of "2023-11-16 18:17:03.9799600" (the trace has 7 fractional digits)."""
    whole, _, frac = text.strip().partition(".")
    start = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return start.timestamp() + (float("0." + frac) if frac else 0.0)


def read_azure_rows(csv_path: str | pathlib.Path, max_requests: int | None = None) -> list[tuple[float, int, int]]:
    """(timestamp_s, context_tokens, generated_tokens) of the trace, sorted by time, first `max_requests`."""
    rows = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: not an Azure LLM trace, missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((_parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                             int(row["GeneratedTokens"])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{csv_path}:{line}: bad row {row}: {exc}") from None
    rows.sort(key=lambda r: r[0])
    return rows[:max_requests] if max_requests is not None else rows


def azure_trace(csv_path: str | pathlib.Path, tenants: int, seed: int = 0, max_requests: int | None = None,
                time_scale: float = 1.0, zipf_s: float = 1.0, max_prompt_len: int | None = None,
                max_output_len: int | None = None) -> Workload:
    """The trace's arrivals and lengths; each request goes to one of `tenants` tenants by Zipf popularity.

    `time_scale` multiplies the trace's gaps (0.5 replays it twice as fast). Lengths are clipped to
    [1, max_*_len] (GeneratedTokens can be 0; tiny models have short contexts)."""
    if tenants < 1 or time_scale <= 0 or (max_requests is not None and max_requests < 1):
        raise ValueError(f"need tenants >= 1, time_scale > 0, max_requests >= 1: {tenants}, {time_scale}, "
                         f"{max_requests}")
    rows = read_azure_rows(csv_path, max_requests)
    rng = np.random.default_rng(seed)
    who = rng.choice(tenants, size=len(rows), p=zipf_weights(tenants, zipf_s))
    t0 = rows[0][0] if rows else 0.0
    big = 1 << 30
    reqs = tuple(Request((ts - t0) * time_scale, tenant_name(int(t)), min(max(ctx, 1), max_prompt_len or big),
                         min(max(gen, 1), max_output_len or big)) for (ts, ctx, gen), t in zip(rows, who))
    params = {"csv_path": str(csv_path), "tenants": tenants, "max_requests": max_requests, "time_scale": time_scale,
              "zipf_s": zipf_s, "max_prompt_len": max_prompt_len, "max_output_len": max_output_len}
    return Workload(reqs, "azure_trace", params, seed)


def to_json(workload: Workload) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "generator": workload.generator, "params": workload.params,
            "seed": workload.seed, "requests": [asdict(r) for r in workload.requests]}


def from_json(data: dict[str, Any]) -> Workload:
    """A workload from `to_json` output, or from a bench result file that embeds one under "workload"."""
    data = data.get("workload", data)
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"not a workload (format {data.get('format')!r}, expected {FORMAT_VERSION})")
    reqs = tuple(Request(float(r["arrival_s"]), str(r["tenant"]), int(r["prompt_len"]), int(r["output_len"]))
                 for r in data["requests"])
    return Workload(reqs, data["generator"], dict(data["params"]), int(data["seed"]))


def save(workload: Workload, path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(workload), indent=1))


def load(path: str | pathlib.Path) -> Workload:
    return from_json(json.loads(pathlib.Path(path).read_text()))


def tenant_counts(requests: Sequence[Request]) -> dict[str, int]:
    """Requests per tenant, most popular tenant first."""
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.tenant] = counts.get(r.tenant, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: _tenant_order(kv[0])))
