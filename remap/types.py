"""Identifiers and page ownership shared by every part of the memory engine.

Every physical page of a device has exactly one `Owner` at a time. The owner says who may read or
write the page's bytes: nobody (FREE), one layer slab of one model's parameters (PARAM), one KV
block of one model (KV), or one staging slot of a model's streamed layers (STAGING).
"""

from __future__ import annotations

import enum
from typing import NamedTuple, NewType

PageId = NewType("PageId", int)  # index of a physical page in a device pool; also the KV block id
ModelId = NewType("ModelId", str)  # tenant name, unique per engine
SeqId = NewType("SeqId", int)  # one sequence (request) of one model


class OwnerKind(enum.IntEnum):
    FREE = 0
    PARAM = 1  # index = layer id, or BASE_SLAB for embeddings / final norm / lm_head
    KV = 2  # index = sequence id that holds the block
    STAGING = 3  # index = staging slot number


BASE_SLAB = 1 << 30  # slab index of a model's non-layer parameters (never reclaimed)


class Owner(NamedTuple):
    kind: OwnerKind
    model: ModelId | None  # None only for FREE
    index: int  # meaning depends on kind (see OwnerKind); 0 for FREE

    def __str__(self) -> str:
        if self.kind is OwnerKind.FREE:
            return "free"
        return f"{self.kind.name.lower()}({self.model}, {self.index})"


FREE = Owner(OwnerKind.FREE, None, 0)


class RemapError(Exception):
    """A request that the memory engine can never satisfy (bad config, bad ids, too big)."""


class IntegrityError(AssertionError):
    """A broken invariant of the memory engine: a bug, never a capacity miss."""
