"""ParamStore: model parameters packed into slabs of pages, with a host master copy of each slab.

A slab is one transformer layer of one model (or the model's "base": embeddings, final norm,
lm_head, which is never reclaimed). Its tensors are packed back to back, each at a multiple of
TENSOR_ALIGN_BYTES, into `num_pages` pages:

    slab bytes: |q_proj ...|pad|k_proj ...|pad| ... |last tensor|unused tail of the last page|
                ^ offset 0      ^ offset 256k

The host keeps the same packed bytes (pinned on CUDA), so a restore is one host-to-device copy of
`num_bytes` and a staging slot can hold any layer of the model with the same layout. A tensor in an
opaque layout (oneDNN's blocked weights on the CPU, remap/opaque.py) is stored as its own bytes, its
descriptor kept in the TensorSpec, and comes back from every view in that layout.

Which pages a slab gets is the placement's choice (remap/placement.py: a fixed home run on the
arena, any pages on virtual-memory backends); this store keeps the slabs, their host copies and
device views, and takes the pages it is given.

Invariant: a slab is resident iff it has `num_pages` pages, each owned by PARAM(model, layer); a
reclaimed slab has none. Reclaim frees them without copying anything (the host copy is the truth).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from remap import opaque
from remap.backend import TENSOR_ALIGN_BYTES, Backend
from remap.pool import PagePool
from remap.transfer import TransferEngine
from remap.types import BASE_SLAB, IntegrityError, ModelId, Owner, OwnerKind, PageId, RemapError

if TYPE_CHECKING:
    from remap.placement import Placement


class TensorSpec(NamedTuple):
    name: str
    offset_bytes: int  # from the start of the slab, a multiple of TENSOR_ALIGN_BYTES
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_bytes: int
    layout: bytes | None = None  # an opaque tensor's descriptor (remap/opaque.py); None: row-major


@dataclass
class Slab:
    model: ModelId
    index: int  # layer id, or BASE_SLAB
    specs: tuple[TensorSpec, ...]
    num_bytes: int  # packed bytes (what a restore copies)
    num_pages: int
    host: torch.Tensor  # uint8 [num_bytes] master copy
    pages: list[PageId] = field(default_factory=list)  # its pages now, in slab order; [] while reclaimed
    home: list[PageId] = field(default_factory=list)  # the run HomeRuns keeps for it, reclaimed or not
    resident: bool = False


def pack_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], int]:
    """Offsets of each tensor in a slab and the slab's packed size in bytes."""
    specs, offset = [], 0
    for name, t in tensors.items():
        nbytes = opaque.num_bytes(t)
        specs.append(TensorSpec(name, offset, t.dtype, tuple(t.shape), nbytes,
                                opaque.describe(t) if opaque.is_opaque(t) else None))
        offset += _round_up(nbytes, TENSOR_ALIGN_BYTES)
    return tuple(specs), offset


def slab_num_pages(tensors: Mapping[str, torch.Tensor], page_size_bytes: int) -> int:
    """Pages one slab of these tensors occupies."""
    return -(-pack_layout(tensors)[1] // page_size_bytes)


class SlabViews(dict):
    """name -> tensor view of one slab where it lies now. `derived` caches what a model computes from
    the views once per placement (fused projections), dropped with them when the slab moves."""

    __slots__ = ("derived",)

    def __init__(self, views) -> None:
        super().__init__(views)
        self.derived: dict = {}


def slab_views(specs: Sequence[TensorSpec], data: torch.Tensor) -> SlabViews:
    """Tensor views of a slab's packed bytes `data` (device pages, a staging slot, or the host); an
    opaque tensor comes back in its own layout over the same bytes."""
    return SlabViews((s.name, _view(s, data[s.offset_bytes : s.offset_bytes + s.num_bytes])) for s in specs)


def _view(spec: TensorSpec, data: torch.Tensor) -> torch.Tensor:
    if spec.layout is not None:
        return opaque.view(data, spec.shape, spec.dtype, spec.layout)
    return data.view(spec.dtype).view(spec.shape)


class ParamStore:
    def __init__(self, pool: PagePool, backend: Backend, transfer: TransferEngine, placement: Placement) -> None:
        self._pool, self._backend, self._transfer, self._placement = pool, backend, transfer, placement
        self._slabs: dict[tuple[ModelId, int], Slab] = {}
        self._bytes: dict[tuple[ModelId, int], torch.Tensor] = {}  # uint8 [num_bytes] device view per slab
        self._views: dict[tuple[ModelId, int], dict[str, torch.Tensor]] = {}
        self._num_layers: dict[ModelId, int] = {}
        # Reclaimed layer ids per model (kept in step), replaced on every change: the engine and the
        # controller read them several times a step, and they change only on reclaims and restores.
        self._remapped: dict[ModelId, frozenset[int]] = {}
        self._max_layer_pages: dict[ModelId, int] = {}
        self._max_layer_bytes: dict[ModelId, int] = {}

    # ---- registration --------------------------------------------------------------------
    def register(
        self, model: ModelId, layers: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor],
        max_lent: int = 0,
    ) -> None:
        """Pack a model's tensors into pages the placement gives: the base first, then layer by
        layer. All or nothing.

        When a layer finds no room, up to `max_lent` of the model's own placed layers are lent at
        once (reclaimed: their host copy is the truth) to make it: a model that fits only by lending
        its own layers loads that way, and gets them back when the controller restores them."""
        if model in self._num_layers:
            raise RemapError(f"model {model!r} is already registered")
        if not layers or any(not layer for layer in layers) or not base:
            raise RemapError(f"model {model!r} needs >= 1 non-empty layer and non-empty base tensors")
        parts = [(BASE_SLAB, base)] + [(i, layer) for i, layer in enumerate(layers)]
        layouts = [pack_layout(t) for _, t in parts]
        page = self._pool.page_size_bytes
        need = sum(-(-nbytes // page) for _, nbytes in layouts)
        # with up to max_lent layers lent, the fewest pages it can load into: the largest ones lent
        most_lent = sum(sorted((-(-nbytes // page) for _, nbytes in layouts[1:]), reverse=True)[:max_lent])
        if need - most_lent > self._pool.num_pages:
            lent = f" ({need - most_lent} with {max_lent} of its layers lent)" if max_lent else ""
            raise RemapError(
                f"model {model!r} needs {need} pages of {page} B{lent} but the pool has only {self._pool.num_pages}"
            )
        free = self._pool.num_free
        self._num_layers[model] = len(layers)
        self._remapped[model] = frozenset()
        # One host buffer for the whole model, a slice per slab: CUDA's caching host allocator rounds
        # each pinned allocation up to a power of two (a 436 MB layer would take 512 MiB).
        starts = list(itertools.accumulate((_round_up(n, TENSOR_ALIGN_BYTES) for _, n in layouts), initial=0))
        host = self._backend.host_copy(starts[-1])
        try:
            for (i, tensors), (specs, nbytes), start in zip(parts, layouts, starts):
                slab = Slab(model, i, specs, nbytes, -(-nbytes // page), host[start : start + nbytes])
                while (pages := self._placement.place(slab)) is None:
                    if len(self._remapped[model]) >= max_lent or not self._lend_own(model, i):
                        runs = self._placement.shortfall(max(-(-n // page) for _, n in layouts))
                        lent = f" ({max_lent} of its layers may start lent)" if max_lent else ""
                        raise RemapError(f"model {model!r} needs {need} pages{runs}{lent}; only {free} pages are free")
                _fill_host(slab, tensors)
                self._slabs[(model, i)] = slab
                self._occupy(slab, pages)
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
        self._remapped[model] = lent | {layer}
        return True

    def _unregister(self, model: ModelId) -> None:
        """Undo a failed registration: resident slabs give their pages back, homes are dropped."""
        for key in [k for k in self._slabs if k[0] == model]:
            slab = self._slabs.pop(key)
            if slab.resident:
                self._lend(slab)
            self._placement.forget(slab)
            self._bytes.pop(key, None)
            self._views.pop(key, None)
        for table in (self._num_layers, self._remapped):
            table.pop(model, None)

    def close(self) -> None:
        """Free every host copy (DeviceMemory.close): each model's one buffer, through any of its slabs."""
        for slab in self._slabs.values():
            slab.host.untyped_storage().resize_(0)

    # ---- queries -------------------------------------------------------------------------
    @property
    def models(self) -> list[ModelId]:
        return list(self._num_layers)

    def slabs(self) -> Iterator[Slab]:
        """Every registered slab (the placement's integrity check and home bookkeeping walk them)."""
        return iter(list(self._slabs.values()))

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
        return self._remapped[model]

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

    def move(self, model: ModelId, layer: int, pages: list[PageId]) -> None:
        """Move a resident slab onto `pages`, which must be free once its own are (the arena's
        compaction). Its bytes come again from the host copy."""
        slab = self.slab(model, layer)
        if not slab.resident:
            raise RemapError(f"only a resident slab moves, not {model}/{layer}")
        self._backend.unmap_slab((model, layer))
        self._pool.free(slab.pages)
        if not self._pool.claim(pages, Owner(OwnerKind.PARAM, model, layer)):
            raise IntegrityError(f"slab {model}/{layer} cannot move to {pages[0]}: the run is not free")
        slab.pages = []
        self._occupy(slab, pages)

    def _occupy(self, slab: Slab, pages: list[PageId]) -> None:
        """Put a slab on `pages` (claimed for it): map them into its range, rebuild its byte and
        tensor views, and copy its bytes in from the host. If that fails the pages go back."""
        key = (slab.model, slab.index)
        try:
            self._bytes[key] = self._backend.map_slab(key, pages)[: slab.num_bytes]
        except BaseException:
            self._pool.free(pages)
            raise
        self._views[key] = slab_views(slab.specs, self._bytes[key])
        slab.pages = pages
        self._copy_in(slab)
        slab.resident = True

    # ---- reclaim / restore ---------------------------------------------------------------
    def reclaim(self, model: ModelId, layer: int) -> int:
        """Free a resident layer's pages with no copy; returns the number of pages freed."""
        slab = self.slab(model, layer)
        if layer == BASE_SLAB:
            raise RemapError(f"the base slab of {model!r} (embeddings, norm, lm_head) is never reclaimed")
        if not slab.resident:
            raise RemapError(f"layer {layer} of {model!r} is already reclaimed")
        self._lend(slab)
        self._remapped[model] = self._remapped[model] | {layer}
        return slab.num_pages

    def _lend(self, slab: Slab) -> None:
        """Free a resident slab's pages (no copy); its range stops reaching them first."""
        self._backend.unmap_slab((slab.model, slab.index))  # before anyone else can own the pages
        pages, slab.pages, slab.resident = slab.pages, [], False
        self._pool.free(pages)

    def restore(self, model: ModelId, layer: int, pages: list[PageId]) -> None:
        """Bring a reclaimed layer back onto `pages` (chosen and claimed for it by the placement)
        and copy its bytes from the host."""
        slab = self.slab(model, layer)
        if slab.resident:
            raise RemapError(f"layer {layer} of {model!r} is already resident")
        self._occupy(slab, pages)
        self._remapped[model] = self._remapped[model] - {layer}

    def _copy_in(self, slab: Slab) -> None:
        self._transfer.wait(self._transfer.submit(self._bytes[(slab.model, slab.index)], slab.host))

    # ---- checks --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Ownership and the lent set; where pages may lie is the placement's check."""
        for (model, index), slab in self._slabs.items():
            want = Owner(OwnerKind.PARAM, model, index)
            owners = {self._pool.owner(p) for p in slab.pages}
            if slab.resident and owners != {want}:
                raise IntegrityError(f"resident slab {model}/{index} has page owners {owners}")
            if not slab.resident and slab.pages:
                raise IntegrityError(f"reclaimed slab {model}/{index} still holds pages {slab.pages[:8]}")
            if index != BASE_SLAB and slab.resident == (index in self._remapped[model]):
                raise IntegrityError(f"slab {model}/{index} resident={slab.resident} but remapped set says otherwise")


def _fill_host(slab: Slab, tensors: Mapping[str, torch.Tensor]) -> None:
    slab.host.zero_()
    for spec, t in zip(slab.specs, tensors.values()):
        flat = opaque.raw_bytes(t) if spec.layout is not None else t.detach().contiguous().view(-1).view(torch.uint8)
        slab.host[spec.offset_bytes : spec.offset_bytes + spec.num_bytes].copy_(flat)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

