"""The gRPC API through Ray Serve's gRPC proxy: same outputs as HTTP, errors as status codes."""

from __future__ import annotations

import grpc
import pytest

from replicas.service.grpc import oneiros_pb2 as pb
from replicas.service.grpc import oneiros_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def stub(cluster):
    config, _ = cluster
    channel = grpc.insecure_channel(f"127.0.0.1:{config.http.grpc_port}")
    yield pb_grpc.OneirosLLMStub(channel), (("application", config.app_name),)
    channel.close()


def greedy(n: int) -> pb.Sampling:
    return pb.Sampling(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_grpc_completion_equals_http_and_streams_the_same_text(cluster, stub):
    config, base = cluster
    client, md = stub
    request = pb.CompletionRequest(model="opt", prompt_token_ids=[5, 17, 33, 9], sampling=greedy(12))
    whole = client.Completions(request, metadata=md, timeout=60)
    chunks = list(client.CompletionsStream(request, metadata=md, timeout=60))
    http = openai.OpenAI(base_url=base, api_key="x", max_retries=0).completions.create(
        model="opt", prompt=[5, 17, 33, 9], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert whole.text == "".join(c.text for c in chunks) == http.choices[0].text
    assert list(whole.token_ids) == [t for c in chunks for t in c.token_ids] and len(whole.token_ids) == 12
    assert whole.usage.completion_tokens == 12 and chunks[-1].finish_reason == "length"
    assert whole.replica_id and http.system_fingerprint.startswith("oneiros-")  # either host may serve


def test_grpc_chat_and_models(cluster, stub):
    client, md = stub
    chat = client.ChatCompletions(pb.ChatRequest(model="qwen", messages=[pb.ChatMessage(role="user", content="hi")],
                                                 sampling=greedy(6)), metadata=md, timeout=60)
    assert chat.usage.completion_tokens == 6
    assert list(client.Models(pb.ModelsRequest(), metadata=md, timeout=30).models) == ["llama", "qwen", "opt"]


@pytest.mark.parametrize("request_, code", [
    (pb.CompletionRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
    (pb.CompletionRequest(model="llama", prompt_token_ids=[999]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.CompletionRequest(model="llama", prompt="x", sampling=pb.Sampling(top_p=2.0)), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_grpc_errors_are_status_codes_with_the_openai_message(stub, request_, code):
    client, md = stub
    with pytest.raises(grpc.RpcError) as info:
        client.Completions(request_, metadata=md, timeout=30)
    assert info.value.code() == code and info.value.details()
