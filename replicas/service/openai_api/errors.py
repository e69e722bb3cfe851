"""OpenAI error bodies: every bad request leaves the protocol as an ApiError (status + body)."""

from __future__ import annotations

import math
from collections.abc import Sequence


class ApiError(Exception):
    """A request the server refuses; `body()` is the OpenAI error JSON, `status` the HTTP status."""

    def __init__(self, status: int, type: str, message: str, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type  # invalid_request_error, not_found_error, authentication_error, ...
        self.message = message
        self.param = param  # the offending request field, dotted ("messages.[0].content")
        self.code = code
        self.retry_after_s = retry_after_s  # 429 only: the shell sends it as Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param)


def not_found_model(model: str, available: Sequence[str]) -> ApiError:
    return ApiError(404, "not_found_error", f"model {model!r} does not exist; available: {sorted(available)}",
                    "model", "model_not_found")


def unauthorized() -> ApiError:
    return ApiError(401, "authentication_error", "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key")


def too_many_requests(retry_after_s: float) -> ApiError:
    return ApiError(429, "rate_limit_error", f"too many requests; retry after {retry_after_s:g} s",
                    code="rate_limit_exceeded", retry_after_s=retry_after_s)


def server_error(message: str) -> ApiError:
    return ApiError(500, "server_error", message)
