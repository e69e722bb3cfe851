"""The published OpenAPI document is enough for a fuzzer: schemathesis generates bodies for every
operation from /openapi.json alone, in its positive and negative modes, against the real server.
No answer is a 5xx, every answer conforms to the schema (status, content type, body), and after it
the server still answers a greedy request exactly."""

from __future__ import annotations

import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.ray.test_serve import client, direct_text  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 25


def test_a_fuzzer_finds_no_5xx_and_no_answer_outside_the_schema(cluster):
    config, base = cluster
    root = base.removesuffix("/v1")
    schema = schemathesis.openapi.from_url(f"{root}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    for op in operations:
        assert op.method.upper() == "GET" or op.definition.raw["requestBody"]["content"]["application/json"]["schema"]
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:  # a GET without parameters has no negative input

            @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                case.call_and_validate(base_url=root, checks=CHECKS, timeout=60)

            check()
    with urllib.request.urlopen(f"{root}/health", timeout=10) as r:
        assert r.status == 200
    prompt = [5, 17, 33, 9, 70, 11, 4]
    got = client(base).completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert got.choices[0].text == direct_text(config, "llama", prompt, 12)
