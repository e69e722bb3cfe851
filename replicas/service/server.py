"""EngineServer: one replica's engine behind an async interface. Plain Python, no Ray.

The synchronous `LLMEngine` is touched by exactly one thread (`EngineThread`), so request
submission, aborts and steps never race. That thread runs the calls posted to it between steps
and, while there is work, steps back to back without waiting for the event loop; each step's
outputs reach the event loop in one thread-safe call (one wake per step, not one per token). When
idle it ticks slowly so the remap controller can revert lent pages.

    generate(model, prompt_ids, params) -> async iterator of StreamItem (replicas/service/stream.py):
    new tokens, the last one finished, or a single refused item for a bad or refused request.
    Cancelling the iterator (client gone) aborts the request and frees its pages.

The Ray Serve deployment (replicas/service/deployments.py) subclasses this and adds reporting to the
cluster controller; tests drive it directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue as queue_mod
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from cluster.messages import ReplicaOrders, ReplicaReport, TenantReport
from remap import DeviceMemory, RemapError, SeqId, make_backend
from replicas.config import ModelSpec, OneirosConfig, TINY_MODELS
from replicas.engine import heap
from replicas.engine.capacity import LoadRefused
from replicas.engine.engine import EngineConfig, LLMEngine, RequestOutput
from replicas.engine.models import ModelConfig, dummy_weights, load_hf_folder
from replicas.engine.sampling import InvalidRequest, SamplingParams
from replicas.engine.tokenizer import Tokenizer
from replicas.service.stream import StreamItem
from replicas.service.telemetry import read_device

logger = logging.getLogger(__name__)

IDLE_TICK_S = 0.25  # step period while idle: lets the controller give lent pages back
HEAP_TRIM_IDLE_S = 2.0  # an engine idle this long gives its host heap's free memory back (engine/heap.py)
QUEUE_WAIT_TIMEOUT_S = 600.0  # a request that sees no token for this long is a hung engine
PLACEMENT_POLL_S = 0.25  # a request waiting for its model to fit retries the load this often
FAILED_LOAD_MEMORY_S = 30.0  # a failed load order is reported this long (the controller places it elsewhere)


def load_model(spec: ModelSpec) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, weights and tokenizer of one catalog entry (a local folder, or random weights)."""
    if spec.path is not None:
        config, state = load_hf_folder(spec.path)
        return config, state, spec.tokenizer()
    hf = spec.hf_config if spec.hf_config is not None else TINY_MODELS[spec.architecture]
    config = ModelConfig.from_hf(hf)
    return config, dummy_weights(config, spec.seed, std=spec.weight_std), spec.tokenizer()


# On the CPU the engine thread computes; the event loops beside it (this process's, and on a shared
# host the ingress's and the clients') only pass requests and tokens on, in short bursts. The engine
# thread runs this much below its process's priority, so that a woken loop takes a core at once
# instead of waiting out the step's time slice. Measured in docs/latency.md.
ENGINE_THREAD_NICENESS = 5


def lower_this_threads_priority(by: int) -> None:
    """Raise the calling thread's niceness by `by` (at most to 19). Linux only, where niceness is per
    thread; elsewhere nothing changes. Lowering one's own priority needs no privilege."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as exc:  # a sandbox that forbids it: run as is
        logger.warning("could not lower the engine thread's priority: %s", exc)


class EngineThread:
    """The one thread that touches an engine, which it builds with `make_engine`.

    `submit(fn, *args)` posts a call and returns a concurrent Future; calls run in order, between
    steps. While `engine.has_unfinished()` the thread steps back to back and hands each step's
    outputs to `deliver` (called on this thread: it must only pass them on). A step that raises goes
    to `failed`, and the thread goes on. Idle, it waits up to `idle_tick_s` for a call, then runs an
    idle step (the remap controller may give lent pages back); idle for HEAP_TRIM_IDLE_S, it trims the
    host heap once (heap.trim), so what a burst's steps kept goes back until the next burst."""

    def __init__(self, name: str, make_engine: Callable[[], LLMEngine], idle_tick_s: float,
                 deliver: Callable[[list[RequestOutput]], None], failed: Callable[[BaseException], None]) -> None:
        self._inbox: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._idle_tick_s, self._deliver, self._failed = idle_tick_s, deliver, failed
        self._closed = False
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(make_engine, started), name=name, daemon=True)
        self._thread.start()
        self.engine: LLMEngine = started.result()  # what make_engine raised, raised here

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the engine thread is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((future, fn, args))
        return future

    def close(self, last: Callable[[], Any]) -> None:
        """Run `last` on the thread (the engine's close), then stop it."""
        done = self.submit(last)
        self._closed = True
        self._inbox.put(None)
        done.result()
        self._thread.join(timeout=30)

    def _main(self, make_engine: Callable[[], LLMEngine], started: concurrent.futures.Future) -> None:
        try:
            self.engine = make_engine()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(self.engine)
        if self.engine.memory.device.type == "cpu":  # on a GPU it feeds the device: it keeps its priority
            lower_this_threads_priority(ENGINE_THREAD_NICENESS)
        busy_at, trimmed = time.monotonic(), False
        while True:
            busy = self.engine.has_unfinished()
            if busy:
                busy_at, trimmed = time.monotonic(), False
            elif not trimmed and time.monotonic() - busy_at >= HEAP_TRIM_IDLE_S:
                heap.trim()
                trimmed = True
            ran = 0
            while True:  # every call posted so far runs before the next step; idle, wait for one
                try:
                    item = self._inbox.get_nowait() if busy or ran else self._inbox.get(timeout=self._idle_tick_s)
                except queue_mod.Empty:
                    break
                if item is None:
                    return
                _call(*item)
                ran += 1
            if ran and not busy:
                continue  # a call may have added work: look again before an idle step
            self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug, not bad input: the server fails the requests in flight
            self._failed(exc)
            return
        if outputs:
            self._deliver(outputs)
        elif self.engine.has_unfinished():
            time.sleep(0.001)  # nothing could run this step (all waiting on memory): do not spin


def _call(future: concurrent.futures.Future, fn: Callable, args: tuple) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # the submitter's to handle
        future.set_exception(exc)


async def _next_step(queue: asyncio.Queue, within_s: float) -> list[RequestOutput]:
    """The stream's next step's output if it comes within `within_s` (a preempted or waiting stream
    does not hold back the tokens it has), else nothing."""
    try:
        async with asyncio.timeout(within_s):
            return [await queue.get()]
    except TimeoutError:
        return []


class EngineServer:
    def __init__(self, config: OneirosConfig, replica_id: str = "local", node_id: str = "local",
                 models: list[str] | None = None) -> None:
        self.config, self.replica_id, self.node_id = config, replica_id, node_id
        mem = config.memory
        self._queues: dict[SeqId, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._worker = EngineThread(f"engine-{replica_id}", self._make_engine, IDLE_TICK_S, self._deliver,
                                    self._step_failed)
        self.engine: LLMEngine = self._worker.engine
        self.tokenizers: dict[str, Tokenizer] = {}
        self._orders_version = -1
        self.num_aborted = 0  # requests whose consumer went away before the end
        self.last_orders: ReplicaOrders | None = None
        self._failed_loads: dict[str, tuple[float, str]] = {}  # model -> (monotonic time, why) of a failed load order
        for name in models if models is not None else [m.name for m in config.models]:
            self.call(self._load, name)
        logger.info("replica %s: %d pages x %d B on %s, models %s", replica_id, mem.num_pages,
                    mem.page_size_bytes, mem.device, sorted(self.tokenizers))

    def _make_engine(self) -> LLMEngine:
        mem = self.config.memory
        backend = make_backend(mem.backend, mem.num_pages, mem.page_size_bytes, mem.device)
        memory = DeviceMemory(mem.num_pages, mem.page_size_bytes, device=mem.device, backend=backend)
        return LLMEngine(memory, EngineConfig(self.config.scheduler.to_engine(), self.config.remap.to_engine()))

    def _load(self, name: str) -> None:
        """Host one more model (runs on the engine thread)."""
        if name in self.tokenizers:
            return
        spec = self.config.model(name)
        if spec is None:
            raise InvalidRequest(f"unknown model {name!r}")
        model_config, state, tokenizer = load_model(spec)
        self.engine.add_model(name, model_config, state, tokenizer=tokenizer, max_model_len=spec.max_model_len)
        self.tokenizers[name] = tokenizer
        logger.info("replica %s now hosts %s", self.replica_id, name)

    @property
    def models(self) -> list[str]:
        return sorted(self.tokenizers)

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams,
                       avoid: tuple[str, ...] = ()) -> AsyncIterator[StreamItem]:
        """`avoid`: replicas that said they can never load `model`; read by the router, not here."""
        received = time.time()
        if len(self._queues) >= self.config.replicas.max_pending_requests:
            yield self._refused(429, f"replica {self.replica_id} has {len(self._queues)} unfinished requests", 1.0)
            return
        if model not in self.tokenizers:
            if self.config.model(model) is None:
                yield self._refused(404, f"The model '{model}' does not exist")
                return
            refused = await self._load_on_demand(model)  # the router found no host
            if refused is not None:
                yield refused
                return
        loop, queue, added_at = asyncio.get_running_loop(), asyncio.Queue(), []

        def add() -> SeqId:  # on the engine thread: the stream exists before the step that feeds it
            seq_id = self.engine.add_request(model, prompt_ids, params)
            self._queues[seq_id] = (loop, queue)
            added_at.append(time.time())
            return seq_id

        added = self._worker.submit(add)
        try:
            seq_id = await asyncio.wrap_future(added)
        except InvalidRequest as exc:
            yield self._refused(400, str(exc))
            return
        except asyncio.CancelledError:  # gone while being added: a request already added is aborted
            added.add_done_callback(self._abort_orphan)
            raise
        finished = False
        hold_s, busy = self.config.replicas.stream_batch_ms / 1000, self.config.replicas.stream_batch_above
        try:
            while not finished:
                async with asyncio.timeout(QUEUE_WAIT_TIMEOUT_S):  # no task per item, as wait_for makes one
                    outs = [await queue.get()]
                while not queue.empty():  # a slow consumer gets several steps in one item: fewer messages
                    outs.append(queue.get_nowait())
                if hold_s and added_at is None and len(outs) == 1 and not outs[0].finished and len(self._queues) > busy:
                    outs += await _next_step(queue, hold_s)  # under load: two steps' tokens in one message
                finished = outs[-1].finished
                stamps = (() if added_at is None else
                          (("replica_received", received), ("engine_added", added_at[0]), ("replica_first_token", time.time())))
                added_at = None  # stamps go with the first item only
                yield StreamItem(tuple(t for o in outs for t in o.new_token_ids),
                                 tuple(dict(lp) for o in outs for lp in o.logprobs), finished,
                                 outs[-1].finish_reason, outs[-1].error, self.replica_id, stamps=stamps)
        finally:
            self._queues.pop(seq_id, None)
            if not finished:  # cancelled (client gone) or failed: free its pages now
                self.num_aborted += 1
                await self._run(self.engine.abort, seq_id)

    def _abort_orphan(self, added: concurrent.futures.Future) -> None:
        if not added.cancelled() and added.exception() is None:
            self._queues.pop(added.result(), None)
            self._worker.submit(self.engine.abort, added.result())

    def _refused(self, status: int, message: str, retry_after_s: float | None = None,
                 code: str | None = None) -> StreamItem:
        return StreamItem.refused(status, message, retry_after_s, code, self.replica_id)

    async def _load_on_demand(self, model: str) -> StreamItem | None:
        """Load `model` here, waiting up to placement_timeout_s for room (idle tenants lend layers at
        once; KV of requests in flight frees as they end). An error item (503) if it never fits
        here or the wait runs out, else None."""
        timeout_s = self.config.replicas.placement_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self._run(self._load, model)
                return None
            except RemapError as exc:  # LoadRefused, or no contiguous run on the arena
                permanent = isinstance(exc, LoadRefused) and exc.permanent
                if permanent or time.monotonic() >= deadline:  # the ingress may ask another replica
                    waited = "" if permanent else f" (waited {timeout_s:g} s for room)"
                    code = "model_not_here" if permanent else "model_not_loaded"
                    if isinstance(exc, LoadRefused) and exc.too_large:
                        code = "model_too_large"
                    return self._refused(503, f"model {model!r} cannot be loaded on replica {self.replica_id}: "
                                              f"{exc}{waited}", None if permanent else 1.0, code)
            await asyncio.sleep(PLACEMENT_POLL_S)

    def call(self, fn, *args):
        """Run `fn(*args)` on the engine thread and wait for it (synchronous callers; never from the
        event loop, which `_run` serves)."""
        return self._worker.submit(fn, *args).result()

    async def _run(self, fn, *args):
        return await asyncio.wrap_future(self._worker.submit(fn, *args))

    # ---- from the engine thread ---------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs to their streams: one call into each event loop that waits on them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            entry = self._queues.get(out.seq_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: nobody waits on these streams any more
                pass

    def _step_failed(self, exc: BaseException) -> None:
        """A step raised (a bug, not bad input): fail the requests in flight, keep the replica."""
        logger.error("engine step failed on replica %s", self.replica_id, exc_info=exc)
        failed = []
        for seq_id in list(self._queues):
            self.engine.abort(seq_id)
            failed.append(RequestOutput(seq_id, "", (), True, "error"))
        self._deliver(failed)
        logger.error("replica %s failed %d requests: internal error in the engine step", self.replica_id, len(failed))

    # ---- the cluster ---------------------------------------------------------------------
    def report(self) -> ReplicaReport:
        return self.call(self._report)

    def _report(self) -> ReplicaReport:
        engine, pool = self.engine, self.engine.memory.pool
        wall_offset = time.time() - time.monotonic()  # engine clocks are monotonic; reports are wall clock
        tenants = []
        for model in engine.models:
            s = engine.tenant_stats(model)
            tenants.append(TenantReport(model, s.num_layers, s.resident_layers, s.num_waiting + s.num_swapped,
                                        s.num_running, s.kv_pages_used, s.last_active_s + wall_offset,
                                        s.arrival_rate_per_s))
        device = engine.memory.device
        gpu = read_device(device.index or 0) if device.type == "cuda" else None
        capacity = engine.capacity()
        return ReplicaReport(self.replica_id, self.node_id, time.time(), pool.num_pages, pool.page_size_bytes,
                             capacity.free_pages, capacity.reclaimable_pages, engine.link_bytes_per_s, tuple(tenants),
                             self.num_aborted, gpu and gpu.memory_used_bytes, gpu and gpu.memory_total_bytes,
                             gpu and gpu.utilization_pct, self._recent_failed_loads())

    def _recent_failed_loads(self) -> tuple[tuple[str, str], ...]:
        """Load orders that failed here lately and whose model is still not hosted."""
        now = time.monotonic()
        self._failed_loads = {m: (at, why) for m, (at, why) in self._failed_loads.items()
                              if now - at < FAILED_LOAD_MEMORY_S and m not in self.tokenizers}
        return tuple(sorted((m, why) for m, (_, why) in self._failed_loads.items()))

    async def apply_orders(self, orders: ReplicaOrders) -> None:
        """Between engine steps (on the engine thread): hints for the remap controller, new models."""
        if orders.version <= self._orders_version or orders.replica_id != self.replica_id:
            return
        self._orders_version, self.last_orders = orders.version, orders
        await self._run(self.engine.set_cluster_hints, orders.cold, orders.warming)
        for model in sorted(orders.load - set(self.tokenizers)):
            try:
                await self._run(self._load, model)
            except RemapError as exc:  # reported: the controller places it elsewhere, and says why
                self._failed_loads[model] = (time.monotonic(), str(exc))
                logger.info("replica %s cannot load %s now: %s", self.replica_id, model, exc)
        for reason in orders.reasons:
            logger.info("replica %s order: %s", self.replica_id, reason)

    def status(self) -> dict[str, Any]:
        report = self.report()
        summary = self.call(self.engine.memory.summary)
        return {"replica_id": self.replica_id, "node_id": self.node_id, "pages": summary,
                "tenants": [t.__dict__ for t in report.tenants], "pending": len(self._queues)}

    def close(self) -> None:
        self._worker.close(self.engine.close)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
