"""What a replica streams to the fronts (HTTP and gRPC): typed items, pickled across Ray.

A request's stream is either one `StreamItem` carrying a `Refusal` (the request never started: bad
input, unknown model, overload, no room to load its model) or items of new tokens, the last one
`finished`. A request the engine failed ends with `finish_reason == "error"` and `error_message`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a replica did not start a request; `status` is the HTTP status the fronts answer with."""

    status: int
    message: str
    retry_after_s: float | None = None
    code: str | None = None  # model_not_loaded | model_not_here | model_too_large (placement)
    replica_id: str | None = None


@dataclass(frozen=True)
class StreamItem:
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[dict[int, float], ...] = ()  # one {token id: logprob} per new token, when asked for
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error, with `finished`
    error_message: str | None = None  # why, with finish_reason "error"
    replica_id: str = "local"
    refusal: Refusal | None = None
    # on a request's first token item: (stage, time.time()) where the replica saw it (docs/latency.md)
    stamps: tuple[tuple[str, float], ...] = ()

    @classmethod
    def refused(cls, status: int, message: str, retry_after_s: float | None = None, code: str | None = None,
                replica_id: str = "local") -> StreamItem:
        return cls(finished=True, replica_id=replica_id,
                   refusal=Refusal(status, message, retry_after_s, code, replica_id))

    @property
    def failed(self) -> bool:
        return self.finish_reason == "error"
