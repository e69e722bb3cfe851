"""StagingRing: the few slots a model's remapped layers stream through during a forward pass.

A model with alpha remapped layers computes them from staging slots instead of their (lent-out)
home pages. Layers are assigned to slots round-robin in forward order; a slot's next layer is copied
in as soon as the previous occupant is released, so with remapped layers spread evenly the copy of
remapped layer i+1 overlaps the compute of the resident layers between i and i+1:

    forward:  L0 L1 [R2] L3 L4 [R5] L6 L7 [R8] ...      R = remapped, computed from a slot
    slot 0:   copy R2 ... compute R2 | copy R8 ...
    slot 1:          copy R5 ............ compute R5 | copy R11 ...

A slot is `slot_pages` pages owned by STAGING(model, slot), as large as the model's largest layer
slab, and a uint8 tensor over them: a contiguous run of the pool on the arena, any pages mapped into
the slot's own virtual range on a vmm backend (DeviceMemory.open_stream). A slot that still holds the
right layer from the previous pass is not copied again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from remap.params import ParamStore, slab_views
from remap.transfer import Ticket, TransferEngine
from remap.types import IntegrityError, ModelId, PageId


class StagingRing:
    def __init__(
        self,
        model: ModelId,
        slots: Sequence[tuple[Sequence[PageId], torch.Tensor]],
        params: ParamStore,
        transfer: TransferEngine,
    ) -> None:
        self.model = model
        self.slot_pages = [list(pages) for pages, _ in slots]  # each slot's pages
        self._params, self._transfer = params, transfer
        self._slot_bytes = [data for _, data in slots]  # uint8 over the slot's pages
        self._holds: list[int | None] = [None] * len(slots)  # layer whose bytes a slot holds
        self._tickets: list[Ticket | None] = [None] * len(slots)
        self._order: list[int] = []  # remapped layers of this pass, forward order
        self._next = 0  # index in _order of the next layer to copy
        self.num_copies = 0  # layer copies issued (reuse of a still-valid slot is not a copy)
        self.wait_s = 0.0  # this pass's host time in copies or waits for them (inline copies count whole;
        # a CUDA wait blocks no host: the device times it, TransferEngine.take_device_wait_s)
        self.in_pass = False  # between begin_pass and finish: the slots are being read

    @property
    def num_slots(self) -> int:
        return len(self.slot_pages)

    @property
    def pages(self) -> list[PageId]:
        return [p for pages in self.slot_pages for p in pages]

    @property
    def num_pages(self) -> int:
        return sum(map(len, self.slot_pages))

    def begin_pass(self, layers: Sequence[int]) -> None:
        """Start a forward pass over these remapped layers (ascending); prefetch the first slots."""
        self.in_pass = True
        self.wait_s = 0.0
        self._order = sorted(layers)
        self._next = 0
        for _ in range(min(self.num_slots, len(self._order))):
            self._load_next()

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        """Views of `layer`'s tensors in its slot, once its copy has landed."""
        slot = self._slot_of(layer)
        ticket = self._tickets[slot]
        if ticket is not None:
            start = time.perf_counter()
            self._transfer.wait(ticket)
            self.wait_s += time.perf_counter() - start
            self._tickets[slot] = None
        return slab_views(self._params.slab(self.model, layer).specs, self._slot_bytes[slot])

    def release(self, layer: int) -> None:
        """The pass is done with `layer`; its slot takes the next pending layer."""
        self._slot_of(layer)
        if self._next < len(self._order):
            self._load_next()

    def finish(self) -> None:
        """End the pass: wait for every copy (before the slots are reassigned or freed)."""
        self.in_pass = False
        for slot, ticket in enumerate(self._tickets):
            if ticket is not None:
                self._transfer.wait(ticket)
                self._tickets[slot] = None

    def _slot_of(self, layer: int) -> int:
        try:
            slot = self._order.index(layer) % self.num_slots
        except ValueError:
            raise IntegrityError(f"layer {layer} of {self.model!r} is not streamed in this pass {self._order}")
        if self._holds[slot] != layer:
            raise IntegrityError(f"slot {slot} holds layer {self._holds[slot]}, not {layer}: release out of order")
        return slot

    def _load_next(self) -> None:
        layer = self._order[self._next]
        slot = self._next % self.num_slots
        self._next += 1
        if self._holds[slot] == layer:
            return
        slab = self._params.slab(self.model, layer)
        self._holds[slot] = layer
        start = time.perf_counter()  # an inline (synchronous) engine copies right here
        self._tickets[slot] = self._transfer.submit(self._slot_bytes[slot][: slab.num_bytes], slab.host)
        self.wait_s += time.perf_counter() - start
        self.num_copies += 1
