"""Where the bytes of a device's pages physically live.

The pool decides who owns a page; a backend holds the page's bytes and gives out tensor views.
Two kinds of backend fit this seam:

- `ArenaBackend` (here): one preallocated torch buffer on any device. Page p is the byte range
  [p * page_size, (p + 1) * page_size). A layer slab's tensors are views into a fixed contiguous run
  of pages (its "home"), so restoring a layer needs exactly those pages back.
- virtual-memory backends (remap/vmm.py: `HostVmmBackend`, `CudaVmmBackend`): the same flat "pool
  range" of pages, plus one reserved virtual range per slab into which the slab's current physical
  pages, any ids, are mapped on demand, so a slab can be restored into any free pages.
  `map_slab` / `unmap_slab` do the real work there.

`needs_home_runs` says which of the two a backend is; DeviceMemory reads it once, to choose its
placement (remap/placement.py).

A model's KV view is one tensor over all pages, indexed by page id = KV block id:

    kv[page, layer, k_or_v, token_in_block, kv_head, head_dim]

with the first stride equal to one page, so blocks of different models share the same pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from remap.types import IntegrityError, ModelId, PageId, RemapError

TENSOR_ALIGN_BYTES = 256  # every packed tensor starts at a multiple of this (CUDA's malloc alignment)


class Backend(ABC):
    """Bytes of `num_pages` pages of `page_size_bytes` each on one device."""

    device: torch.device
    num_pages: int
    page_size_bytes: int
    needs_home_runs: bool  # True: a slab can only live in its own contiguous run of pages

    @abstractmethod
    def run_bytes(self, first: PageId, num_pages: int) -> torch.Tensor:
        """uint8 view of `num_pages` contiguous pages starting at `first`."""

    @abstractmethod
    def kv_view(self, model: ModelId, shape_per_page: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Tensor [num_pages, *shape_per_page] whose row p lies in page p."""

    @abstractmethod
    def copy_pages(self, src: Sequence[PageId], dst: Sequence[PageId], num_bytes: int) -> None:
        """Device-local copy of the first `num_bytes` of each src page into the matching dst page."""

    @abstractmethod
    def read_pages(self, pages: Sequence[PageId], num_bytes: int, out: torch.Tensor) -> None:
        """Copy the first `num_bytes` of each page into rows of the host tensor `out` [n, num_bytes]."""

    @abstractmethod
    def write_pages(self, pages: Sequence[PageId], num_bytes: int, data: torch.Tensor) -> None:
        """Inverse of read_pages."""

    # ---- slab ranges (home-run backends: the slab's range is its run of the pool) ------------
    def map_slab(self, key: tuple[ModelId, int], pages: Sequence[PageId]) -> torch.Tensor:
        """uint8 view of a slab's bytes with `pages` (in order) behind it.

        Home-run backends can only map a slab onto a contiguous run; virtual-memory backends map
        any pages into the slab's own range and return the same tensor (same address) every time.
        """
        first = pages[0]
        if list(pages) != list(range(first, first + len(pages))):
            raise IntegrityError(f"slab {key} on pages {list(pages)[:8]}...: a home-run backend needs a contiguous run")
        return self.run_bytes(first, len(pages))

    def unmap_slab(self, key: tuple[ModelId, int]) -> None:
        """The slab's pages go to other owners: its range must no longer reach them."""

    def mapped_pages(self, key: tuple[ModelId, int]) -> list[PageId] | None:
        """Pages mapped into a slab's own range now (None: unmapped, or no ranges of its own)."""
        return None

    def host_copy(self, num_bytes: int) -> torch.Tensor:
        """An uninitialized uint8 host buffer for a slab's master copy (pinned for CUDA devices)."""
        return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def close(self) -> None:
        """Give the device memory back; every view handed out is invalid afterwards."""


def check_page_size(page_size_bytes: int, granularity_bytes: int = TENSOR_ALIGN_BYTES, what: str = "the tensor alignment") -> None:
    if page_size_bytes <= 0 or page_size_bytes % granularity_bytes:
        raise RemapError(
            f"page size {page_size_bytes} B is not a positive multiple of {what} {granularity_bytes} B"
        )


class FlatBackend(Backend):
    """Page p is row p of one flat uint8 tensor `_buffer` (the arena, or a VMM pool range)."""

    _buffer: torch.Tensor  # uint8 [num_pages * page_size_bytes]
    _pages: torch.Tensor  # the same bytes as [num_pages, page_size_bytes]

    def run_bytes(self, first: PageId, num_pages: int) -> torch.Tensor:
        start = first * self.page_size_bytes
        return self._buffer[start : start + num_pages * self.page_size_bytes]

    def kv_view(self, model: ModelId, shape_per_page: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        elems = self._buffer.view(dtype)
        inner = list(shape_per_page)
        strides = [1] * len(inner)
        for i in range(len(inner) - 2, -1, -1):
            strides[i] = strides[i + 1] * inner[i + 1]
        if strides[0] * inner[0] * itemsize > self.page_size_bytes:
            raise RemapError(f"KV block shape {inner} of {dtype} exceeds a page of {self.page_size_bytes} B")
        return elems.as_strided([self.num_pages, *inner], [self.page_size_bytes // itemsize, *strides])

    def copy_pages(self, src: Sequence[PageId], dst: Sequence[PageId], num_bytes: int) -> None:
        src_idx = torch.as_tensor(list(src), dtype=torch.long, device=self.device)
        dst_idx = torch.as_tensor(list(dst), dtype=torch.long, device=self.device)
        self._pages[dst_idx, :num_bytes] = self._pages[src_idx, :num_bytes]

    def read_pages(self, pages: Sequence[PageId], num_bytes: int, out: torch.Tensor) -> None:
        idx = torch.as_tensor(list(pages), dtype=torch.long, device=self.device)
        out.copy_(self._pages[idx, :num_bytes])

    def write_pages(self, pages: Sequence[PageId], num_bytes: int, data: torch.Tensor) -> None:
        idx = torch.as_tensor(list(pages), dtype=torch.long, device=self.device)
        self._pages[idx, :num_bytes] = data.to(self.device, non_blocking=True)


class ArenaBackend(FlatBackend):
    needs_home_runs = True

    def __init__(self, num_pages: int, page_size_bytes: int, device: torch.device | str = "cpu") -> None:
        check_page_size(page_size_bytes)
        self.device = torch.device(device)
        self.num_pages = num_pages
        self.page_size_bytes = page_size_bytes
        # torch.empty: pages hold garbage until an owner writes them, like freshly mapped memory.
        self._buffer = torch.empty(num_pages * page_size_bytes, dtype=torch.uint8, device=self.device)
        self._pages = self._buffer.view(num_pages, page_size_bytes)

    def close(self) -> None:
        self._buffer.untyped_storage().resize_(0)  # the bytes go now, whatever views still point at them
