"""Placement: where a parameter slab or a staging slot may lie in the pool, chosen once per device.

DeviceMemory picks one strategy from what its backend can map (`Backend.needs_home_runs`, read in
that one place), and from then on neither DeviceMemory nor ParamStore branches on the backend:

- `HomeRuns` (the arena, and the simulator's byte-less backend): a slab lives in one fixed
  contiguous run of pages, its home, which it keeps while reclaimed (the pool marks those pages
  homed so KV takes them last). A restore needs that run back: KV blocks in it migrate to free
  pages outside it first. A slab whose home another model was loaded onto gets a new one when it
  comes back. Staging slots are contiguous runs carved the same way; when free pages are enough
  but scattered, compaction slides everything to the bottom of the pool.
- `AnyPages` (virtual-memory backends, remap/vmm.py): a slab or slot takes any free pages, mapped
  in order into its own virtual range; nothing ever migrates. Idle staging rings of other models
  give their pages back when a restore falls short (they are caches of host bytes).

Either way a restore costs `num_pages` free pages net, which is what RemapController charges.
Each strategy owns restore, slot making, and its own part of the integrity check.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from remap.pool import window_sums
from remap.types import IntegrityError, ModelId, Owner, OwnerKind, PageId, RemapError

if TYPE_CHECKING:
    from remap.memory import DeviceMemory
    from remap.params import Slab

logger = logging.getLogger(__name__)


class RestoreOutcome(NamedTuple):
    restored: bool
    num_blocks_migrated: int  # KV blocks moved out of the layer's home run (always 0 with AnyPages)
    reason: str  # why not, when restored is False


Slot = tuple[list[PageId], torch.Tensor]  # a staging slot's pages and its bytes


class Placement(ABC):
    """Page choices for one DeviceMemory's slabs and staging slots."""

    def __init__(self, memory: DeviceMemory) -> None:
        self._memory = memory
        self._pool, self._backend = memory.pool, memory.backend
        self.num_blocks_migrated = 0  # totals since start, for stats and metrics
        self.num_compactions = 0

    # ---- slabs ----------------------------------------------------------------------------
    @abstractmethod
    def place(self, slab: Slab) -> list[PageId] | None:
        """Pages for a slab being registered, claimed for it; None if there is no room now."""

    def forget(self, slab: Slab) -> None:
        """A slab leaves (a registration that failed) after giving its pages back."""

    @abstractmethod
    def restore(self, model: ModelId, layer: int) -> RestoreOutcome:
        """Bring a reclaimed layer back from its host copy, or say why not (nothing changes then)."""

    def shortfall(self, max_slab_pages: int) -> str:
        """What a model that does not fit needs besides a page count, for its error message."""
        return ""

    # ---- staging slots --------------------------------------------------------------------
    @abstractmethod
    def make_slot(self, model: ModelId, slot: int, num_pages: int) -> Slot | None:
        """A staging slot's pages (claimed for STAGING(model, slot)) and bytes; None if no room."""

    @abstractmethod
    def free_slot(self, model: ModelId, slot: int, pages: Sequence[PageId]) -> None:
        """Give a slot's pages back."""

    def defragment(self, num_pages: int) -> bool:
        """Make free pages usable when there are `num_pages` of them but they are scattered; False
        if that is not this strategy's problem or not possible now."""
        return False

    def compact(self) -> int:
        raise RemapError(f"{type(self).__name__} placement never compacts: any free pages will do")

    # ---- checks ---------------------------------------------------------------------------
    @abstractmethod
    def check_integrity(self) -> None:
        """This strategy's own invariants over every slab and staging slot."""

    def _check_slab_pages(self) -> None:
        for slab in self._memory.params.slabs():
            if slab.resident and len(slab.pages) != slab.num_pages:
                raise IntegrityError(f"resident slab {slab.model}/{slab.index} has {len(slab.pages)} of "
                                     f"{slab.num_pages} pages")


class HomeRuns(Placement):
    """Each slab in its own contiguous run of pages (see the module docstring)."""

    def place(self, slab: Slab) -> list[PageId] | None:
        first = self._clear_run(slab.num_pages)
        if first is None:
            return None
        pages = _run(first, slab.num_pages)
        claimed = self._pool.claim(pages, Owner(OwnerKind.PARAM, slab.model, slab.index))
        assert claimed, "_clear_run returned a run that is not free"
        self._pool.set_homed(pages, True)
        slab.home = pages
        return pages

    def forget(self, slab: Slab) -> None:
        self._pool.set_homed(slab.home, False)
        slab.home = []

    def shortfall(self, max_slab_pages: int) -> str:
        return f" in contiguous runs of up to {max_slab_pages}"

    def restore(self, model: ModelId, layer: int) -> RestoreOutcome:
        params = self._memory.params
        slab = params.slab(model, layer)
        if not slab.home:  # another model was loaded onto its old home
            first = self._clear_run(slab.num_pages)
            if first is None:
                return RestoreOutcome(False, 0, "its home went to a model loaded since, and no run of "
                                      f"{slab.num_pages} pages can be cleared for a new one")
            slab.home = _run(first, slab.num_pages)
            self._pool.set_homed(slab.home, True)
        moved = 0
        busy = self._owned(slab.home)
        if busy:
            if self._memory.retire_rings_on(busy):  # staging slots are caches of host bytes: they can go
                busy = self._owned(busy)
            evicted = self._evict(busy, slab.home)
            if evicted is None:  # it changed no owner: `busy` still lists the pages in use
                not_kv = len(self._pool.having(busy, OwnerKind.KV, other_than=True))
                free_outside = self._pool.num_free - (slab.num_pages - len(busy))
                return RestoreOutcome(
                    False, 0, f"{len(busy)} of its {slab.num_pages} home pages are in use ({not_kv} not KV) and "
                    f"only {free_outside} pages are free outside them",
                )
            moved = evicted
        if not self._pool.claim(slab.home, Owner(OwnerKind.PARAM, model, layer)):
            raise IntegrityError(f"eviction left pages of layer {layer} of {model!r} owned")
        params.restore(model, layer, slab.home)
        return RestoreOutcome(True, moved, "")

    def make_slot(self, model: ModelId, slot: int, num_pages: int) -> Slot | None:
        first = self._make_run(num_pages, Owner(OwnerKind.STAGING, model, slot))
        if first is None:
            return None
        return _run(first, num_pages), self._backend.run_bytes(first, num_pages)

    def free_slot(self, model: ModelId, slot: int, pages: Sequence[PageId]) -> None:
        self._pool.free(pages)

    def defragment(self, num_pages: int) -> bool:
        if self._pool.num_free < num_pages or self._memory.in_pass():
            return False
        self.compact()  # enough free pages, but resident slabs fragment them: one run at the top
        return True

    def compact(self) -> int:
        """Slide every KV block and resident slab to the lowest pages, so the free pages form one run
        at the top. Reclaimed layers give up their homes (they get new ones when restored) and
        staging rings close (their slots are caches). Resident slabs are copied again from their
        host copies. Returns the pages moved."""
        self._memory.retire_all_rings()
        self._unhome(_run(0, self._pool.num_pages))
        params, kv = self._memory.params, self._memory.kv
        moved = write = page = 0
        while page < self._pool.num_pages:
            owner = self._pool.owner(PageId(page))
            if owner.kind is OwnerKind.FREE:
                page += 1
                continue
            if owner.kind is OwnerKind.KV:
                size = 1
                if page != write:
                    self._pool.claim([PageId(write)], Owner(OwnerKind.KV, owner.model, 0))
                    kv[owner.model].migrate([PageId(page)], [PageId(write)])
            elif owner.kind is OwnerKind.PARAM:
                slab = params.slab(owner.model, owner.index)
                size = slab.num_pages
                if page != write:
                    self._move(slab, PageId(write))
            else:
                raise IntegrityError(f"page {page} is {owner} during compaction (rings were closed)")
            moved += size if page != write else 0
            write, page = write + size, page + size
        self.num_compactions += 1
        logger.info("remap: compacted the arena: %d pages moved, %d free pages in one run", moved, self._pool.num_free)
        return moved

    def check_integrity(self) -> None:
        self._check_slab_pages()
        homes = []
        for slab in self._memory.params.slabs():
            if any(not self._pool.is_homed(p) for p in slab.home):
                raise IntegrityError(f"slab {slab.model}/{slab.index} home run lost its homed mark")
            if slab.resident and slab.pages != slab.home:
                raise IntegrityError(f"resident slab {slab.model}/{slab.index} is on {slab.pages[:4]}..., "
                                     f"not its home {slab.home[:4]}...")
            homes += slab.home
        marked = sum(self._pool.is_homed(PageId(p)) for p in range(self._pool.num_pages))
        if len(set(homes)) != len(homes) or marked != len(homes):
            raise IntegrityError(f"home runs overlap or marks disagree: {len(homes)} home pages, "
                                 f"{len(set(homes))} distinct, {marked} marked homed")

    # ---- runs -----------------------------------------------------------------------------
    def _move(self, slab: Slab, first: PageId) -> None:
        """A resident slab to the run at `first`, free once the slab's own pages are (compaction)."""
        self._pool.set_homed(slab.home, False)
        pages = _run(first, slab.num_pages)
        self._memory.params.move(slab.model, slab.index, pages)
        self._pool.set_homed(pages, True)
        slab.home = pages

    def _unhome(self, pages: Sequence[PageId]) -> list[Slab]:
        """Reclaimed slabs whose home meets `pages` lose it (another slab is placed there); each gets a
        new one when restored. Returns them."""
        wanted, lost = set(pages), []
        for slab in self._memory.params.slabs():
            if not slab.resident and slab.home and wanted.intersection(slab.home):
                self._pool.set_homed(slab.home, False)
                slab.home = []
                lost.append(slab)
        return lost

    def _clear_run(self, num_pages: int) -> PageId | None:
        """A run of free pages for a parameter slab: plain free pages first, then free pages that
        reclaimed layers call home (those layers lose it), then a run cleared of KV blocks by
        migration, then the whole arena compacted. None if too few pages are free (or a forward pass
        reads a staging ring now)."""
        first = self._pool.find_free_run(num_pages)
        if first is None:
            first = self._pool.find_free_run(num_pages, homed_ok=True)
        if first is None:
            first = self._cheapest_run(num_pages)
            run = _run(first, num_pages) if first is not None else []
            if first is None or self._evict(self._owned(run), run) is None:
                if not self.defragment(num_pages):
                    return None
                first = self._pool.find_free_run(num_pages)
                if first is None:
                    raise IntegrityError(f"{self._pool.num_free} pages free after compaction but no run of {num_pages}")
        for slab in self._unhome(_run(first, num_pages)):
            logger.info("remap: %s layer %d (reclaimed) loses its home run to a new slab; it gets another when "
                        "restored", slab.model, slab.index)
        return first

    def _make_run(self, num_pages: int, owner: Owner) -> PageId | None:
        """A contiguous run of pages for `owner`: free if possible, else cleared of KV blocks."""
        first = self._pool.find_free_run(num_pages, homed_ok=True)
        if first is None:
            first = self._cheapest_run(num_pages)
            if first is None:
                return None
            run = _run(first, num_pages)
            if self._evict(self._owned(run), run) is None:
                return None
        run = _run(first, num_pages)
        if not self._pool.claim(run, owner):
            raise IntegrityError(f"run {first}+{num_pages} not free after eviction: "
                                 f"{[str(self._pool.owner(p)) for p in run]}")
        return first

    def _owned(self, pages: Sequence[PageId]) -> list[PageId]:
        """The pages, in order, that are not free."""
        return self._pool.having(pages, OwnerKind.FREE, other_than=True)

    def _cheapest_run(self, num_pages: int) -> PageId | None:
        """Start of the run with the fewest KV blocks and no other owners, if the blocks can move."""
        kinds = self._pool.kinds()
        # int operands: numpy probes an IntEnum for array hooks, which costs more than the comparison
        blocked = window_sums((kinds == int(OwnerKind.PARAM)) | (kinds == int(OwnerKind.STAGING)), num_pages)
        kv = window_sums(kinds == int(OwnerKind.KV), num_pages)
        candidates = np.flatnonzero(blocked == 0)
        if not candidates.size:
            return None
        best = int(candidates[np.argmin(kv[candidates])])  # the first of the cheapest
        cost = int(kv[best])
        if self._pool.num_free - (num_pages - cost) < cost:  # too few free pages outside it for its blocks
            return None
        return PageId(best)

    def _evict(self, pages: Sequence[PageId], keep_out: Sequence[PageId]) -> int | None:
        """Move the KV blocks on `pages` to free pages outside `keep_out`: how many moved, or None
        (nothing moves) if a page is not KV or too few pages are free outside."""
        if self._pool.having(pages, OwnerKind.KV, other_than=True):
            return None
        with self._pool.withheld(keep_out):
            if self._pool.num_free < len(pages):  # most failed restores end here: their owners are not read
                return None
            by_model: dict[ModelId, list[PageId]] = {}
            owner = self._pool.owner
            for p in pages:
                by_model.setdefault(owner(p).model, []).append(p)
            # Every destination first: a source freed by one model's migration must not become the
            # destination of the next model's (it lies inside the run being cleared).
            dsts = {m: self._pool.alloc(len(src), Owner(OwnerKind.KV, m, 0)) for m, src in by_model.items()}
            assert all(d is not None for d in dsts.values())
            for m, src in by_model.items():
                self._memory.kv[m].migrate(src, dsts[m])  # reassigns each destination to its source's sequence
        self.num_blocks_migrated += len(pages)
        return len(pages)


class AnyPages(Placement):
    """Any free pages, mapped into the slab's or slot's own virtual range (see the module docstring)."""

    def place(self, slab: Slab) -> list[PageId] | None:
        return self._pool.alloc(slab.num_pages, Owner(OwnerKind.PARAM, slab.model, slab.index))

    def restore(self, model: ModelId, layer: int) -> RestoreOutcome:
        need = self._memory.params.slab(model, layer).num_pages
        if self._pool.num_free < need:
            self._memory.close_idle_rings(need)
        pages = self._pool.alloc(need, Owner(OwnerKind.PARAM, model, layer))
        if pages is None:
            return RestoreOutcome(False, 0, f"it needs {need} free pages (any) and only {self._pool.num_free} are free")
        self._memory.params.restore(model, layer, pages)
        return RestoreOutcome(True, 0, "")

    def make_slot(self, model: ModelId, slot: int, num_pages: int) -> Slot | None:
        pages = self._pool.alloc(num_pages, Owner(OwnerKind.STAGING, model, slot))
        if pages is None:
            return None
        try:
            return pages, self._backend.map_slab(_slot_key(model, slot), pages)
        except BaseException:
            self._pool.free(pages)
            raise

    def free_slot(self, model: ModelId, slot: int, pages: Sequence[PageId]) -> None:
        self._backend.unmap_slab(_slot_key(model, slot))
        self._pool.free(pages)

    def check_integrity(self) -> None:
        self._check_slab_pages()
        for slab in self._memory.params.slabs():
            key = (slab.model, slab.index)
            mapped = self._backend.mapped_pages(key)
            if mapped != (slab.pages if slab.resident else None):
                raise IntegrityError(f"slab {key} resident={slab.resident} pages {slab.pages} but mapped {mapped}")
            if slab.home or any(self._pool.is_homed(p) for p in slab.pages):
                raise IntegrityError(f"slab {key} has a home run or homed pages on a backend with no home runs")
        for model, ring in self._memory.rings().items():
            for slot, pages in enumerate(ring.slot_pages):
                if self._backend.mapped_pages(_slot_key(model, slot)) != pages:
                    raise IntegrityError(f"slot {slot} of {model!r} pages {pages} are not what its range maps")


def _run(first: PageId, num_pages: int) -> list[PageId]:
    return list(range(first, first + num_pages))  # PageIds are ints: calling PageId per page cost 4x as much


def _slot_key(model: ModelId, slot: int) -> tuple[ModelId, str, int]:
    """A staging slot's virtual range (slab ranges are keyed (model, layer))."""
    return (model, "staging", slot)
