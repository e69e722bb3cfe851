"""Host-to-device copies behind one interface: submit a copy, get a ticket, wait on it later.

Parameters only ever move host -> device (the host master copy is the truth), so there is no
write-back path. On CPU the copy runs inline (`SyncTransferEngine`) or on a worker thread
(`ThreadTransferEngine`, which overlaps with compute because torch's copy releases the GIL); the
CUDA engine (copy stream + events) implements the same interface in the GPU issue.

Every engine keeps byte and time totals so the remap controller can use the measured link
bandwidth instead of a datasheet number.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod

import torch


class Ticket:
    """A submitted copy. `done` is set when the bytes have landed."""

    __slots__ = ("done", "error", "event", "num_bytes")

    def __init__(self, num_bytes: int) -> None:
        self.num_bytes = num_bytes
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.event = None  # the CUDA event after the copy (CudaTransferEngine only)


class TransferEngine(ABC):
    WAIT_TIMEOUT_S = 60.0  # a copy that has not landed by then is a hung device, not a slow one
    overlaps_compute = True  # a copy can run while the step computes (a copy stream, a worker thread)

    def __init__(self) -> None:
        self.total_bytes = 0
        self.total_copy_s = 0.0

    @abstractmethod
    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> Ticket:
        """Start copying `src` (host) into `dst` (device view of the same shape and dtype)."""

    def wait(self, ticket: Ticket) -> None:
        if not ticket.done.wait(self.WAIT_TIMEOUT_S):
            raise TimeoutError(f"host-to-device copy of {ticket.num_bytes} B not done after {self.WAIT_TIMEOUT_S} s")
        if ticket.error is not None:
            raise RuntimeError("host-to-device copy failed") from ticket.error

    def take_device_wait_s(self) -> float:
        """Seconds the compute stream stood still in `wait` since the last call, where the device keeps
        the time (CUDA events); 0.0 where a wait blocks the host, whose caller times it itself."""
        return 0.0

    def close(self) -> None:
        """Release worker resources; the engine accepts no copies afterwards."""

    @property
    def measured_bytes_per_s(self) -> float | None:
        """Observed bandwidth over all copies so far, or None before enough bytes have moved."""
        if self.total_bytes < (1 << 20) or self.total_copy_s <= 0:
            return None
        return self.total_bytes / self.total_copy_s

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, ticket: Ticket) -> None:
        start = time.perf_counter()
        try:
            dst.copy_(src, non_blocking=False)
        except BaseException as exc:  # surfaced to the waiter, never lost on a worker thread
            ticket.error = exc
        self.total_copy_s += time.perf_counter() - start
        self.total_bytes += ticket.num_bytes
        ticket.done.set()


class SyncTransferEngine(TransferEngine):
    """Copies inline in submit(); wait() returns at once."""

    overlaps_compute = False  # the copy runs on the thread, and the cores, that compute

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> Ticket:
        ticket = Ticket(src.numel() * src.element_size())
        self._copy(dst, src, ticket)
        return ticket


class ThreadTransferEngine(TransferEngine):
    """One worker thread copies in submission order, like a single copy stream."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: queue.SimpleQueue[tuple[torch.Tensor, torch.Tensor, Ticket] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="remap-transfer", daemon=True)
        self._worker.start()

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> Ticket:
        if not self._worker.is_alive():
            raise RuntimeError("transfer engine is closed")
        ticket = Ticket(src.numel() * src.element_size())
        self._queue.put((dst, src, ticket))
        return ticket

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._copy(*item)

    def close(self) -> None:
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout=self.WAIT_TIMEOUT_S)


class CudaTransferEngine(TransferEngine):
    """Host-to-device copies on a dedicated CUDA stream, overlapping the compute stream.

    `submit` enqueues a non-blocking copy from pinned host memory and records an event after it;
    `wait` makes the caller's current stream wait for that event on the GPU, so the host never
    blocks and compute launched afterwards sees the bytes. Host copies (the master copies) live as
    long as the model, so no lifetime bookkeeping is needed for the source.

    The host cannot time either (it only enqueues), so the device does, with timing events read
    without blocking once they have passed: each copy between events on the copy stream (the totals
    behind `measured_bytes_per_s`), each wait between events on the compute stream before and after
    it (`take_device_wait_s`: the time a step stood still for copies, which is not compute).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._stream = torch.cuda.Stream(device=device)
        self._copies: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # (start, end, bytes), untimed
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # (before, after) a wait, untimed

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> Ticket:
        ticket = Ticket(src.numel() * src.element_size())
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # dst's last readers are done
        with torch.cuda.stream(self._stream):
            start = _timing_event(self._stream)
            dst.copy_(src, non_blocking=True)
            ticket.event = _timing_event(self._stream)
        self._copies.append((start, ticket.event, ticket.num_bytes))
        ticket.done.set()  # enqueued; completion is the event's
        return ticket

    def wait(self, ticket: Ticket) -> None:
        stream = torch.cuda.current_stream(self.device)
        before = _timing_event(stream)
        stream.wait_event(ticket.event)
        self._waits.append((before, _timing_event(stream)))

    def take_device_wait_s(self) -> float:
        done = _passed(self._copies)
        del self._copies[: len(done)]
        self.total_bytes += sum(num_bytes for _, _, num_bytes in done)
        self.total_copy_s += sum(start.elapsed_time(end) for start, end, _ in done) / 1e3
        waits = _passed(self._waits)
        del self._waits[: len(waits)]
        return sum(before.elapsed_time(after) for before, after in waits) / 1e3

    def synchronize(self) -> None:
        self._stream.synchronize()


def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _passed(pairs: list) -> list:
    """The leading pairs whose second event the device has reached (recorded in stream order, so
    the first one not reached ends the run)."""
    n = 0
    while n < len(pairs) and pairs[n][1].query():
        n += 1
    return pairs[:n]


def make_transfer_engine(device: torch.device | None = None, threaded: bool = False) -> TransferEngine:
    """The copy-stream engine on CUDA; inline (or one worker thread) copies elsewhere."""
    if device is not None and device.type == "cuda":
        return CudaTransferEngine(device)
    return ThreadTransferEngine() if threaded else SyncTransferEngine()


def measure_link_bytes_per_s(device: torch.device, num_bytes: int = 16 << 20, repeats: int = 3) -> float:
    """Host-to-device bandwidth of a plain copy (pinned source on CUDA), best of `repeats`."""
    src = torch.ones(num_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best
