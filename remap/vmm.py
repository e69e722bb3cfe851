"""Virtual-memory backends: a layer slab is restored into ANY free pages, with no KV migration.

The design of vAttention and of CUDA's virtual memory management (cuMemCreate / cuMemMap): physical
pages are separate from the virtual addresses they are seen at, and one physical page can be mapped
at several addresses at once. A backend here keeps two kinds of virtual range:

    pool range  (one, for the backend's lifetime): physical page p is mapped at offset p * page_size,
                always. run_bytes, kv_view, copy_pages, read/write_pages work on it exactly as the
                arena does, so KV blocks (indexed by page id) and staging runs are unchanged.

    slab range  (one per layer slab, reserved at its first map and kept until close): the slab's
                current physical pages, any ids, mapped in order. Its tensor has a fixed address, so
                the model's views of the slab stay valid across reclaim / restore.

        pool range:  | p0 | p1 | p2 | p3 | p4 | p5 | p6 | p7 |
                              ^         ^              ^
        slab (m, 3): | p7 | p1 | p4 |     (after a restore that found pages 7, 1 and 4 free)

Invariant: a slab range maps its pages iff the slab is resident (ParamStore owns them as
PARAM(model, layer)); `unmap_slab` leaves the range reserved with nothing behind it, so a stale
view faults instead of reading the page's next owner.

Two implementations share the bookkeeping here and provide five primitives each
(`_granularity`, `_reserve`, `_map`, `_unmap`, `_tensor`):

- `HostVmmBackend` (CPU, Linux): a memfd holds the physical pages, mmap(MAP_SHARED | MAP_FIXED)
  maps file pages into reserved PROT_NONE ranges. This is a real remap on the host, done by the
  kernel's page tables, the same mechanism as cuMemMap on a GPU, not an emulation: a write through
  the slab range is the same byte as seen through the pool range.
- `CudaVmmBackend` (CUDA): one cuMemCreate handle per page, cuMemAddressReserve for every range,
  cuMemMap + cuMemSetAccess to map, cuMemUnmap to unmap (cuda-python driver bindings, no C++ build).

Lifetime: every tensor handed out keeps a small `_Mappings` object alive, which frees the ranges
and the physical memory when the last view dies; `close()` frees them at once (views are invalid
afterwards, as with any freed device memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from abc import abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from remap.backend import ArenaBackend, Backend, FlatBackend, check_page_size
from remap.types import IntegrityError, ModelId, PageId, RemapError

SlabKey = Hashable  # (model, layer) for a slab, (model, "staging", slot) for a staging slot


class _Mappings:
    """What must be freed once: set by a backend, kept alive by every tensor it hands out."""

    def __init__(self) -> None:
        self.release: Callable[[], None] | None = None

    def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the driver may be gone first
            self.close()


@dataclass
class _SlabRange:
    addr: int  # start of the reserved virtual range
    num_pages: int
    # uint8 [num_pages * page_size] at addr, made at the first map (CUDA asks which device a pointer
    # is on, which an unmapped range cannot answer), then the same tensor for the backend's lifetime.
    data: torch.Tensor | None = None
    pages: list[PageId] | None = None  # mapped now, in order; None while unmapped


class VmmBackend(FlatBackend):
    """A pool range over all pages plus one remappable range per slab (see the module docstring)."""

    needs_home_runs = False

    def __init__(self, num_pages: int, page_size_bytes: int, device: torch.device) -> None:
        if num_pages <= 0:
            raise RemapError(f"a pool needs at least one page, got num_pages={num_pages}")
        check_page_size(page_size_bytes)
        granularity, what = self._granularity()
        check_page_size(page_size_bytes, granularity, what)
        self.device, self.num_pages, self.page_size_bytes = device, num_pages, page_size_bytes
        self._slabs: dict[SlabKey, _SlabRange] = {}
        self._closed = False
        size = num_pages * page_size_bytes
        self._pool_addr = self._reserve(size)
        self._map(self._pool_addr, [PageId(p) for p in range(num_pages)])
        self._buffer = self._tensor(self._pool_addr, size)
        self._pages = self._buffer.view(num_pages, page_size_bytes)

    # ---- primitives ----------------------------------------------------------------------
    @abstractmethod
    def _granularity(self) -> tuple[int, str]:
        """The smallest mappable unit in bytes, and what it is called (for the error message)."""

    @abstractmethod
    def _reserve(self, num_bytes: int) -> int:
        """Reserve a virtual range with nothing mapped; returns its address."""

    @abstractmethod
    def _map(self, addr: int, pages: Sequence[PageId]) -> None:
        """Map physical `pages` in order at addr, addr + page_size, ... (read-write)."""

    @abstractmethod
    def _unmap(self, addr: int, pages: Sequence[PageId]) -> None:
        """Undo `_map(addr, pages)`; the range stays reserved."""

    @abstractmethod
    def _tensor(self, addr: int, num_bytes: int) -> torch.Tensor:
        """uint8 tensor over [addr, addr + num_bytes) that keeps `self._mappings` alive."""

    # ---- slab ranges ---------------------------------------------------------------------
    def map_slab(self, key: SlabKey, pages: Sequence[PageId]) -> torch.Tensor:
        self._check_open()
        rng = self._slabs.get(key)
        if rng is None:
            rng = self._slabs[key] = _SlabRange(self._reserve(len(pages) * self.page_size_bytes), len(pages))
        if rng.pages is not None:
            raise IntegrityError(f"slab {key} is already mapped onto pages {rng.pages}")
        if len(pages) != rng.num_pages:
            raise IntegrityError(f"slab {key} spans {rng.num_pages} pages, asked to map {len(pages)}")
        bad = [p for p in pages if not 0 <= p < self.num_pages]
        if bad:
            raise RemapError(f"page ids {bad} outside the pool's 0..{self.num_pages - 1}")
        self._map(rng.addr, pages)
        rng.pages = list(pages)
        if rng.data is None:
            rng.data = self._tensor(rng.addr, rng.num_pages * self.page_size_bytes)
        return rng.data

    def unmap_slab(self, key: SlabKey) -> None:
        self._check_open()
        rng = self._slabs.get(key)
        if rng is None or rng.pages is None:
            raise IntegrityError(f"slab {key} is not mapped")
        self._unmap(rng.addr, rng.pages)
        rng.pages = None

    def mapped_pages(self, key: SlabKey) -> list[PageId] | None:
        rng = self._slabs.get(key)
        return None if rng is None or rng.pages is None else list(rng.pages)

    def close(self) -> None:
        self._closed = True
        self._mappings.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RemapError("the backend is closed")

    _mappings: _Mappings


# ---- the host: memfd + mmap ----------------------------------------------------------------
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10  # <sys/mman.h> on Linux; Python's mmap module cannot map at a fixed address
_MAP_NORESERVE = 0x4000  # a reservation commits no memory and no swap
_MAP_POPULATE = 0x8000  # fill the page tables at map time: a restore's copy then takes no page faults
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    return libc


class HostVmmBackend(VmmBackend):
    """Pages in a memfd; ranges are mmaps of it (see the module docstring). Linux only."""

    def __init__(self, num_pages: int, page_size_bytes: int) -> None:
        if not hasattr(os, "memfd_create"):
            raise RemapError("the host vmm backend needs Linux (memfd_create); use the arena backend")
        self._libc = _libc()
        self._mappings = _Mappings()
        self._ranges: dict[int, int] = {}  # every reserved range: address -> bytes (for close)
        self._fd = os.memfd_create("oneiros-pages", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, num_pages * page_size_bytes)
        except (OSError, ValueError):
            os.close(self._fd)
            raise
        self._mappings.release = _host_release(self._libc, self._fd, self._ranges)
        try:
            super().__init__(num_pages, page_size_bytes, torch.device("cpu"))
        except BaseException:
            self._mappings.close()
            raise

    def _granularity(self) -> tuple[int, str]:
        return mmap.PAGESIZE, "the OS page size"

    def _reserve(self, num_bytes: int) -> int:
        addr = self._mmap(None, num_bytes, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        self._ranges[addr] = num_bytes
        return addr

    def _map(self, addr: int, pages: Sequence[PageId]) -> None:
        ps = self.page_size_bytes
        try:
            for i, first, n in _runs(pages):  # one mmap per run of consecutive page ids
                self._mmap(addr + i * ps, n * ps, _PROT_RW, mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE, self._fd,
                           first * ps)
        except RemapError:
            self._unmap(addr, pages)  # all or nothing
            raise

    def _unmap(self, addr: int, pages: Sequence[PageId]) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
        self._mmap(addr, len(pages) * self.page_size_bytes, _PROT_NONE, flags, -1, 0)

    def _tensor(self, addr: int, num_bytes: int) -> torch.Tensor:
        buf = (ctypes.c_uint8 * num_bytes).from_address(addr)
        buf.mappings = self._mappings  # torch.frombuffer keeps `buf` alive as long as any view
        return torch.frombuffer(buf, dtype=torch.uint8)

    def _mmap(self, addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        self._check_open()
        got = self._libc.mmap(addr, length, prot, flags, fd, offset)
        if got is None or got == _MAP_FAILED or (flags & _MAP_FIXED and got != addr):
            err = ctypes.get_errno()
            raise RemapError(f"mmap({addr}, {length} B, prot={prot}, flags={flags:#x}, offset={offset}) failed: "
                             f"{os.strerror(err)} (errno {err})")
        return got


def _host_release(libc: ctypes.CDLL, fd: int, ranges: dict[int, int]) -> Callable[[], None]:
    def release() -> None:
        for addr, size in ranges.items():
            libc.munmap(addr, size)
        ranges.clear()
        os.close(fd)
    return release


def _runs(pages: Sequence[PageId]) -> list[tuple[int, PageId, int]]:
    """(index in `pages`, first page id, length) of each run of consecutive page ids."""
    runs: list[tuple[int, PageId, int]] = []
    for i, p in enumerate(pages):
        if runs and runs[-1][1] + runs[-1][2] == p:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, p, 1))
    return runs


# ---- CUDA: cuMemCreate + cuMemMap ----------------------------------------------------------
def _driver():
    try:
        from cuda.bindings import driver as cu  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as cu  # older cuda-python
        except ImportError as exc:
            raise RemapError("the vmm backend on CUDA needs cuda-python: pip install 'oneiros[gpu]'") from exc
    return cu


class _CudaRange:
    """A device range as `__cuda_array_interface__`; torch holds this object as long as the tensor."""

    def __init__(self, addr: int, num_bytes: int, mappings: _Mappings) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,), "typestr": "|u1", "data": (addr, False), "version": 3, "strides": None,
        }
        self.mappings = mappings


def _call(cu, name: str, *args):
    """Call a driver function; RemapError naming it and the error unless it returns CUDA_SUCCESS."""
    err, *out = getattr(cu, name)(*args)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, text = cu.cuGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else text
        raise RemapError(f"{name} failed: {getattr(err, 'name', err)} ({text})")
    return out[0] if len(out) == 1 else (tuple(out) if out else None)


class _CudaPages:
    """The driver objects of one CudaVmmBackend. Holds no tensor (and not the backend), so the
    last view dying can free it: views keep it alive through `_Mappings.release`."""

    def __init__(self, cu, index: int) -> None:
        self.cu, self.index = cu, index
        _call(cu, "cuInit", 0)  # torch has initialized the driver already; this is a no-op then
        self.dev = _call(cu, "cuDeviceGet", index)
        # torch runs on the device's primary context; retaining it gives us that same context, and
        # we make it current before our driver calls, which may come from another thread.
        self.ctx = _call(cu, "cuDevicePrimaryCtxRetain", self.dev)
        self.handles: list = []  # physical page p = handles[p]
        self.ranges: dict[int, int] = {}  # reserved: address -> bytes
        self.mapped: dict[int, int] = {}  # mapped pages: address -> bytes (unmapped before freeing)

    def call(self, name: str, *args):
        return _call(self.cu, name, *args)

    def current(self) -> None:
        self.call("cuCtxSetCurrent", self.ctx)

    def release(self) -> None:
        """Unmap, free every range, release every page and the context (close, or last view gone)."""
        torch.cuda.synchronize(self.index)  # nothing queued may touch what is about to go
        self.current()
        for addr, size in self.mapped.items():
            self.call("cuMemUnmap", addr, size)
        self.mapped.clear()
        for addr, size in self.ranges.items():
            self.call("cuMemAddressFree", addr, size)
        self.ranges.clear()
        for handle in self.handles:
            self.call("cuMemRelease", handle)
        self.handles.clear()
        self.call("cuDevicePrimaryCtxRelease", self.dev)


class CudaVmmBackend(VmmBackend):
    """One physical allocation per page, mapped into reserved device ranges (module docstring)."""

    def __init__(self, num_pages: int, page_size_bytes: int, device: torch.device | str = "cuda") -> None:
        cu = _driver()
        device = torch.device(device)
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.empty(1, device=torch.device("cuda", index))  # torch creates its primary context now
        self._cu = _CudaPages(cu, index)
        self._mappings = _Mappings()
        self._mappings.release = self._cu.release
        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        self._access = cu.CUmemAccessDesc()
        self._access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        try:
            self._cu.current()
            check_page_size(page_size_bytes, *self._granularity())  # before any cuMemCreate
            for _ in range(num_pages):
                self._cu.handles.append(self._cu.call("cuMemCreate", page_size_bytes, self._prop, 0))
            super().__init__(num_pages, page_size_bytes, torch.device("cuda", index))
        except BaseException:
            self._mappings.close()
            raise

    def _granularity(self) -> tuple[int, str]:
        gran = self._cu.call("cuMemGetAllocationGranularity", self._prop,
                             self._cu.cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        return int(gran), "the CUDA VMM allocation granularity"

    def _reserve(self, num_bytes: int) -> int:
        self._check_open()
        self._cu.current()
        addr = int(self._cu.call("cuMemAddressReserve", num_bytes, 0, 0, 0))
        self._cu.ranges[addr] = num_bytes
        return addr

    def _map(self, addr: int, pages: Sequence[PageId]) -> None:
        self._check_open()
        self._cu.current()
        ps, done = self.page_size_bytes, []
        try:
            for i, p in enumerate(pages):
                self._cu.call("cuMemMap", addr + i * ps, ps, 0, self._cu.handles[p], 0)
                self._cu.mapped[addr + i * ps] = ps
                done.append(addr + i * ps)
            self._cu.call("cuMemSetAccess", addr, len(pages) * ps, [self._access], 1)
        except RemapError:
            for a in done:  # all or nothing
                self._cu.call("cuMemUnmap", a, ps)
                del self._cu.mapped[a]
            raise

    def _unmap(self, addr: int, pages: Sequence[PageId]) -> None:
        self._check_open()
        # Kernels queued on any stream may still read the slab through this range, and cuMemUnmap
        # does not wait for them. Reclaims happen between steps, so one sync here costs little.
        torch.cuda.synchronize(self.device)
        self._cu.current()
        ps = self.page_size_bytes
        for i in range(len(pages)):
            self._cu.call("cuMemUnmap", addr + i * ps, ps)
            del self._cu.mapped[addr + i * ps]

    def _tensor(self, addr: int, num_bytes: int) -> torch.Tensor:
        return torch.as_tensor(_CudaRange(addr, num_bytes, self._mappings), device=self.device)


# ---- selection -----------------------------------------------------------------------------
BACKEND_KINDS = ("arena", "vmm")


def make_backend(kind: str, num_pages: int, page_size_bytes: int, device: torch.device | str = "cpu") -> Backend:
    """`arena` on any device; `vmm`: HostVmmBackend on the CPU, CudaVmmBackend on CUDA."""
    device = torch.device(device)
    if kind == "arena":
        return ArenaBackend(num_pages, page_size_bytes, device)
    if kind != "vmm":
        raise RemapError(f"unknown memory backend {kind!r}; choose one of {BACKEND_KINDS}")
    if device.type == "cpu":
        return HostVmmBackend(num_pages, page_size_bytes)
    if device.type == "cuda":
        return CudaVmmBackend(num_pages, page_size_bytes, device)
    raise RemapError(f"the vmm backend runs on cpu or cuda, not {device.type}")
