"""The engine's side of parameter remapping (Oneiros): what it tells the RemapController and what it
does with the plans.

Each step the engine asks `replan` for the step's plan from the current demand (a `snapshot` of every
tenant, with the head's reservation counted as demand); the scheduler asks `make_room` mid-step when
a sequence cannot grow; `ring_for` opens the staging ring the computing tenant's lent layers stream
through. The state here is the step's: the head's reservation, the urgent tenant, the tenant whose
ring is open, and the cluster's hints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

from remap import DeviceMemory, MemorySnapshot, ModelId, RemapConfig, RemapController, StagingRing
from replicas.engine.metrics import TenantMetrics
from replicas.engine.scheduler import Scheduler
from replicas.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class RemapDriver:
    # The progress guarantee.
    # The head is the oldest unfinished request. What it may still need is reserved: every plan
    # counts it as demand, and no later request is admitted into it. When its tenant is scheduled
    # it runs first and later arrivals of any tenant yield their KV to it (Scheduler). Under
    # pressure (the plan is short, or free pages are short of the reservation) only its tenant
    # computes and the plan is urgent: every other tenant lends up to its cap like an idle one
    # (their rings close). Admission only takes requests whose need fits `Capacity.kv_pages_for`,
    # so the head runs on every step of its tenant until it ends; then the next oldest is the head.

    def __init__(self, memory: DeviceMemory, controller: RemapController, config: RemapConfig,
                 link_bytes_per_s: float, clock: Callable[[], float],
                 tenants: Callable[[], Mapping[ModelId, TenantMetrics]]) -> None:
        self.memory, self.controller, self.config = memory, controller, config
        self.link_bytes_per_s, self._clock, self._tenants = link_bytes_per_s, clock, tenants
        self.scheduler: Scheduler | None = None  # set by the engine (the scheduler calls make_room)
        self.ring_model: ModelId | None = None  # whose ring is open this step: its layers cannot change
        self.urgent: ModelId | None = None  # this step's tenant when its plan is urgent
        self.reserved: dict[ModelId, int] = {}  # the head's tenant -> KV pages the head may still need
        self.cold: frozenset[ModelId] = frozenset()  # cluster hints, see LLMEngine.set_cluster_hints
        self.warming: frozenset[ModelId] = frozenset()

    def remaining_need(self, seq: Sequence) -> int:
        """KV pages `seq` may still take: up to prompt + max_tokens, less the pages it holds."""
        kv = self.memory.kv[seq.model]
        held = 0 if kv.is_swapped(seq.seq_id) else len(kv.table(seq.seq_id))
        return max(0, kv.num_blocks_for(seq.max_num_tokens) - held)

    def _ring_pages(self, model: ModelId | None) -> int:
        ring = self.memory.ring(model) if model is not None else None
        return len(ring.pages) if ring else 0

    def snapshot(self, now: float, extra: Mapping[ModelId, int] | None = None,
                  urgent: ModelId | None = None) -> MemorySnapshot:
        ring_pages = 0
        tenants = []
        for model, metrics in self._tenants().items():
            sched = self.scheduler
            tenants.append(self.memory.tenant_snapshot(
                model,
                num_running=len(sched.running[model]),
                num_waiting=len(sched.waiting[model]) + len(sched.swapped[model]),
                kv_pages_needed=(sched.kv_pages_needed(model) + (extra or {}).get(model, 0)
                                 + self.reserved.get(model, 0)),  # the head's reservation
                last_active_s=metrics.last_active_s,
                predicted_compute_s=(metrics.predicted_compute_s(self.config.budget_on_decode)
                                     if sched.has_work(model) else 0.0),
                cold=model in self.cold,
                warming=model in self.warming,
            ))
        for model in self._tenants():  # the controller charges staging itself: open rings count as free
            ring = self.memory.ring(model)
            ring_pages += len(ring.pages) if ring else 0
        return MemorySnapshot(now, self.memory.pool.num_free + ring_pages, self.link_bytes_per_s, tuple(tenants),
                              urgent)

    def replan(self, now: float, model: ModelId | None, head: Sequence | None) -> ModelId | None:
        """The step's memory plan. Under pressure for the head (the plan is short, or free pages are
        short of its reservation) the head's tenant is served instead and its plan is urgent (see
        the progress guarantee above): another tenant's step would take back, as its ring or as
        restores, the layers the head's plan lends. Returns the urgent tenant, or None."""
        plan = self.controller.plan(self.snapshot(now))
        urgent = None
        reserved = self.reserved.get(head.model, 0) if head is not None else 0
        if head is not None and (plan.num_pages_short > 0
                                 or self.memory.pool.num_free + self._ring_pages(head.model) < reserved):
            urgent = head.model
            for other in list(self._tenants()):
                if other != urgent and self.memory.ring(other) is not None:
                    self.memory.close_stream(other)  # they do not compute this step; slots are caches
            logger.debug("progress: %s's oldest request may still need %d KV pages, %d are free: every other tenant "
                         "lends up to its cap", urgent, self.reserved.get(urgent, 0), self.memory.pool.num_free)
            plan = self.controller.plan(self.snapshot(now, None, urgent))
        if not plan.is_noop:
            self.apply(plan)
        return urgent

    def apply(self, plan) -> None:
        self.memory.apply(plan)  # rings of the models whose layers move close first (DeviceMemory)

    def make_room(self, model: ModelId, num_pages: int) -> bool:
        """Scheduler hook: lend parameter pages so `model` can grow by `num_pages`."""
        free_before = self.memory.pool.num_free
        plan = self.controller.plan(self.snapshot(self._clock(), {model: num_pages}, self.urgent))
        if self.ring_model is not None:  # its layers cannot change while its ring is open
            plan = dataclasses.replace(
                plan,
                reclaim=tuple(a for a in plan.reclaim if a.model != self.ring_model),
                restore=tuple(a for a in plan.restore if a.model != self.ring_model),
            )
        plan = dataclasses.replace(plan, restore=())  # growing now: restores wait for the next step
        if plan.reclaim:
            self.apply(plan)
        return self.memory.pool.num_free > free_before

    def ring_for(self, model: ModelId, head: Sequence | None) -> StagingRing | None:
        """The staging ring of the model's remapped layers, kept across its steps (its slots still
        hold the layers of the last pass); opened when missing, preempting later arrivals than the
        head if there is no room."""
        num_remapped = self.memory.params.num_layers(model) - len(self.memory.params.resident_layers(model))
        ring = self.memory.ring(model)
        if num_remapped == 0 or ring is not None:
            if num_remapped == 0 and ring is not None:
                self.memory.close_stream(model)
            return ring if num_remapped else None
        want = min(num_remapped, self.config.max_staging_slots or num_remapped + 1)
        while True:
            # Two slots overlap copies with compute; one serializes them and slows every step of the
            # model, so KV is preempted for the second slot and a single slot is the last resort.
            for slots in dict.fromkeys((want, min(want, 2))):
                ring = self.memory.open_stream(model, slots)
                if ring is not None:
                    return ring
            # KV fills every page: free some by recompute, the way the pool's last resort always is;
            # the head yields only if it holds more than admission allowed it (tests force that)
            if not self.scheduler.preempt_latest(keep=head) and not self.scheduler.preempt_latest():
                ring = self.memory.open_stream(model, 1)
                if ring is not None:
                    return ring
                raise RuntimeError(f"no room for one staging slot of {model!r} with no KV left to free "
                                   f"({self.memory.pool.num_free} pages free): the pool is too small")
            logger.info("preempted a sequence to make room for %s's staging slots", model)
