"""ParamStore: model parameters packed into slabs of pages, with a host master copy of each slab.

A slab is one transformer layer of one model (or the model's "base": embeddings, final norm,
lm_head, which is never reclaimed). Its tensors are packed back to back, each at a multiple of
TENSOR_ALIGN_BYTES, into `num_pages` pages:

    slab bytes: |q_proj ...|pad|k_proj ...|pad| ... |last tensor|unused tail of the last page|
                ^ offset 0      ^ offset 256k

The host keeps the same packed bytes (pinned on CUDA), so a restore is one host-to-device copy of
`num_bytes` and a staging slot can hold any layer of the model with the same layout.

Where a slab's pages are depends on the backend:

- home-run backends (the arena): a fixed contiguous run of pages, its "home"; restoring a layer
  needs exactly that run back (DeviceMemory migrates KV blocks out of it first).
- virtual-memory backends (remap/vmm.py): any pages, mapped in order into the slab's own virtual
  range; a restore takes any `num_pages` free pages and the tensor views keep their addresses.

Invariant: a slab is resident iff every page of `slab.pages` is owned by PARAM(model, layer) (and,
on a virtual-memory backend, mapped into its range); reclaim frees those pages without copying
anything (the host copy is the truth).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from remap.backend import TENSOR_ALIGN_BYTES, Backend
from remap.pool import PagePool
from remap.transfer import TransferEngine
from remap.types import BASE_SLAB, IntegrityError, ModelId, Owner, OwnerKind, PageId, RemapError


class TensorSpec(NamedTuple):
    name: str
    offset_bytes: int  # from the start of the slab, a multiple of TENSOR_ALIGN_BYTES
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


@dataclass
class Slab:
    model: ModelId
    index: int  # layer id, or BASE_SLAB
    specs: tuple[TensorSpec, ...]
    num_bytes: int  # packed bytes (what a restore copies)
    num_pages: int
    # Its pages in slab order: the home run on home-run backends (kept while reclaimed: where a
    # restore must go); on virtual-memory backends the pages mapped now, [] while reclaimed.
    pages: list[PageId]
    host: torch.Tensor  # uint8 [num_bytes] master copy
    resident: bool = True

    @property
    def home(self) -> PageId:
        """First page of the home run (home-run backends only)."""
        if not self.pages or self.pages != list(range(self.pages[0], self.pages[0] + self.num_pages)):
            raise RemapError(f"slab {self.model}/{self.index} has no home run (pages {self.pages[:8]})")
        return self.pages[0]


def pack_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], int]:
    """Offsets of each tensor in a slab and the slab's packed size in bytes."""
    specs, offset = [], 0
    for name, t in tensors.items():
        specs.append(TensorSpec(name, offset, t.dtype, tuple(t.shape)))
        offset += _round_up(t.numel() * t.element_size(), TENSOR_ALIGN_BYTES)
    return tuple(specs), offset


def slab_num_pages(tensors: Mapping[str, torch.Tensor], page_size_bytes: int) -> int:
    """Pages one slab of these tensors occupies."""
    return -(-pack_layout(tensors)[1] // page_size_bytes)


def slab_views(specs: Sequence[TensorSpec], data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensor views of a slab's packed bytes `data` (device pages, a staging slot, or the host)."""
    return {
        s.name: data[s.offset_bytes : s.offset_bytes + s.num_bytes].view(s.dtype).view(s.shape) for s in specs
    }


class ParamStore:
    def __init__(self, pool: PagePool, backend: Backend, transfer: TransferEngine) -> None:
        self._pool, self._backend, self._transfer = pool, backend, transfer
        self._slabs: dict[tuple[ModelId, int], Slab] = {}
        self._bytes: dict[tuple[ModelId, int], torch.Tensor] = {}  # uint8 [num_bytes] device view per slab
        self._views: dict[tuple[ModelId, int], dict[str, torch.Tensor]] = {}
        self._num_layers: dict[ModelId, int] = {}
        self._remapped: dict[ModelId, set[int]] = {}  # reclaimed layer ids per model (kept in step)
        self._max_layer_pages: dict[ModelId, int] = {}
        self._max_layer_bytes: dict[ModelId, int] = {}

    # ---- registration --------------------------------------------------------------------
    def register(
        self, model: ModelId, layers: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor],
        find_run: Callable[[int], PageId | None] | None = None, max_lent: int = 0,
    ) -> None:
        """Pack a model's tensors into pages: the base first, then layer by layer. All or nothing.

        When a layer finds no room, up to `max_lent` of the model's own placed layers are lent at
        once (reclaimed: their host copy is the truth) to make it: a model that fits only by lending
        its own layers loads that way, and gets them back when the controller restores them.
        Home-run backends: `find_run(num_pages)` returns the first page of a run of free pages for
        each slab (DeviceMemory clears one of KV blocks, or takes reclaimed layers' homes); by
        default the first run of free pages that is nobody's home."""
        if model in self._num_layers:
            raise RemapError(f"model {model!r} is already registered")
        if not layers or any(not layer for layer in layers) or not base:
            raise RemapError(f"model {model!r} needs >= 1 non-empty layer and non-empty base tensors")
        parts = [(BASE_SLAB, base)] + [(i, layer) for i, layer in enumerate(layers)]
        layouts = [pack_layout(t) for _, t in parts]
        page = self._pool.page_size_bytes
        need = sum(-(-nbytes // page) for _, nbytes in layouts)
        if need > self._pool.num_pages:
            raise RemapError(
                f"model {model!r} needs {need} pages of {page} B but the pool has only {self._pool.num_pages}"
            )
        free = self._pool.num_free
        self._num_layers[model] = len(layers)
        self._remapped[model] = set()
        try:
            for (i, tensors), (specs, nbytes) in zip(parts, layouts):
                while (slab := self._place(model, i, specs, nbytes, find_run or self._pool.find_free_run)) is None:
                    if len(self._remapped[model]) >= max_lent or not self._lend_own(model, i):
                        runs = (f" in contiguous runs of up to {max(-(-n // page) for _, n in layouts)}"
                                if self._backend.needs_home_runs else "")
                        lent = f" ({max_lent} of its layers may start lent)" if max_lent else ""
                        raise RemapError(f"model {model!r} needs {need} pages{runs}{lent}; only {free} pages are free")
                _fill_host(slab, tensors)
                self._slabs[(model, i)] = slab
                self._map(slab)
                self._copy_in(slab)
        except BaseException:
            self._unregister(model)
            raise
        self._max_layer_pages[model] = max(self._slabs[(model, i)].num_pages for i in range(len(layers)))
        self._max_layer_bytes[model] = max(self._slabs[(model, i)].num_bytes for i in range(len(layers)))

    def _lend_own(self, model: ModelId, below: int) -> bool:
        """Lend one of the model's placed layers (those before `below`), the farthest from the ones
        already lent; False if none is left."""
        lent = self._remapped[model]
        resident = [i for i in range(max(below, 0)) if i not in lent]
        if not resident:
            return False
        layer = max(resident, key=lambda i: (min((abs(i - j) for j in lent), default=below), i))
        self._lend(self._slabs[(model, layer)])
        lent.add(layer)
        return True

    def _unregister(self, model: ModelId) -> None:
        """Undo a failed registration: resident slabs give their pages back, homes are dropped."""
        for key in [k for k in self._slabs if k[0] == model]:
            slab = self._slabs.pop(key)
            if slab.resident:
                self._lend(slab)
            if self._backend.needs_home_runs and slab.pages:
                self._pool.set_homed(slab.pages, False)
            self._bytes.pop(key, None)
            self._views.pop(key, None)
        for table in (self._num_layers, self._remapped):
            table.pop(model, None)

    def _place(self, model: ModelId, index: int, specs: tuple[TensorSpec, ...], nbytes: int,
               find_run: Callable[[int], PageId | None]) -> Slab | None:
        num_pages = -(-nbytes // self._pool.page_size_bytes)
        owner = Owner(OwnerKind.PARAM, model, index)
        if self._backend.needs_home_runs:
            first = find_run(num_pages)
            if first is None:
                return None
            pages = [PageId(p) for p in range(first, first + num_pages)]
            claimed = self._pool.claim(pages, owner)
            assert claimed, "find_free_run returned a run that is not free"
            self._pool.set_homed(pages, True)
        else:
            pages = self._pool.alloc(num_pages, owner)
            if pages is None:
                return None
        pinned = self._backend.device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return Slab(model, index, specs, nbytes, num_pages, pages, host)


    # ---- queries -------------------------------------------------------------------------
    @property
    def models(self) -> list[ModelId]:
        return list(self._num_layers)

    def num_layers(self, model: ModelId) -> int:
        if model not in self._num_layers:
            raise RemapError(f"unknown model {model!r}; registered: {sorted(self._num_layers)}")
        return self._num_layers[model]

    def slab(self, model: ModelId, layer: int) -> Slab:
        n = self.num_layers(model)
        if layer != BASE_SLAB and not 0 <= layer < n:
            raise RemapError(f"model {model!r} has layers 0..{n - 1}, not {layer}")
        return self._slabs[(model, layer)]

    def is_resident(self, model: ModelId, layer: int) -> bool:
        return self.slab(model, layer).resident

    def resident_layers(self, model: ModelId) -> list[int]:
        remapped = self._remapped[model] if model in self._remapped else self.remapped_layers(model)
        return [i for i in range(self._num_layers[model]) if i not in remapped]

    def remapped_layers(self, model: ModelId) -> frozenset[int]:
        """Layers whose pages are lent out now."""
        self.num_layers(model)  # a clear error for an unknown model
        return frozenset(self._remapped[model])

    def max_layer_pages(self, model: ModelId) -> int:
        self.num_layers(model)
        return self._max_layer_pages[model]

    def tensors(self, model: ModelId, layer: int) -> dict[str, torch.Tensor]:
        """Device views of a resident slab's tensors (stable until the slab is reclaimed)."""
        if not self.slab(model, layer).resident:
            raise IntegrityError(f"layer {layer} of {model!r} is reclaimed; stream it into a staging slot")
        return self._views[(model, layer)]

    def slab_bytes(self, model: ModelId, layer: int) -> torch.Tensor:
        """uint8 device bytes of a resident slab (what a restore copies into)."""
        self.tensors(model, layer)  # a clear error for a reclaimed slab (a vmm range has no pages then)
        return self._bytes[(model, layer)]

    def max_layer_bytes(self, model: ModelId) -> int:
        self.num_layers(model)
        return self._max_layer_bytes[model]

    # ---- homes (home-run backends) --------------------------------------------------------
    def unhome(self, pages: Sequence[PageId]) -> list[tuple[ModelId, int]]:
        """Reclaimed slabs whose home run meets `pages` lose their home (another slab is placed
        there); each gets a new one when restored (`rehome`). Returns them."""
        wanted = set(pages)
        moved = []
        for key, slab in self._slabs.items():
            if not slab.resident and slab.pages and wanted.intersection(slab.pages):
                self._pool.set_homed(slab.pages, False)
                slab.pages = []
                moved.append(key)
        return moved

    def move(self, model: ModelId, layer: int, first: PageId) -> None:
        """Move a resident slab (home-run backends) to the run at `first`, which must be free once
        the slab's own pages are: compaction. Its bytes come again from the host copy."""
        slab = self.slab(model, layer)
        if not slab.resident or not self._backend.needs_home_runs:
            raise RemapError(f"only a resident slab on a home-run backend moves, not {model}/{layer}")
        self._pool.set_homed(slab.pages, False)
        self._pool.free(slab.pages)
        pages = [PageId(p) for p in range(first, first + slab.num_pages)]
        if not self._pool.claim(pages, Owner(OwnerKind.PARAM, model, layer)):
            raise IntegrityError(f"slab {model}/{layer} cannot move to {first}: the run is not free")
        self._pool.set_homed(pages, True)
        slab.pages = pages
        self._map(slab)
        self._copy_in(slab)

    def _map(self, slab: Slab) -> None:
        """Map the slab's pages into its range and (re)build its byte and tensor views."""
        key = (slab.model, slab.index)
        self._bytes[key] = self._backend.map_slab(key, slab.pages)[: slab.num_bytes]
        self._views[key] = slab_views(slab.specs, self._bytes[key])

    def is_homeless(self, model: ModelId, layer: int) -> bool:
        return self._backend.needs_home_runs and not self.slab(model, layer).pages

    def rehome(self, model: ModelId, layer: int, first: PageId) -> None:
        """Give a homeless reclaimed slab the free run at `first` as its new home (views move too)."""
        slab = self.slab(model, layer)
        if slab.resident or slab.pages:
            raise RemapError(f"slab {model}/{layer} has a home already (resident={slab.resident})")
        pages = [PageId(p) for p in range(first, first + slab.num_pages)]
        self._pool.set_homed(pages, True)
        slab.pages = pages
        self._map(slab)

    # ---- reclaim / restore ---------------------------------------------------------------
    def reclaim(self, model: ModelId, layer: int) -> int:
        """Free a resident layer's pages with no copy; returns the number of pages freed."""
        slab = self.slab(model, layer)
        if layer == BASE_SLAB:
            raise RemapError(f"the base slab of {model!r} (embeddings, norm, lm_head) is never reclaimed")
        if not slab.resident:
            raise RemapError(f"layer {layer} of {model!r} is already reclaimed")
        self._lend(slab)
        self._remapped[model].add(layer)
        return slab.num_pages

    def _lend(self, slab: Slab) -> None:
        """Free a resident slab's pages (no copy); on a home-run backend it keeps its home."""
        pages = slab.pages
        if not self._backend.needs_home_runs:
            self._backend.unmap_slab((slab.model, slab.index))  # before anyone else can own the pages
            slab.pages = []
        slab.resident = False
        self._pool.free(pages)

    def restore(self, model: ModelId, layer: int, evict: Callable[[list[PageId]], bool] | None = None) -> bool:
        """Bring a reclaimed layer back and copy its bytes from the host; False (nothing changes)
        if there is no room.

        Home-run backends: the layer goes back into its home run; `evict(pages)` must move whatever
        owns the busy pages of the run elsewhere (KV migration) and return False if it cannot.
        Virtual-memory backends: any `num_pages` free pages will do; `evict` is not used.
        """
        slab = self.slab(model, layer)
        if slab.resident:
            raise RemapError(f"layer {layer} of {model!r} is already resident")
        owner = Owner(OwnerKind.PARAM, model, layer)
        if self._backend.needs_home_runs:
            busy = [p for p in slab.pages if self._pool.owner(p).kind is not OwnerKind.FREE]
            if busy and (evict is None or not evict(busy)):
                return False
            if not self._pool.claim(slab.pages, owner):
                raise IntegrityError(f"evict() left pages of layer {layer} of {model!r} owned")
        else:
            pages = self._pool.alloc(slab.num_pages, owner)
            if pages is None:
                return False
            try:
                data = self._backend.map_slab((model, layer), pages)
            except BaseException:
                self._pool.free(pages)
                raise
            if data.data_ptr() != self._bytes[(model, layer)].data_ptr():
                raise IntegrityError(f"slab {model}/{layer} moved to another address: its views are stale")
            slab.pages = pages
        self._copy_in(slab)
        slab.resident = True
        self._remapped[model].discard(layer)
        return True

    def _copy_in(self, slab: Slab) -> None:
        self._transfer.wait(self._transfer.submit(self._bytes[(slab.model, slab.index)], slab.host))

    # ---- checks --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        for (model, index), slab in self._slabs.items():
            want = Owner(OwnerKind.PARAM, model, index)
            owners = {self._pool.owner(p) for p in slab.pages}
            if slab.resident and owners != {want}:
                raise IntegrityError(f"resident slab {model}/{index} has page owners {owners}")
            if not slab.resident and want in owners:
                raise IntegrityError(f"reclaimed slab {model}/{index} still owns pages")
            if self._backend.needs_home_runs:
                if any(not self._pool.is_homed(p) for p in slab.pages):
                    raise IntegrityError(f"slab {model}/{index} home run lost its homed mark")
                if slab.resident and len(slab.pages) != slab.num_pages:
                    raise IntegrityError(f"resident slab {model}/{index} has {len(slab.pages)} of "
                                         f"{slab.num_pages} pages")
            else:
                self._check_mapped(slab)
            if index != BASE_SLAB and slab.resident == (index in self._remapped[model]):
                raise IntegrityError(f"slab {model}/{index} resident={slab.resident} but remapped set says otherwise")


        if self._backend.needs_home_runs:
            homes = [p for slab in self._slabs.values() for p in slab.pages]
            marked = sum(self._pool.is_homed(PageId(p)) for p in range(self._pool.num_pages))
            if len(set(homes)) != len(homes) or marked != len(homes):
                raise IntegrityError(f"home runs overlap or marks disagree: {len(homes)} home pages, "
                                     f"{len(set(homes))} distinct, {marked} marked homed")

    def _check_mapped(self, slab: Slab) -> None:
        """Virtual-memory backends: the slab's range maps exactly its pages iff it is resident."""
        key = (slab.model, slab.index)
        mapped = self._backend.mapped_pages(key)
        want = slab.pages if slab.resident else None
        if mapped != want or (slab.resident and len(slab.pages) != slab.num_pages) or (not slab.resident and slab.pages):
            raise IntegrityError(f"slab {key} resident={slab.resident} pages {slab.pages} but mapped {mapped}")
        if any(self._pool.is_homed(p) for p in slab.pages):
            raise IntegrityError(f"slab {key} pages {slab.pages} carry homed marks on a backend with no home runs")


def _fill_host(slab: Slab, tensors: Mapping[str, torch.Tensor]) -> None:
    slab.host.zero_()
    for spec, t in zip(slab.specs, tensors.values()):
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        slab.host[spec.offset_bytes : spec.offset_bytes + spec.num_bytes].copy_(flat)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
