"""One tenant's timing: what its steps cost (the remap controller's budget), when requests arrive,
and the TTFT / TBT samples the replica exports. Owned and fed by LLMEngine, one per tenant."""

from __future__ import annotations

from collections import deque

from replicas.engine.sequence import Sequence

STATS_WINDOW_S = 60.0  # arrival rate is measured over this window
MAX_SAMPLES = 4096  # TTFT / TBT samples kept per tenant


class TenantMetrics:
    def __init__(self, now: float) -> None:
        self.last_active_s = now  # engine clock of the last arrival, step or load
        self.step_s = 0.0  # moving average of this model's step compute time
        self.decode_step_s = 0.0  # the same over steps that compute one token per sequence
        self._arrivals: deque[float] = deque()
        self.ttft: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.tbt: deque[float] = deque(maxlen=MAX_SAMPLES)
        self._new_ttft: list[float] = []  # samples not yet drained (metrics export)
        self._new_tbt: deque[float] = deque(maxlen=MAX_SAMPLES)

    def arrived(self, now: float) -> None:
        self.last_active_s = now
        self._arrivals.append(now)

    def stepped(self, compute_s: float, decode_only: bool, now: float) -> None:
        """A step of this tenant computed for `compute_s` (transfer waits excluded)."""
        self.step_s = _ema(self.step_s, compute_s)
        if decode_only:
            self.decode_step_s = _ema(self.decode_step_s, compute_s)
        self.last_active_s = now

    def predicted_compute_s(self, budget_on_decode: bool) -> float | None:
        """The next step's compute, for the controller's budget; None if it never ran (then the
        controller budgets it at the cap until it has)."""
        if self.step_s == 0:
            return None
        if budget_on_decode and self.decode_step_s > 0:
            return min(self.step_s, self.decode_step_s)
        return self.step_s

    def tokens(self, seq: Sequence, num_new: int) -> None:
        """`seq` got `num_new` tokens this step: a TTFT or a TBT sample."""
        if num_new == 0:
            return
        times = seq.token_times_s
        if len(times) == num_new:  # the first token
            self.ttft.append(times[0] - seq.arrival_s)
            self._new_ttft.append(self.ttft[-1])
        elif len(times) >= 2:
            self.tbt.append(times[-1] - times[-2])
            if len(self._new_tbt) == MAX_SAMPLES:  # nobody drains: keep memory bounded (the deque drops its
                del self._new_ttft[:-MAX_SAMPLES]  # oldest in O(1); a list shifted 4k entries per token)
            self._new_tbt.append(self.tbt[-1])

    def arrival_rate_per_s(self, now: float) -> float:
        while self._arrivals and self._arrivals[0] < now - STATS_WINDOW_S:
            self._arrivals.popleft()
        return len(self._arrivals) / STATS_WINDOW_S

    def drain(self) -> tuple[list[float], list[float]]:
        """TTFT and TBT samples recorded since the last drain."""
        out = (self._new_ttft, list(self._new_tbt))
        self._new_ttft, self._new_tbt = [], deque(maxlen=MAX_SAMPLES)
        return out


def _ema(average: float, sample: float) -> float:
    return sample if average == 0 else 0.8 * average + 0.2 * sample
