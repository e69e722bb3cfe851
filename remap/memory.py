"""DeviceMemory: one device's page pool shared by every tenant's parameters, KV cache and staging.

This is the memory engine's front: the engine registers models, allocates KV through the model's
`KVBlocks`, and executes RemapController plans through `reclaim`, `restore` and `open_stream`.
It owns the cross-cutting moves that touch several owners at once:

- restore into an arena home run: KV blocks sitting in the run migrate to free pages outside it
  first (a device-local copy plus a block-table update); if too few pages are free, the restore
  reports failure and nothing changes. On a virtual-memory backend (remap/vmm.py) a restore takes
  any free pages and never migrates; idle staging rings of other models give their pages back if
  the free ones fall short (they are caches of host bytes), as they do when they sit in a home run.
  Either way a restore costs `num_pages` free pages net, which is what RemapController charges.
- staging slots: contiguous runs, carved out of free pages, migrating KV blocks the same way.

`check_integrity()` proves the whole picture: every page has one owner, every owner's view of its
pages agrees with the pool, and the per-kind page counts add up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from remap.backend import ArenaBackend, Backend
from remap.controller import RemapPlan, TenantSnapshot
from remap.kv import KVBlocks, KVGeometry
from remap.params import ParamStore
from remap.pool import PagePool, window_sums
from remap.staging import StagingRing
from remap.transfer import TransferEngine, make_transfer_engine
from remap.types import IntegrityError, ModelId, Owner, OwnerKind, PageId, RemapError

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE_BYTES = 2 << 20  # CUDA VMM allocation granularity


class RestoreOutcome(NamedTuple):
    restored: bool
    num_blocks_migrated: int  # KV blocks moved out of the layer's home run (always 0 on vmm backends)
    reason: str  # why not, when restored is False


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
        self.params = ParamStore(self.pool, self.backend, self.transfer)
        self.kv: dict[ModelId, KVBlocks] = {}
        self._rings: dict[ModelId, StagingRing] = {}
        self.num_blocks_migrated = 0  # totals since start, for stats and metrics
        self.num_reclaims = 0
        self.num_restores = 0
        self.num_compactions = 0
        logger.info(
            "device memory: %d pages x %d B = %.1f MiB on %s", num_pages, page_size_bytes,
            num_pages * page_size_bytes / 2**20, self.device,
        )

    @property
    def page_size_bytes(self) -> int:
        return self.pool.page_size_bytes

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
        self.params.register(model, layers, base, self._clear_run if self.backend.needs_home_runs else None,
                             max_lent)
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
        """Bring a layer back from the host copy, migrating KV out of its home run if needed."""
        self._retire_ring(model)
        if not self.backend.needs_home_runs:
            return self._restore_anywhere(model, layer)
        if self.params.is_homeless(model, layer):  # another model was loaded onto its old home
            first = self._clear_run(self.params.slab(model, layer).num_pages)
            if first is None:
                return RestoreOutcome(False, 0, "its home went to a model loaded since, and no run of "
                                      f"{self.params.slab(model, layer).num_pages} pages can be cleared for a new one")
            self.params.rehome(model, layer, first)
        moved: list[int] = []

        def evict(pages: list[PageId]) -> bool:
            self._retire_rings_on(pages)  # staging slots are caches of host bytes: they can go
            pages = [p for p in pages if self.pool.owner(p).kind is not OwnerKind.FREE]
            n = self._evict(pages, self.params.slab(model, layer).pages)
            moved.append(n)
            return n >= 0

        if self.params.restore(model, layer, evict):
            self.num_restores += 1
            return RestoreOutcome(True, sum(moved), "")
        slab = self.params.slab(model, layer)
        busy = [p for p in slab.pages if self.pool.owner(p).kind is not OwnerKind.FREE]
        not_kv = sum(self.pool.owner(p).kind is not OwnerKind.KV for p in busy)
        free_outside = self.pool.num_free - (slab.num_pages - len(busy))
        return RestoreOutcome(
            False, 0, f"{len(busy)} of its {slab.num_pages} home pages are in use ({not_kv} not KV) and only "
            f"{free_outside} pages are free outside them",
        )

    def _restore_anywhere(self, model: ModelId, layer: int) -> RestoreOutcome:
        """Virtual-memory restore: any `num_pages` free pages, idle rings closed if that makes enough."""
        need = self.params.slab(model, layer).num_pages
        if self.pool.num_free < need:
            idle = [m for m, r in self._rings.items() if not r.in_pass]
            if self.pool.num_free + sum(len(self._rings[m].pages) for m in idle) >= need:
                for m in idle:
                    if self.pool.num_free >= need:
                        break
                    self.close_stream(m)
        if not self.params.restore(model, layer):
            return RestoreOutcome(False, 0, f"it needs {need} free pages (any) and only {self.pool.num_free} are free")
        self.num_restores += 1
        return RestoreOutcome(True, 0, "")

    def _evict(self, pages: Sequence[PageId], keep_out: Sequence[PageId]) -> int:
        """Move the KV blocks on `pages` to free pages outside `keep_out`; -1 if impossible."""
        owners = [self.pool.owner(p) for p in pages]
        if any(o.kind is not OwnerKind.KV for o in owners):
            return -1
        # Fence the run's free pages so the destinations land elsewhere, then release the fence.
        fence = [p for p in keep_out if self.pool.owner(p).kind is OwnerKind.FREE]
        fence_owner = Owner(OwnerKind.STAGING, ModelId("<fence>"), 0)
        self.pool.claim(fence, fence_owner)
        try:
            if self.pool.num_free < len(pages):
                return -1
            by_model: dict[ModelId, list[PageId]] = {}
            for p, o in zip(pages, owners):
                by_model.setdefault(o.model, []).append(p)
            # Every destination first: a source freed by one model's migration must not become the
            # destination of the next model's (it lies inside the run being cleared).
            dsts = {m: self.pool.alloc(len(src), Owner(OwnerKind.KV, m, 0)) for m, src in by_model.items()}
            assert all(d is not None for d in dsts.values())
            for m, src in by_model.items():
                self.kv[m].migrate(src, dsts[m])  # reassigns each destination to its source's sequence
        finally:
            self.pool.free(fence)
        self.num_blocks_migrated += len(pages)
        return len(pages)

    # ---- controller plans -----------------------------------------------------------------
    def tenant_snapshot(
        self,
        model: ModelId,
        *,
        num_running: int,
        num_waiting: int,
        kv_pages_needed: int,
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
        if (slots is None and self.backend.needs_home_runs and self.pool.num_free >= num_slots * slot_pages
                and not any(r.in_pass for r in self._rings.values())):
            self.compact()  # enough free pages, but resident slabs fragment them: one run at the top
            slots = self._make_slots(model, num_slots, slot_pages)
        if slots is None:
            return None
        ring = StagingRing(model, slots, self.params, self.transfer)
        self._rings[model] = ring
        return ring

    def _make_slots(self, model: ModelId, num_slots: int,
                    slot_pages: int) -> list[tuple[list[PageId], torch.Tensor]] | None:
        """Every slot of a ring, or None (and nothing held) if one cannot be made."""
        slots: list[tuple[list[PageId], torch.Tensor]] = []
        for slot in range(num_slots):
            got = self._make_slot(model, slot, slot_pages)
            if got is None:
                self._free_slots(model, [pages for pages, _ in slots])
                return None
            slots.append(got)
        return slots

    def _make_slot(self, model: ModelId, slot: int, num_pages: int) -> tuple[list[PageId], torch.Tensor] | None:
        """A slot's pages and bytes: a contiguous run (arena: KV migrates out of it if needed), or any
        free pages mapped into the slot's own virtual range (vmm: nothing moves)."""
        owner = Owner(OwnerKind.STAGING, model, slot)
        if self.backend.needs_home_runs:
            first = self._make_run(num_pages, owner)
            if first is None:
                return None
            return [PageId(p) for p in range(first, first + num_pages)], self.backend.run_bytes(first, num_pages)
        pages = self.pool.alloc(num_pages, owner)
        if pages is None:
            return None
        try:
            return pages, self.backend.map_slab(_slot_key(model, slot), pages)
        except BaseException:
            self.pool.free(pages)
            raise

    def _free_slots(self, model: ModelId, slot_pages: Sequence[Sequence[PageId]]) -> None:
        for slot, pages in enumerate(slot_pages):
            if not self.backend.needs_home_runs:
                self.backend.unmap_slab(_slot_key(model, slot))
            self.pool.free(pages)

    def close_stream(self, model: ModelId) -> None:
        ring = self._rings.pop(model)
        ring.finish()
        self._free_slots(model, ring.slot_pages)

    def ring(self, model: ModelId) -> StagingRing | None:
        return self._rings.get(model)

    def _retire_rings_on(self, pages: Sequence[PageId]) -> None:
        """Close the idle staging rings that own any of these pages."""
        for owner in {self.pool.owner(p) for p in pages}:
            if owner.kind is OwnerKind.STAGING and owner.model in self._rings:
                self._retire_ring(owner.model)

    def _retire_ring(self, model: ModelId) -> None:
        """A model's resident layers are about to change: its ring (sized and filled for the old
        set) closes, unless a forward pass is reading it right now, which is a caller's bug."""
        ring = self._rings.get(model)
        if ring is None:
            return
        if ring.in_pass:
            raise RemapError(f"{model!r}'s staging ring is in a forward pass: its layers cannot change now")
        self.close_stream(model)

    def _clear_run(self, num_pages: int) -> PageId | None:
        """A run of free pages for a parameter slab (arena): plain free pages first, then free pages
        that reclaimed layers call home (those layers lose it and get a new one when restored), then
        a run cleared of KV blocks by migration, then the whole arena compacted. None if too few
        pages are free (or a forward pass reads a staging ring now)."""
        first = self.pool.find_free_run(num_pages)
        if first is None:
            first = self.pool.find_free_run(num_pages, homed_ok=True)
        if first is None:
            first = self._cheapest_run(num_pages)
            run = [PageId(p) for p in range(first, first + num_pages)] if first is not None else []
            busy = [p for p in run if self.pool.owner(p).kind is not OwnerKind.FREE]
            if first is None or self._evict(busy, run) < 0:
                if self.pool.num_free < num_pages or any(r.in_pass for r in self._rings.values()):
                    return None
                self.compact()  # resident slabs fragment the pool: slide everything down
                first = self.pool.find_free_run(num_pages)
                if first is None:
                    raise IntegrityError(f"{self.pool.num_free} pages free after compaction but no run of {num_pages}")
        for model, layer in self.params.unhome([PageId(p) for p in range(first, first + num_pages)]):
            logger.info("remap: %s layer %d (reclaimed) loses its home run to a new slab; it gets another when "
                        "restored", model, layer)
        return first

    def compact(self) -> int:
        """Arena: slide every KV block and resident slab to the lowest pages, so the free pages form
        one run at the top. Reclaimed layers give up their homes (they get new ones when restored)
        and staging rings close (their slots are caches). Resident slabs are copied again from their
        host copies. Returns the pages moved."""
        for model in list(self._rings):
            self._retire_ring(model)
        self.params.unhome([PageId(p) for p in range(self.pool.num_pages)])
        moved = write = page = 0
        while page < self.pool.num_pages:
            owner = self.pool.owner(PageId(page))
            if owner.kind is OwnerKind.FREE:
                page += 1
                continue
            if owner.kind is OwnerKind.KV:
                size = 1
                if page != write:
                    self.pool.claim([PageId(write)], Owner(OwnerKind.KV, owner.model, 0))
                    self.kv[owner.model].migrate([PageId(page)], [PageId(write)])
            elif owner.kind is OwnerKind.PARAM:
                size = self.params.slab(owner.model, owner.index).num_pages
                if page != write:
                    self.params.move(owner.model, owner.index, PageId(write))
            else:
                raise IntegrityError(f"page {page} is {owner} during compaction (rings were closed)")
            moved += size if page != write else 0
            write, page = write + size, page + size
        self.num_compactions += 1
        logger.info("remap: compacted the arena: %d pages moved, %d free pages in one run", moved, self.pool.num_free)
        return moved

    def _make_run(self, num_pages: int, owner: Owner) -> PageId | None:
        """A contiguous run of pages for `owner`: free if possible, else cleared of KV blocks."""
        first = self.pool.find_free_run(num_pages, homed_ok=True)
        if first is None:
            first = self._cheapest_run(num_pages)
            if first is None:
                return None
            run = [PageId(p) for p in range(first, first + num_pages)]
            busy = [p for p in run if self.pool.owner(p).kind is not OwnerKind.FREE]
            if self._evict(busy, run) < 0:
                return None
        run = [PageId(p) for p in range(first, first + num_pages)]
        if not self.pool.claim(run, owner):
            owners = [str(self.pool.owner(p)) for p in run]
            raise IntegrityError(f"run {first}+{num_pages} not free after eviction: {owners}")
        return first

    def _cheapest_run(self, num_pages: int) -> PageId | None:
        """Start of the run with the fewest KV blocks and no other owners, if the blocks can move."""
        kinds = self.pool.kinds()
        blocked = window_sums((kinds == OwnerKind.PARAM) | (kinds == OwnerKind.STAGING), num_pages)
        kv = window_sums(kinds == OwnerKind.KV, num_pages)
        candidates = np.flatnonzero(blocked == 0)
        if not candidates.size:
            return None
        best = int(candidates[np.argmin(kv[candidates])])  # the first of the cheapest
        cost = int(kv[best])
        if self.pool.num_free - (num_pages - cost) < cost:  # too few free pages outside it for its blocks
            return None
        return PageId(best)

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
        for model in list(self._rings):
            self.close_stream(model)
        self.transfer.close()
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
        staging = sum(len(r.pages) for r in self._rings.values())
        if staging != self.pool.num_owned_by(OwnerKind.STAGING):
            raise IntegrityError(f"rings hold {staging} pages, pool says {self.pool.num_owned_by(OwnerKind.STAGING)} staging")
        for model, ring in self._rings.items():
            for slot, pages in enumerate(ring.slot_pages):
                for p in pages:
                    if self.pool.owner(p) != Owner(OwnerKind.STAGING, model, slot):
                        raise IntegrityError(f"slot {slot} of {model!r} page {p} owned by {self.pool.owner(p)}")
                if not self.backend.needs_home_runs and self.backend.mapped_pages(_slot_key(model, slot)) != pages:
                    raise IntegrityError(f"slot {slot} of {model!r} pages {pages} are not what its range maps")


def _slot_key(model: ModelId, slot: int) -> tuple[ModelId, str, int]:
    """A staging slot's virtual range on a vmm backend (slab ranges are keyed (model, layer))."""
    return (model, "staging", slot)
