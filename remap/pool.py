"""PagePool: who owns each physical page of one device.

The pool deals only in integer page ids and `Owner` values, never in bytes (the backend holds the
bytes). Invariant, checked by `check_integrity()`: every page has exactly one owner, and a page is in
exactly one free list iff its owner is FREE.

Free pages sit in two tiers so that KV allocation disturbs parameters as little as possible:

    plain  pages that are no layer's home: taken first (LIFO, cache-warm)
    homed  pages of reclaimed layer slabs (the arena backend restores a layer into its home run):
           taken only when plain is empty, oldest reclaim first, so the best victims' pages are
           lent out before those of layers reclaimed later.

Capacity misses return None; bad ids and double frees raise.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice

import numpy as np

from remap.types import FREE, IntegrityError, Owner, OwnerKind, PageId, RemapError

_FREE = int(OwnerKind.FREE)  # for array comparisons: numpy probes an IntEnum operand for array hooks (~3 us)


class PagePool:
    def __init__(self, num_pages: int, page_size_bytes: int) -> None:
        if num_pages <= 0:
            raise RemapError(f"a pool needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        self.page_size_bytes = page_size_bytes
        self._owner: list[Owner] = [FREE] * num_pages
        self._homed = np.zeros(num_pages, dtype=bool)  # where the page is some layer slab's home
        # Owner kind per page, mirrored from _owner so that run searches are array scans, not loops
        # over Python objects (a GH200 pool has ~40k pages).
        self._kinds = np.zeros(num_pages, dtype=np.int8)
        self._free_plain: dict[PageId, None] = dict.fromkeys(PageId(p) for p in reversed(range(num_pages)))
        self._free_homed: OrderedDict[PageId, None] = OrderedDict()
        self._num_by_kind = [0] * len(OwnerKind)
        self._num_by_kind[OwnerKind.FREE] = num_pages

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_by_kind[OwnerKind.FREE]

    def num_owned_by(self, kind: OwnerKind) -> int:
        return self._num_by_kind[kind]

    def owner(self, page: PageId) -> Owner:
        return self._owner[page]

    def is_homed(self, page: PageId) -> bool:
        return bool(self._homed[page])

    def having(self, pages: Iterable[PageId], kind: OwnerKind, other_than: bool = False) -> list[PageId]:
        """The pages, in order, whose owner is of `kind` (or of any other kind): one array lookup,
        not one per page (a layer's slab on a GH200 pool is hundreds of pages)."""
        idx = _index(list(pages))
        kinds = self._kinds[idx]
        kind = int(kind)  # numpy probes an IntEnum operand for array hooks, which costs more than the scan
        return idx[(kinds != kind) if other_than else (kinds == kind)].tolist()

    def find_free_run(self, num_pages: int, homed_ok: bool = False) -> PageId | None:
        """First id of `num_pages` contiguous free pages (plain ones only unless `homed_ok`)."""
        usable = self._kinds == _FREE
        if not homed_ok:
            usable &= ~self._homed
        return first_run(usable, num_pages)

    def kinds(self) -> np.ndarray:
        """Owner kind of every page (read-only view; OwnerKind values)."""
        view = self._kinds.view()
        view.flags.writeable = False
        return view

    # ---- alloc / free --------------------------------------------------------------------
    def alloc(self, num_pages: int, owner: Owner) -> list[PageId] | None:
        """`num_pages` free pages now owned by `owner`, or None (nothing changes) if too few: plain
        pages last freed first, then homed ones oldest first, as popping them one at a time would."""
        if num_pages > self._num_by_kind[OwnerKind.FREE]:
            return None
        if num_pages == 0:  # a decode step whose token fits the last block: most of a sequence's growths
            return []
        plain, owners = self._free_plain, self._owner
        if num_pages == 1:  # a decode's block: a scalar store, not an array built from a list
            page = plain.popitem()[0] if plain else self._free_homed.popitem(last=False)[0]
            owners[page] = owner
            self._kinds[page] = owner.kind
            pages = [page]
        else:  # a prompt's blocks (a thousand on a GH200 pool): read the ends of the tiers, then delete
            pages = list(islice(reversed(plain), num_pages))
            for page in pages:
                del plain[page]
                owners[page] = owner
            if len(pages) < num_pages:
                homed = self._free_homed
                oldest = list(islice(homed, num_pages - len(pages)))
                for page in oldest:
                    del homed[page]
                    owners[page] = owner
                pages += oldest
            self._kinds[_index(pages)] = owner.kind
        self._num_by_kind[OwnerKind.FREE] -= num_pages
        self._num_by_kind[owner.kind] += num_pages
        return pages

    def claim(self, pages: Sequence[PageId], owner: Owner) -> bool:
        """Take these specific pages if all are free; False (nothing changes) otherwise."""
        self._check_ids(pages)
        idx = _index(pages)
        if (self._kinds[idx] != _FREE).any() or len(set(pages)) != len(pages):
            return False
        homed = self._homed[idx]
        for p in idx[homed].tolist():
            del self._free_homed[p]
        for p in idx[~homed].tolist():
            del self._free_plain[p]
        owners = self._owner
        for p in pages:
            owners[p] = owner
        self._kinds[idx] = owner.kind
        self._num_by_kind[OwnerKind.FREE] -= len(pages)
        self._num_by_kind[owner.kind] += len(pages)
        return True

    def free(self, pages: Iterable[PageId]) -> None:
        """Free owned pages; a page already free, or named twice, raises before anything changes.
        Array lookups, not per-page ones: a layer's slab on a GH200 pool is hundreds of pages."""
        pages = list(pages)
        if not pages:
            return
        idx = _index(pages)
        kinds = self._kinds[idx]
        if (kinds == _FREE).any() or len(set(pages)) != len(pages):
            seen: set[PageId] = set()
            for p in pages:
                if self._owner[p].kind is OwnerKind.FREE or p in seen:
                    raise IntegrityError(f"double free of page {p}")
                seen.add(p)
        counts = self._num_by_kind
        for kind, n in enumerate(np.bincount(kinds, minlength=len(OwnerKind)).tolist()):
            counts[kind] -= n
        counts[OwnerKind.FREE] += len(pages)
        owners = self._owner
        for p in pages:
            owners[p] = FREE
        homed = self._homed[idx]
        if homed.any():  # each tier gets its pages in the order given, as one insertion at a time would
            _append(self._free_plain, idx[~homed].tolist())
            _append(self._free_homed, idx[homed].tolist())
        else:
            _append(self._free_plain, pages)
        self._kinds[idx] = OwnerKind.FREE

    @contextmanager
    def withheld(self, pages: Iterable[PageId]) -> Iterator[None]:
        """Inside the block the free ones among `pages` are out of reach of `alloc` and not counted in
        `num_free` (an eviction's destinations must land outside the run it clears); they stay FREE and
        go back to their tier on exit, as `free` would put them. Nothing else may own them meanwhile."""
        idx = _index(list(pages))
        held = idx[self._kinds[idx] == _FREE]
        homed = self._homed[held]
        for p in held[homed].tolist():
            del self._free_homed[p]
        for p in held[~homed].tolist():
            del self._free_plain[p]
        self._num_by_kind[OwnerKind.FREE] -= len(held)
        try:
            yield
        finally:
            homed = self._homed[held]  # each tier gets its pages back in page order
            _append(self._free_plain, held[~homed].tolist())
            _append(self._free_homed, held[homed].tolist())
            self._num_by_kind[OwnerKind.FREE] += len(held)

    def reassign(self, pages: Iterable[PageId], owner: Owner | Sequence[Owner]) -> None:
        """Hand owned pages to a new owner of any kind (e.g. a KV block to another sequence), or each
        page to its own owner when `owner` is a sequence of them."""
        pages = list(pages)
        owners = [owner] * len(pages) if isinstance(owner, Owner) else list(owner)
        if len(owners) != len(pages):
            raise IntegrityError(f"reassign of {len(pages)} pages to {len(owners)} owners")
        owner_of, counts = self._owner, self._num_by_kind
        for p, owner in zip(pages, owners):
            old = owner_of[p]
            if old.kind is OwnerKind.FREE:
                raise IntegrityError(f"reassign of free page {p} to {owner}")
            if owner.kind is not old.kind:  # a KV block handed to another sequence keeps its counts and mirror
                counts[old.kind] -= 1
                counts[owner.kind] += 1
                self._kinds[p] = owner.kind
            owner_of[p] = owner

    def set_homed(self, pages: Iterable[PageId], homed: bool) -> None:
        """Mark pages as a layer slab's home run (or not); moves free ones between tiers."""
        for p in pages:
            was = bool(self._homed[p])
            self._homed[p] = homed
            if was != homed and self._owner[p].kind is OwnerKind.FREE:
                if homed:
                    del self._free_plain[p]
                    self._free_homed[p] = None
                else:
                    del self._free_homed[p]
                    self._free_plain[p] = None

    # ---- checks --------------------------------------------------------------------------
    def _check_ids(self, pages: Iterable[PageId]) -> None:
        for p in pages:  # an exact int: a float would pass the range check and fail after changes began
            if type(p) is not int or not 0 <= p < self.num_pages:
                raise RemapError(f"page id {p!r} is not an int in the pool's 0..{self.num_pages - 1}")

    def check_integrity(self) -> None:
        counts = [0] * len(OwnerKind)
        for p, owner in enumerate(self._owner):
            counts[owner.kind] += 1
            is_free = owner.kind is OwnerKind.FREE
            in_plain, in_homed = p in self._free_plain, p in self._free_homed
            if is_free != (in_plain or in_homed) or (in_plain and in_homed):
                raise IntegrityError(f"page {p} owner={owner} plain={in_plain} homed={in_homed}")
            if is_free and in_homed != bool(self._homed[p]):
                raise IntegrityError(f"free page {p} in the wrong tier (homed flag {self._homed[p]})")
            if is_free != (owner.model is None):
                raise IntegrityError(f"page {p} owner {owner} names no model")
        if counts != self._num_by_kind:
            raise IntegrityError(f"owner counts {counts} != tracked {self._num_by_kind}")
        mirrored = np.array([o.kind for o in self._owner], dtype=np.int8)
        if not np.array_equal(mirrored, self._kinds):
            bad = np.flatnonzero(mirrored != self._kinds)[:5].tolist()
            raise IntegrityError(f"kind mirror disagrees with owners at pages {bad}")

    def summary(self) -> dict[str, int]:
        """Pages per owner kind, e.g. {'free': 10, 'param': 20, 'kv': 2, 'staging': 0}."""
        return {k.name.lower(): self._num_by_kind[k] for k in OwnerKind}


def window_sums(flags: np.ndarray, width: int) -> np.ndarray:
    """Sum of `flags` over every window of `width` consecutive pages; index = window start.

    In int32 (a pool has fewer than 2**31 pages): int64 sums over a GH200 pool (~40k pages) take
    ~10x longer here, in the allocation of their 320 KB results."""
    if width <= 0 or width > len(flags):
        return np.zeros(0, dtype=np.int32)
    c = np.zeros(len(flags) + 1, dtype=np.int32)
    np.cumsum(flags, dtype=np.int32, out=c[1:])
    return c[width:] - c[:-width]


def first_run(flags: np.ndarray, width: int) -> PageId | None:
    """Start of the first `width` consecutive set `flags` (bools), or None: the start of the first
    run of set flags at least that long, found from the runs' edges rather than from window sums."""
    if width <= 0 or width > len(flags):
        return None
    padded = np.zeros(len(flags) + 2, dtype=bool)
    padded[1:-1] = flags
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # alternately a run's first page and the page after it
    starts, ends = edges[::2], edges[1::2]
    long = np.flatnonzero(ends - starts >= width)
    return PageId(int(starts[long[0]])) if long.size else None


def _append(tier: dict[PageId, None], pages: Iterable[PageId]) -> None:
    """Put pages at the end of a tier, one by one: OrderedDict.update takes the generic mapping path
    and costs twice as much per page, and a dict's update(dict.fromkeys(...)) builds a second dict."""
    for p in pages:
        tier[p] = None


def _index(pages: Sequence[PageId]) -> np.ndarray:
    """Page ids as an index array: a list of hundreds of ids converts faster this way than by numpy's
    fancy indexing with the list itself (which converts it again for every array it indexes)."""
    return np.fromiter(pages, dtype=np.intp, count=len(pages))
