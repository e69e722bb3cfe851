"""KVBlocks: one model's KV cache as blocks in the shared page pool, with per-sequence block tables.

One page holds one block: keys and values of every layer for `block_size` consecutive tokens,

    page p:  [layer 0: K(block_size x kv_heads x head_dim) V(...)] [layer 1: K V] ... [unused tail]

so a sequence has one block table, the block id is the page id, and the model's KV view is a single
tensor `view[page, layer, 0 or 1, token, kv_head, dim]` over all pages of the pool.

Invariant: a page is owned by KV(model, seq) iff it appears exactly once in that sequence's table.
A swapped-out sequence holds no pages; its blocks sit in a host tensor until swap_in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from remap.backend import Backend
from remap.pool import PagePool
from remap.types import IntegrityError, ModelId, Owner, OwnerKind, PageId, RemapError, SeqId


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize


MAX_FINDS = 6  # migrate: blocks of one table found one by one; more rebuild the table in one pass


class KVBlocks:
    def __init__(self, model: ModelId, geometry: KVGeometry, pool: PagePool, backend: Backend) -> None:
        per_token = geometry.bytes_per_token
        self.block_size = pool.page_size_bytes // per_token  # tokens per block
        if self.block_size == 0:
            raise RemapError(
                f"one token of {model!r} needs {per_token} B of KV, more than a page of {pool.page_size_bytes} B"
            )
        self.model, self.geometry = model, geometry
        self.block_bytes = self.block_size * per_token  # bytes of a page a block actually uses
        g = geometry
        self.view = backend.kv_view(model, (g.num_layers, 2, self.block_size, g.num_kv_heads, g.head_dim), g.dtype)
        self._pool, self._backend = pool, backend
        self._tables: dict[SeqId, list[PageId]] = {}
        self._owners: dict[SeqId, Owner] = {}
        self._swapped: dict[SeqId, torch.Tensor] = {}  # host [num_blocks, block_bytes]
        self._num_used = 0  # pages in all tables (read every step by the scheduler and the controller)

    # ---- queries -------------------------------------------------------------------------
    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq: SeqId) -> list[PageId]:
        """The sequence's block table (the live list: read it, do not edit it)."""
        return self._tables.get(seq, [])

    @property
    def num_pages_used(self) -> int:
        return self._num_used

    @property
    def num_free_pages(self) -> int:
        """Free pages of the pool its blocks come from (shared with every other owner)."""
        return self._pool.num_free

    @property
    def sequences(self) -> list[SeqId]:
        return list(self._tables)

    def is_swapped(self, seq: SeqId) -> bool:
        return seq in self._swapped

    @property
    def num_swapped(self) -> int:
        """Sequences whose blocks are on the host now."""
        return len(self._swapped)

    def num_swapped_blocks(self, seq: SeqId) -> int:
        return len(self._swapped[seq]) if seq in self._swapped else 0

    # ---- alloc / free --------------------------------------------------------------------
    def alloc(self, seq: SeqId, num_blocks: int) -> list[PageId] | None:
        """Append `num_blocks` blocks to the sequence's table; None (nothing changes) if no room."""
        if seq in self._swapped:
            raise RemapError(f"sequence {seq} of {self.model!r} is swapped out; swap it in first")
        owner = self._owners.get(seq)
        if owner is None:
            owner = self._owners[seq] = Owner(OwnerKind.KV, self.model, seq)
        pages = self._pool.alloc(num_blocks, owner)
        if pages is None:
            if seq not in self._tables:
                del self._owners[seq]
            return None
        table = self._tables.get(seq)
        if table is None:
            self._tables[seq] = pages
        else:
            table.extend(pages)
        self._num_used += num_blocks
        return pages

    def free(self, seq: SeqId) -> int:
        """Drop the sequence's blocks (on device or swapped); returns pages freed on device."""
        self._swapped.pop(seq, None)
        self._owners.pop(seq, None)
        table = self._tables.pop(seq, None)
        if not table:
            return 0
        self._pool.free(table)
        self._num_used -= len(table)
        return len(table)

    # ---- migrate / swap ------------------------------------------------------------------
    def migrate(self, pages: Sequence[PageId], dst: Sequence[PageId]) -> None:
        """Move blocks to other pages (already allocated to this model by the caller), contents kept.

        The destination pages must be owned by this model's KV (any sequence); afterwards each
        source page is free and each destination holds the block in its sequence's table.
        """
        if len(pages) != len(dst):
            raise RemapError(f"migrate needs as many destinations ({len(dst)}) as blocks ({len(pages)})")
        owners = [self._pool.owner(p) for p in pages]
        for src, owner in zip(pages, owners):
            if owner.kind is not OwnerKind.KV or owner.model != self.model:
                raise IntegrityError(f"page {src} is {owner}, not a KV block of {self.model!r}")
        self._backend.copy_pages(pages, dst, self.block_bytes)
        moves: dict[SeqId, dict[PageId, PageId]] = {}  # per touched table: source -> destination
        for src, new, owner in zip(pages, dst, owners):
            moves.setdefault(owner.index, {})[src] = new  # a KV owner's index is its SeqId
        for seq, move in moves.items():
            table = self._tables[seq]
            # A find scans half the table on average at about a third of the rebuild's cost per entry
            # (a 1000-block table: ~7 us a find, ~45 us the rebuild), so finds pay for a few blocks only
            if len(move) < MAX_FINDS:
                for src, new in move.items():
                    table[table.index(src)] = new
            else:
                table[:] = [move.get(p, p) for p in table]
        self._pool.reassign(dst, owners)
        self._pool.free(pages)

    def swap_out(self, seq: SeqId) -> int:
        """Copy the sequence's blocks to host memory and free their pages; returns blocks moved."""
        table = self._tables.pop(seq, None)
        if table is None:
            raise RemapError(f"sequence {seq} of {self.model!r} holds no blocks on device")
        host = torch.empty(len(table), self.block_bytes, dtype=torch.uint8, pin_memory=self._pinned)
        self._backend.read_pages(table, self.block_bytes, host)
        self._swapped[seq] = host
        self._pool.free(table)
        self._num_used -= len(table)
        return len(table)

    def swap_in(self, seq: SeqId) -> list[PageId] | None:
        """Bring a swapped sequence back into new pages; None (still swapped) if no room."""
        host = self._swapped.get(seq)
        if host is None:
            raise RemapError(f"sequence {seq} of {self.model!r} is not swapped out")
        pages = self._pool.alloc(len(host), self._owners[seq])
        if pages is None:
            return None
        self._backend.write_pages(pages, self.block_bytes, host)
        del self._swapped[seq]
        self._tables[seq] = pages
        self._num_used += len(pages)
        return pages

    @property
    def _pinned(self) -> bool:
        return self._backend.device.type == "cuda"

    # ---- checks --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        seen: set[PageId] = set()
        for seq, table in self._tables.items():
            want = Owner(OwnerKind.KV, self.model, seq)
            for p in table:
                if p in seen:
                    raise IntegrityError(f"page {p} appears twice in {self.model!r} block tables")
                seen.add(p)
                if self._pool.owner(p) != want:
                    raise IntegrityError(f"page {p} in table of seq {seq} is owned by {self._pool.owner(p)}")
            if seq in self._swapped:
                raise IntegrityError(f"seq {seq} of {self.model!r} is both on device and swapped")
        if self._num_used != len(seen):
            raise IntegrityError(f"{self._num_used} pages counted in use, {len(seen)} in {self.model!r} block tables")
        if set(self._owners) != set(self._tables) | set(self._swapped):
            raise IntegrityError(f"owner cache {sorted(self._owners)} != live sequences of {self.model!r}")
