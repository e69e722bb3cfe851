"""EngineServer without Ray: concurrent streams, cancellation, overload, orders, reports."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from cluster.messages import ReplicaOrders
from replicas.config import default_config
from replicas.engine.sampling import SamplingParams
from replicas.service.server import EngineServer
from replicas.service.stream import StreamItem

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server():
    srv = EngineServer(default_config(), replica_id="r0", models=["llama", "qwen"])
    yield srv
    srv.close()


async def collect(server, model, prompt, params=GREEDY):
    items = [item async for item in server.generate(model, prompt, params)]
    return items


def test_concurrent_streams_match_the_engine_run_alone(server):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]

    async def main():
        return await asyncio.gather(*(collect(server, m, p) for m in ("llama", "qwen") for p in prompts))

    results = asyncio.run(main())
    # the reference runs on the vmm backend: the same tokens whichever backend holds the bytes
    alone = EngineServer(default_config(memory={"num_pages": 64, "backend": "vmm"}), replica_id="alone",
                         models=["llama", "qwen"])
    assert type(alone.engine.memory.backend).__name__ == "HostVmmBackend"
    for (model, prompt), items in zip([(m, p) for m in ("llama", "qwen") for p in prompts], results):
        tokens = [t for item in items for t in item.token_ids]
        assert tokens == alone.call(alone.engine.generate, model, [prompt], GREEDY)[0]
        assert items[-1].finished and items[-1].finish_reason == "length"
    alone.close()


def test_a_cancelled_stream_frees_its_pages(server):
    async def main():
        free = server.engine.memory.pool.num_free
        stream = server.generate("llama", [5] * 300, SamplingParams(max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        assert server.engine.memory.pool.num_free < free
        await stream.aclose()  # what Serve does when the client disconnects
        await asyncio.sleep(0.05)
        return free

    free = asyncio.run(main())
    assert not server.call(server.engine.has_unfinished)
    assert server.engine.memory.pool.num_free == free  # every page back
    server.call(server.engine.memory.check_integrity)


def test_bad_and_unknown_requests_get_error_items(server):
    async def main():
        bad = await collect(server, "llama", [10_000])
        unknown = await collect(server, "nope", [1, 2])
        return bad, unknown

    bad, unknown = asyncio.run(main())
    assert bad == [StreamItem.refused(400, bad[0].refusal.message, replica_id="r0")]
    assert "outside the vocabulary" in bad[0].refusal.message
    assert unknown[0].refusal.status == 404


def test_over_capacity_gets_429_with_retry_after():
    config = default_config(replicas={"num_replicas": 1, "max_pending_requests": 1})
    srv = EngineServer(config, replica_id="small", models=["llama"])

    async def main():
        first = srv.generate("llama", [5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
        await first.__anext__()
        second = await collect(srv, "llama", [5, 6])
        await first.aclose()
        return second

    second = asyncio.run(main())
    assert second[0].refusal.status == 429 and second[0].refusal.retry_after_s > 0
    srv.close()


def test_orders_load_models_and_set_hints_and_old_versions_are_ignored(server):
    async def main():
        await server.apply_orders(ReplicaOrders("r0", version=5, cold=frozenset({"llama"}), load=frozenset({"opt"})))
        await server.apply_orders(ReplicaOrders("r0", version=4, load=frozenset({"nope"})))  # stale: ignored

    asyncio.run(main())
    assert server.models == ["llama", "opt", "qwen"]
    report = server.report()
    assert report.replica_id == "r0" and {t.model for t in report.tenants} == {"llama", "opt", "qwen"}
    assert report.free_pages + report.reclaimable_pages > 0


def test_a_request_for_a_model_that_fits_only_later_waits_for_room_instead_of_a_503():
    """"llama" is busy with a request that may need every KV page it can get, so loading "qwen"
    (whose embeddings and kept layers would stay) must wait: the request for it waits
    (replicas.placement_timeout_s) and is served, exactly, once llama's request ends."""
    probe = EngineServer(default_config(memory={"num_pages": 256}), replica_id="probe", models=["llama"])
    capacity = probe.engine.capacity()
    overhead = capacity.num_pages - capacity.kv_pages_for("llama")  # its fixed pages and staging slots
    long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)  # a second or more of decoding
    kv = probe.engine.memory.kv["llama"].num_blocks_for(20 + long.max_tokens)  # within its context of 1024
    srv = EngineServer(default_config(memory={"num_pages": overhead + kv}), replica_id="r1", models=["llama"])

    async def main():
        busy = srv.generate("llama", [5] * 20, long)
        first = await busy.__anext__()
        assert first.refusal is None  # running
        waiting = asyncio.ensure_future(collect(srv, "qwen", [5, 6, 7]))
        await asyncio.sleep(0.3)
        assert "qwen" not in srv.models and not waiting.done()  # no room yet: it waits, no 503
        items = [first] + [item async for item in busy]
        return items, await waiting

    items, got = asyncio.run(main())
    assert items[-1].finished and items[-1].refusal is None
    assert all(item.refusal is None for item in got), got
    alone = EngineServer(default_config(memory={"num_pages": 256}), replica_id="alone", models=["qwen"])
    assert [t for item in got for t in item.token_ids] == alone.call(alone.engine.generate, "qwen", [[5, 6, 7]], GREEDY)[0]
    assert srv.engine.memory.params.remapped_layers("llama")  # llama lent layers for qwen's load
    srv.call(srv.engine.memory.check_integrity)
    for s in (probe, srv, alone):
        s.close()


def test_one_requests_failure_never_touches_another_stream_on_the_replica(server):
    """The report that opened issue 12: a temperature of 1e-39 beside a long stream (now greedy),
    and a request whose own step fails: the stream ends with exactly its tokens alone."""
    long = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    alone = server.call(server.engine.generate, "llama", [[5, 6, 7, 8]], long)[0]
    real = server.engine.executor.execute

    def execute(output, seqs, ring):  # qwen's batch fails inside the model, once
        if output.model == "qwen":
            server.engine.executor.execute = real
            raise RuntimeError("forced failure of qwen's step")
        return real(output, seqs, ring)

    async def main():
        stream = asyncio.ensure_future(collect(server, "llama", [5, 6, 7, 8], long))
        await asyncio.sleep(0.05)
        tiny = await collect(server, "llama", [9, 10], SamplingParams(max_tokens=8, temperature=1e-39))
        server.engine.executor.execute = execute
        failed = await collect(server, "qwen", [9, 10])
        return await stream, tiny, failed

    streamed, tiny, failed = asyncio.run(main())
    assert [t for item in streamed for t in item.token_ids] == alone and streamed[-1].finish_reason == "length"
    assert [t for item in tiny for t in item.token_ids] == server.call(server.engine.generate, "llama", [[9, 10]], GREEDY)[0]
    assert failed[-1].failed and "forced failure" in failed[-1].error_message
    assert not server.call(server.engine.has_unfinished)
    server.call(server.engine.memory.check_integrity)


def test_each_step_reaches_the_event_loop_in_one_handoff(server):
    """The engine thread steps on its own and hands a step's outputs to the loop in one call, however
    many streams the step fed; every stream still gets every token."""
    steps, handoffs = [], []
    real_step, real_deliver = server.engine.step, server._worker._deliver

    def step():
        out = real_step()
        steps.append(len(out))
        return out

    def deliver(outputs):
        handoffs.append(len(outputs))
        real_deliver(outputs)

    server.engine.step, server._worker._deliver = step, deliver
    try:
        async def main():
            return await asyncio.gather(*(collect(server, "llama", [5 + i, 6, 7]) for i in range(6)))
        got = asyncio.run(main())
    finally:
        server.engine.step, server._worker._deliver = real_step, real_deliver
    assert all(sum(len(item.token_ids) for item in items) == 8 for items in got)
    assert handoffs == [n for n in steps if n] and max(handoffs) > 1  # batched steps, one handoff each


@pytest.mark.skipif(sys.platform != "linux", reason="niceness is per thread on Linux only")
def test_the_engine_thread_runs_below_its_process_so_the_event_loops_take_a_core_first(server):
    from replicas.service.server import ENGINE_THREAD_NICENESS

    process = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    engine = os.getpriority(os.PRIO_PROCESS, server._worker._thread.native_id)
    assert engine == min(19, process + ENGINE_THREAD_NICENESS)


def test_a_step_that_raises_fails_the_streams_in_flight_and_the_replica_goes_on(server):
    """Outside any one batch (a bug in the step itself): the streams in flight end with an error item,
    their pages come back, and the next request is served as before."""
    real_step = server.engine.step

    def step():
        server.engine.step = real_step
        raise RuntimeError("forced failure of the whole step")

    async def main():
        stream = asyncio.ensure_future(collect(server, "llama", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0.05)
        server.engine.step = step
        return await stream

    failed = asyncio.run(main())
    assert failed[-1].failed and failed[-1].finish_reason == "error"
    assert not server.call(server.engine.has_unfinished)
    server.call(server.engine.memory.check_integrity)
    again = asyncio.run(collect(server, "llama", [5, 6, 7]))
    assert [t for item in again for t in item.token_ids] == server.call(server.engine.generate, "llama", [[5, 6, 7]], GREEDY)[0]


def test_under_load_a_streams_tokens_go_out_two_steps_per_message_and_the_first_at_once():
    """Above stream_batch_above streams in flight, each message after the first carries two steps'
    tokens (one message through Serve, the ingress and HTTP instead of two); the tokens are the same."""
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    prompts = [[5 + i, 6, 7] for i in range(4)]
    batched = EngineServer(default_config(replicas={"stream_batch_above": 2, "stream_batch_ms": 5000}),
                           replica_id="b", models=["llama"])
    try:
        async def main():
            return await asyncio.gather(*(collect(batched, "llama", p, params) for p in prompts))
        got = asyncio.run(main())
        want = batched.call(batched.engine.generate, "llama", prompts, params)
    finally:
        batched.close()
    for items, tokens in zip(got, want):
        assert [t for item in items for t in item.token_ids] == tokens
        sizes = [len(item.token_ids) for item in items]
        assert sizes[0] == 1 and all(n >= 2 for n in sizes[1:-1]) and len(items) <= 5, sizes


def test_a_held_stream_waits_for_the_next_step_only_so_long():
    from replicas.service.server import _next_step

    async def main():
        queue = asyncio.Queue()
        assert await _next_step(queue, 0.01) == []  # no step came: what it has goes out
        asyncio.get_running_loop().call_later(0.01, queue.put_nowait, "step")
        return await _next_step(queue, 5.0)

    assert asyncio.run(main()) == ["step"]
