"""DeviceMemory: one device's page pool shared by every tenant's parameters, KV cache and staging.

This is the memory engine's front: the engine registers models, allocates KV through the model's
`KVBlocks`, and executes RemapController plans through `reclaim`, `restore` and `open_stream`.
Where a slab or a staging slot may lie, and so what a restore or a new slot has to move, is the
placement's business (remap/placement.py), chosen here once from the backend: home runs with KV
migration on the arena, any pages on virtual-memory backends. A restore that cannot happen reports
why and changes nothing.

`check_integrity()` proves the whole picture: every page has one owner, every owner's view of its
pages agrees with the pool, and the per-kind page counts add up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from remap.backend import ArenaBackend, Backend
from remap.controller import RemapPlan, TenantSnapshot
from remap.kv import KVBlocks, KVGeometry
from remap.params import ParamStore
from remap.placement import AnyPages, HomeRuns, Placement, RestoreOutcome, Slot
from remap.pool import PagePool
from remap.staging import StagingRing
from remap.transfer import TransferEngine, make_transfer_engine
from remap.types import IntegrityError, ModelId, Owner, OwnerKind, PageId, RemapError

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE_BYTES = 2 << 20  # CUDA VMM allocation granularity


class AppliedPlan(NamedTuple):
    num_reclaimed: int  # layers reclaimed
    num_restored: int  # layers restored
    failed_restores: tuple[tuple[ModelId, int, str], ...]  # (model, layer, why) left reclaimed
    num_blocks_migrated: int  # KV blocks moved out of restored layers' home runs


class DeviceMemory:
    def __init__(
        self,
        num_pages: int,
        page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES,
        device: torch.device | str = "cpu",
        backend: Backend | None = None,
        transfer: TransferEngine | None = None,
    ) -> None:
        self.backend = backend or ArenaBackend(num_pages, page_size_bytes, device)
        self.device = self.backend.device
        self.pool = PagePool(num_pages, page_size_bytes)
        self.transfer = transfer or make_transfer_engine(self.device)
        self.placement: Placement = HomeRuns(self) if self.backend.needs_home_runs else AnyPages(self)
        self.params = ParamStore(self.pool, self.backend, self.transfer, self.placement)
        self.kv: dict[ModelId, KVBlocks] = {}
        self._rings: dict[ModelId, StagingRing] = {}
        self.num_reclaims = 0  # totals since start, for stats and metrics
        self.num_restores = 0
        logger.info(
            "device memory: %d pages x %d B = %.1f MiB on %s", num_pages, page_size_bytes,
            num_pages * page_size_bytes / 2**20, self.device,
        )

    @property
    def page_size_bytes(self) -> int:
        return self.pool.page_size_bytes

    @property
    def num_blocks_migrated(self) -> int:
        """KV blocks moved out of runs that slabs or slots needed, since start."""
        return self.placement.num_blocks_migrated

    @property
    def num_compactions(self) -> int:
        return self.placement.num_compactions

    # ---- models --------------------------------------------------------------------------
    def register_model(
        self,
        model: ModelId,
        layers: Sequence[Mapping[str, torch.Tensor]],
        base: Mapping[str, torch.Tensor],
        kv_geometry: KVGeometry,
        max_lent: int = 0,
    ) -> KVBlocks:
        """Place a model's parameters in pages and set up its KV blocks. All or nothing. Up to
        `max_lent` of its layers may start lent (ParamStore.register) when that is the only way in."""
        kv = KVBlocks(model, kv_geometry, self.pool, self.backend)  # validates geometry first
        self.params.register(model, layers, base, max_lent)
        self.kv[model] = kv
        return kv

    def model_kv(self, model: ModelId) -> KVBlocks:
        if model not in self.kv:
            raise RemapError(f"unknown model {model!r}; registered: {sorted(self.kv)}")
        return self.kv[model]

    # ---- reclaim / restore ---------------------------------------------------------------
    def reclaim(self, model: ModelId, layer: int) -> int:
        """Lend a layer's pages to the pool (no copy). Returns pages freed."""
        self._retire_ring(model)
        freed = self.params.reclaim(model, layer)
        self.num_reclaims += 1
        return freed

    def restore(self, model: ModelId, layer: int) -> RestoreOutcome:
        """Bring a layer back from the host copy, wherever the placement finds room for it."""
        if self.params.is_resident(model, layer):
            raise RemapError(f"layer {layer} of {model!r} is already resident")
        self._retire_ring(model)
        outcome = self.placement.restore(model, layer)
        if outcome.restored:
            self.num_restores += 1
        return outcome

    # ---- controller plans -----------------------------------------------------------------
    def tenant_snapshot(
        self,
        model: ModelId,
        *,
        num_running: int,
        num_waiting: int,
        kv_pages_needed: int,
        kv_pages_admitting: int = 0,
        last_active_s: float,
        predicted_compute_s: float | None,
        cold: bool = False,
        warming: bool = False,
    ) -> TenantSnapshot:
        """The controller's view of one model: memory facts from here, load facts from the engine."""
        return TenantSnapshot(
            model=model,
            num_layers=self.params.num_layers(model),
            remapped_layers=self.params.remapped_layers(model),
            layer_pages=self.params.max_layer_pages(model),
            layer_bytes=self.params.max_layer_bytes(model),
            num_running=num_running,
            num_waiting=num_waiting,
            kv_pages_needed=kv_pages_needed,
            kv_pages_admitting=kv_pages_admitting,
            last_active_s=last_active_s,
            predicted_compute_s=predicted_compute_s,
            cold=cold,
            warming=warming,
        )

    def apply(self, plan: RemapPlan) -> AppliedPlan:
        """Execute a plan's reclaims, then its restores (a restore that cannot happen is reported).

        Staging rings are the engine's to open per forward pass from `plan.stream`.
        """
        for line in plan.describe():
            logger.info("remap: %s", line)
        for a in plan.reclaim:
            self.reclaim(ModelId(a.model), a.layer)
        failed, migrated = [], 0
        for a in plan.restore:
            outcome = self.restore(ModelId(a.model), a.layer)
            migrated += outcome.num_blocks_migrated
            if not outcome.restored:
                failed.append((ModelId(a.model), a.layer, outcome.reason))
                logger.info("remap: restore of %s layer %d deferred: %s", a.model, a.layer, outcome.reason)
        return AppliedPlan(len(plan.reclaim), len(plan.restore) - len(failed), tuple(failed), migrated)

    # ---- staging -------------------------------------------------------------------------
    def open_stream(self, model: ModelId, num_slots: int) -> StagingRing | None:
        """Carve `num_slots` staging slots for a model's remapped layers; None if no room."""
        if model in self._rings:
            raise RemapError(f"{model!r} already has a staging ring; close it first")
        slot_pages = -(-self.params.max_layer_bytes(model) // self.page_size_bytes)
        slots = self._make_slots(model, num_slots, slot_pages)
        if slots is None and self.placement.defragment(num_slots * slot_pages):
            slots = self._make_slots(model, num_slots, slot_pages)
        if slots is None:
            return None
        ring = StagingRing(model, slots, self.params, self.transfer)
        self._rings[model] = ring
        return ring

    def _make_slots(self, model: ModelId, num_slots: int, slot_pages: int) -> list[Slot] | None:
        """Every slot of a ring, or None (and nothing held) if one cannot be made."""
        slots: list[Slot] = []
        for slot in range(num_slots):
            got = self.placement.make_slot(model, slot, slot_pages)
            if got is None:
                self._free_slots(model, [pages for pages, _ in slots])
                return None
            slots.append(got)
        return slots

    def _free_slots(self, model: ModelId, slot_pages: Sequence[Sequence[PageId]]) -> None:
        for slot, pages in enumerate(slot_pages):
            self.placement.free_slot(model, slot, pages)

    def close_stream(self, model: ModelId) -> None:
        ring = self._rings.pop(model)
        ring.finish()
        self._free_slots(model, ring.slot_pages)

    def ring(self, model: ModelId) -> StagingRing | None:
        return self._rings.get(model)

    def rings(self) -> dict[ModelId, StagingRing]:
        return dict(self._rings)

    def in_pass(self) -> bool:
        """A forward pass reads some staging ring now (no ring may close, no page may move)."""
        return any(r.in_pass for r in self._rings.values())

    def close_idle_rings(self, need: int) -> None:
        """Close idle rings until `need` pages are free, if closing them all would make that many."""
        idle = [m for m, r in self._rings.items() if not r.in_pass]
        if self.pool.num_free + sum(self._rings[m].num_pages for m in idle) >= need:
            for m in idle:
                if self.pool.num_free >= need:
                    break
                self.close_stream(m)

    def retire_all_rings(self) -> None:
        for model in list(self._rings):
            self._retire_ring(model)

    def retire_rings_on(self, pages: Sequence[PageId]) -> bool:
        """Close the idle staging rings that own any of these pages, in page order: the order decides
        which freed pages the next allocations get, and a set of owners (which hash model names)
        would make it, and a simulation's result, differ from one process to the next. Returns
        whether any of the pages was staging (then some of them are free now)."""
        staging = [self.pool.owner(p).model for p in self.pool.having(pages, OwnerKind.STAGING)]
        for model in dict.fromkeys(staging):
            self._retire_ring(model)  # a no-op where the model has no ring
        return bool(staging)

    def _retire_ring(self, model: ModelId) -> None:
        """A model's resident layers are about to change: its ring (sized and filled for the old
        set) closes, unless a forward pass is reading it right now, which is a caller's bug."""
        ring = self._rings.get(model)
        if ring is None:
            return
        if ring.in_pass:
            raise RemapError(f"{model!r}'s staging ring is in a forward pass: its layers cannot change now")
        self.close_stream(model)

    def compact(self) -> int:
        """Slide every KV block and resident slab to the bottom of the pool (arena placement only)."""
        return self.placement.compact()

    def num_lent_pages(self) -> int:
        """Parameter pages currently lent out (what reclaimed layers freed)."""
        return sum(self.params.slab(m, i).num_pages for m in self.params.models
                   for i in range(self.params.num_layers(m)) if not self.params.is_resident(m, i))

    # ---- views ---------------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        return self.pool.summary()

    def describe(self) -> str:
        """One line per model: resident layers and KV pages, then the pool's page counts."""
        lines = []
        for model in self.params.models:
            n = self.params.num_layers(model)
            resident = self.params.resident_layers(model)
            mask = "".join("#" if i in resident else "." for i in range(n))
            lines.append(
                f"{model:>12}: layers [{mask}] {len(resident)}/{n} resident, "
                f"{self.kv[model].num_pages_used} KV pages, block_size {self.kv[model].block_size} tokens"
            )
        s = self.summary()
        lines.append(f"{'pool':>12}: " + ", ".join(f"{k} {v}" for k, v in s.items()) + f" (of {self.pool.num_pages})")
        return "\n".join(lines)

    def close(self) -> None:
        """Give the pool and the parameters' host copies back now, not when the garbage collector
        reaches the engine's reference cycles; every view handed out is invalid afterwards."""
        for model in list(self._rings):
            self.close_stream(model)
        self.transfer.close()
        self.params.close()
        self.backend.close()

    # ---- checks --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.pool.check_integrity()
        self.params.check_integrity()
        for kv in self.kv.values():
            kv.check_integrity()
        kv_pages = sum(kv.num_pages_used for kv in self.kv.values())
        if kv_pages != self.pool.num_owned_by(OwnerKind.KV):
            raise IntegrityError(f"block tables hold {kv_pages} pages, pool says {self.pool.num_owned_by(OwnerKind.KV)} KV")
        staging = sum(r.num_pages for r in self._rings.values())
        if staging != self.pool.num_owned_by(OwnerKind.STAGING):
            raise IntegrityError(f"rings hold {staging} pages, pool says {self.pool.num_owned_by(OwnerKind.STAGING)} staging")
        for model, ring in self._rings.items():
            for slot, pages in enumerate(ring.slot_pages):
                for p in pages:
                    if self.pool.owner(p) != Owner(OwnerKind.STAGING, model, slot):
                        raise IntegrityError(f"slot {slot} of {model!r} page {p} owned by {self.pool.owner(p)}")
        self.placement.check_integrity()
