"""VirtualClock: simulated seconds that only move when the simulator says so.

The engine takes any `Callable[[], float]` as its clock; a VirtualClock is one. The SimExecutor
advances it by each step's modeled time and a workload driver advances it to the next arrival when
the engine is idle, so no test or replay ever reads wall time or sleeps.
"""

from __future__ import annotations


class VirtualClock:
    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = float(start_s)

    def now(self) -> float:
        return self._now_s

    __call__ = now  # the engine calls its clock

    def advance(self, dt_s: float) -> float:
        """Move forward by dt_s >= 0 seconds; returns the new time."""
        if not dt_s >= 0:
            raise ValueError(f"a virtual clock cannot go back or take NaN: advance({dt_s})")
        self._now_s += dt_s
        return self._now_s

    def advance_to(self, t_s: float) -> float:
        """Move to t_s if that is later (idle until the next arrival); never goes back."""
        self._now_s = max(self._now_s, float(t_s))
        return self._now_s

    def __repr__(self) -> str:
        return f"VirtualClock({self._now_s:.6f} s)"
