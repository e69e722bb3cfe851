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
from replicas.engine.sequence import SeqStatus, Sequence

logger = logging.getLogger(__name__)


class NoRoomForRing(Exception):
    """A tenant other than the head's cannot open its staging ring without another tenant's KV."""


class RemapDriver:
    # The progress guarantee.
    # The head is the oldest unfinished request. What it may still need is reserved: every plan
    # counts it as demand, and no later request is admitted into it. When its tenant is scheduled
    # it runs first and later arrivals of any tenant yield their KV to it (Scheduler). When it
    # cannot take its next step (it waits and the plan is short, or free pages are short of the
    # reservation) only its tenant computes and the plan is urgent: every other tenant lends up to
    # its cap like an idle one (their rings close). Another tenant's ring takes only that tenant's
    # KV; when that is not enough, the head's tenant runs instead (`open_ring`). Admission only takes
    # requests whose need fits `Capacity.kv_pages_for`, so the head runs on every step of its tenant
    # until it ends; then the next oldest is the head.

    def __init__(self, memory: DeviceMemory, controller: RemapController, config: RemapConfig,
                 link_bytes_per_s: float, clock: Callable[[], float],
                 tenants: Callable[[], Mapping[ModelId, TenantMetrics]], plans: bool = True,
                 copies_overlap: bool = True) -> None:
        self.memory, self.controller, self.config = memory, controller, config
        self.link_bytes_per_s, self._clock, self._tenants = link_bytes_per_s, clock, tenants
        self.copies_overlap = copies_overlap  # False: no copy hides under compute (the controller's alpha budget)
        self.plans = plans  # False: layers move only by hand (the engine's recompute and swap modes, tests)
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
        return ring.num_pages if ring else 0

    def snapshot(self, now: float, extra: Mapping[ModelId, int] | None = None,
                  urgent: ModelId | None = None) -> MemorySnapshot:
        ring_pages = 0
        tenants = []
        sched, extra = self.scheduler, extra or {}
        for model, metrics in self._tenants().items():
            running, admitting = sched.kv_demand(model)
            tenants.append(self.memory.tenant_snapshot(
                model,
                num_running=len(sched.running[model]),
                num_waiting=len(sched.waiting[model]) + len(sched.swapped[model]),
                kv_pages_needed=(running + admitting + extra.get(model, 0)
                                 + self.reserved.get(model, 0)),  # the head's reservation
                kv_pages_admitting=admitting,
                last_active_s=metrics.last_active_s,
                predicted_compute_s=(metrics.predicted_compute_s(self.config.budget_on_decode)
                                     if sched.has_work(model) else 0.0),
                cold=model in self.cold,
                warming=model in self.warming,
            ))
            ring_pages += self._ring_pages(model)  # the controller charges staging itself: open rings count as free
        return MemorySnapshot(now, self.memory.pool.num_free + ring_pages, self.link_bytes_per_s, tuple(tenants),
                              urgent, copies_overlap=self.copies_overlap)

    def replan(self, now: float, head: Sequence | None) -> ModelId | None:
        """The step's memory plan. When the head cannot take its next step (`_head_is_short`) its
        tenant is served and the plan is urgent (see the progress guarantee above): another tenant's
        step would take back, as its ring or as restores, the layers the head's plan lends. Returns
        the urgent tenant, or None."""
        self.urgent = None
        plan = self.controller.plan(self.snapshot(now))
        if head is not None and self._head_is_short(head, plan):
            self.make_urgent(now, head)
        elif not plan.is_noop:
            self.apply(plan)
        return self.urgent

    def _head_is_short(self, head: Sequence, plan) -> bool:
        """The head waits for pages the plan cannot find, or the free pages are short of what it may
        still need. A plan short of other requests' demand alone is not urgent: every tenant keeps
        its turn (serving only the head's would stall every other stream for seconds), and no
        later request is admitted into the head's reservation."""
        reserved = self.reserved.get(head.model, 0)
        return ((head.status is not SeqStatus.RUNNING and plan.num_pages_short > 0)
                or self.memory.pool.num_free + self._ring_pages(head.model) < reserved)

    def make_urgent(self, now: float, head: Sequence) -> None:
        """Serve only the head's tenant this step: every other tenant lends up to its cap like an
        idle one, and their rings close (they do not compute this step; slots are caches)."""
        self.urgent = head.model
        for other in list(self._tenants()):
            if other != head.model and self.memory.ring(other) is not None:
                self.memory.close_stream(other)
        logger.debug("progress: %s's oldest request may still need %d KV pages, %d are free: every other tenant "
                     "lends up to its cap", head.model, self.reserved.get(head.model, 0), self.memory.pool.num_free)
        plan = self.controller.plan(self.snapshot(now, None, self.urgent)) if self.plans else None
        if plan is not None and not plan.is_noop:
            self.apply(plan)

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

    def open_ring(self, model: ModelId, head: Sequence | None) -> tuple[ModelId, StagingRing | None]:
        """(the tenant that runs this step, its ring): `model`'s, or the head's tenant's, made urgent,
        when `model` has no room for its ring."""
        try:
            return model, self.ring_for(model, head)
        except NoRoomForRing:
            logger.debug("no room for %s's staging ring: %s's head runs instead", model, head.model)
            self.make_urgent(self._clock(), head)
            return head.model, self.ring_for(head.model, head)

    def ring_for(self, model: ModelId, head: Sequence | None) -> StagingRing | None:
        """The staging ring of the model's remapped layers, kept across its steps (its slots still
        hold the layers of the last pass); opened when missing, preempting later arrivals than the
        head if there is no room."""
        num_remapped = len(self.memory.params.remapped_layers(model))
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
            # Other tenants' rings are caches (they do not compute this step): they go first
            others = [m for m in self._tenants() if m != model and self.memory.ring(m) is not None]
            if others:
                for other in others:
                    self.memory.close_stream(other)
                continue
            # KV fills every page: free some by recompute, the way the pool's last resort always is.
            # A tenant other than the head's takes only from itself, and skips its turn when that is
            # not enough; the head's takes from every tenant, and the head yields only if it holds
            # more than admission allowed it (tests force that)
            if head is not None and head.model != model:
                if not self.scheduler.preempt_latest(keep=head, model=model):
                    raise NoRoomForRing(model)
                continue
            if head is not None and self.urgent is None and self.plans:  # every other tenant lends up to its cap
                self.make_urgent(self._clock(), head)
                continue
            if not self.scheduler.preempt_latest(keep=head) and not self.scheduler.preempt_latest():
                ring = self.memory.open_stream(model, 1)
                if ring is not None:
                    return ring
                raise RuntimeError(f"no room for one staging slot of {model!r} with no KV left to free "
                                   f"({self.memory.pool.num_free} pages free): the pool is too small")
            logger.info("preempted a sequence to make room for %s's staging slots", model)
