"""Virtual-memory backends: a slab's range and the pool range reach the same physical pages, a
reclaimed layer comes back into any free pages at the same address with no KV migration, and an
unmapped range faults instead of reading the page's new owner."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from remap import (
    DeviceMemory,
    HostVmmBackend,
    IntegrityError,
    ModelId,
    OwnerKind,
    RemapError,
    SeqId,
    make_backend,
)
from tests.unit.factories import PAGE, add_model, make_memory, needs_host_vmm
from tests.unit.test_memory import assert_params_equal

M0 = ModelId("m0")


def _fill_pool(backend) -> None:
    for p in range(backend.num_pages):
        backend.run_bytes(p, 1).fill_(p + 1)


# ---- the backend alone -------------------------------------------------------------------
@needs_host_vmm()
def test_a_slab_range_and_the_pool_range_see_the_same_bytes():
    backend = HostVmmBackend(8, PAGE)
    _fill_pool(backend)
    data = backend.map_slab((M0, 0), [5, 2, 6])  # any pages, any order
    assert data.numel() == 3 * PAGE
    assert [int(data[i * PAGE]) for i in range(3)] == [6, 3, 7]
    data[PAGE + 10] = 200  # through the slab range ...
    assert int(backend.run_bytes(2, 1)[10]) == 200  # ... is page 2 in the pool range
    backend.run_bytes(6, 1)[0] = 201
    assert int(data[2 * PAGE]) == 201
    assert backend.mapped_pages((M0, 0)) == [5, 2, 6]
    backend.close()


@needs_host_vmm()
def test_remapping_a_slab_keeps_its_address_and_shows_the_new_pages():
    backend = HostVmmBackend(8, PAGE)
    _fill_pool(backend)
    first = backend.map_slab((M0, 1), [0, 1])
    backend.unmap_slab((M0, 1))
    assert backend.mapped_pages((M0, 1)) is None
    again = backend.map_slab((M0, 1), [7, 3])
    assert again.data_ptr() == first.data_ptr()
    assert int(first[0]) == 8 and int(first[PAGE]) == 4  # the old view reads the new pages
    with pytest.raises(IntegrityError, match="already mapped"):
        backend.map_slab((M0, 1), [4, 5])
    backend.unmap_slab((M0, 1))
    with pytest.raises(IntegrityError, match="spans 2 pages"):
        backend.map_slab((M0, 1), [4])
    backend.close()


@needs_host_vmm()
def test_an_unmapped_slab_range_faults_instead_of_reading_the_new_owner():
    script = textwrap.dedent(f"""
        from remap import HostVmmBackend
        backend = HostVmmBackend(4, {PAGE})
        data = backend.map_slab(("m0", 0), [1, 2])
        data.fill_(7)
        backend.unmap_slab(("m0", 0))
        backend.run_bytes(1, 1).fill_(9)  # page 1's next owner writes it
        print("read", int(data[0]), flush=True)  # must fault, not print 9
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "read" not in done.stdout


@pytest.mark.parametrize("page_size", [PAGE + 256, 256, 0])
def test_a_page_size_the_os_cannot_map_is_refused(page_size):
    with pytest.raises(RemapError, match=f"page size {page_size} B is not a positive multiple of"):
        HostVmmBackend(8, page_size)


@needs_host_vmm()
def test_unknown_backend_kinds_are_refused():
    with pytest.raises(RemapError, match=r"unknown memory backend 'mmap'; choose one of \('arena', 'vmm'\)"):
        make_backend("mmap", 8, PAGE)
    assert isinstance(make_backend("vmm", 8, PAGE), HostVmmBackend)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_host_vmm()
def test_close_and_garbage_collection_give_the_memory_back():
    gc.collect()
    before = _open_fds()
    backend = HostVmmBackend(8, PAGE)
    backend.map_slab((M0, 0), [1])
    assert _open_fds() == before + 1
    backend.close()
    assert _open_fds() == before
    with pytest.raises(RemapError, match="closed"):
        backend.map_slab((M0, 1), [2])
    backend = HostVmmBackend(8, PAGE)  # never closed: freed once the last view is gone
    view = backend.map_slab((M0, 0), [1])
    del backend
    gc.collect()
    assert _open_fds() == before + 1  # `view` still reaches the pages
    del view
    gc.collect()
    assert _open_fds() == before


# ---- DeviceMemory on the host VMM backend --------------------------------------------------
def test_restore_lands_on_other_noncontiguous_pages_at_the_same_address():
    mem = make_memory(num_pages=24, backend="vmm")  # 15 pages of parameters, 9 free
    kv, layers, base = add_model(mem)
    views = mem.params.tensors(M0, 2)
    ptr = views["wq"].data_ptr()
    old = list(mem.params.slab(M0, 2).pages)
    mem.reclaim(M0, 2)
    assert mem.params.slab(M0, 2).pages == [] and mem.backend.mapped_pages((M0, 2)) is None
    for seq in range(mem.pool.num_free):  # KV takes every free page, the old ones included
        kv.alloc(SeqId(seq), 1)
        kv.view[kv.table(SeqId(seq))[0]].fill_(float(seq))
    freed = [s for s in kv.sequences if kv.table(s)[0] not in old][::2][:3]  # three scattered pages
    want_pages = sorted(kv.table(s)[0] for s in freed)
    for s in freed:
        kv.free(s)
    mem.check_integrity()

    outcome = mem.restore(M0, 2)
    assert outcome.restored and outcome.num_blocks_migrated == 0 and mem.num_blocks_migrated == 0
    new = mem.params.slab(M0, 2).pages
    assert sorted(new) == want_pages and not set(new) & set(old)
    assert max(new) - min(new) > 2  # not a contiguous run
    assert mem.params.tensors(M0, 2)["wq"].data_ptr() == ptr  # the model's views stay valid
    assert_params_equal(mem, "m0", layers, base)
    slab = mem.params.slab(M0, 2)
    got = torch.cat([mem.backend.run_bytes(p, 1) for p in new])[: slab.num_bytes]
    assert torch.equal(got, slab.host)  # through the pool range too, bit for bit
    for s in kv.sequences:  # no KV block moved or changed
        assert bool((kv.view[kv.table(s)[0]] == float(s)).all())
    mem.check_integrity()
    mem.close()


def test_restore_with_too_few_free_pages_reports_why_and_changes_nothing():
    mem = make_memory(num_pages=16, backend="vmm")  # 15 pages of parameters, 1 free
    kv, _, _ = add_model(mem)
    mem.reclaim(M0, 1)
    kv.alloc(SeqId(1), 2)
    before = mem.pool.summary()
    outcome = mem.restore(M0, 1)
    assert not outcome.restored and outcome.reason == "it needs 3 free pages (any) and only 2 are free"
    assert mem.pool.summary() == before and not mem.params.is_resident(M0, 1)
    assert mem.backend.mapped_pages((M0, 1)) is None
    mem.check_integrity()
    kv.free(SeqId(1))
    assert mem.restore(M0, 1).restored
    mem.check_integrity()


@pytest.mark.parametrize("backend,migrated", [("arena", 2), ("vmm", 0)])
def test_a_restore_migrates_kv_on_the_arena_and_never_on_vmm(backend, migrated):
    mem = make_memory(num_pages=24, backend=backend)
    kv, layers, base = add_model(mem)
    mem.reclaim(M0, 1)
    kv.alloc(SeqId(1), 2)
    table = kv.alloc(SeqId(2), 9)  # on the arena: 7 plain pages, then 2 of layer 1's home run
    for i, p in enumerate(table):
        kv.view[p].fill_(float(100 + i))
    kv.free(SeqId(1))
    outcome = mem.restore(M0, 1)
    assert outcome.restored and outcome.num_blocks_migrated == migrated
    for i, p in enumerate(kv.table(SeqId(2))):
        assert bool((kv.view[p] == float(100 + i)).all())
    assert_params_equal(mem, "m0", layers, base)
    mem.check_integrity()


def test_an_idle_ring_of_another_model_gives_way_to_a_restore():
    mem = make_memory(num_pages=34, backend="vmm")  # 2 x 15 pages of parameters, 4 free
    add_model(mem, "a", seed=1)
    add_model(mem, "b", seed=2)
    mem.reclaim(ModelId("b"), 0)
    mem.reclaim(ModelId("a"), 0)
    ring = mem.open_stream(ModelId("b"), num_slots=2)  # 6 of the 10 free pages
    assert ring is not None
    mem.kv[ModelId("a")].alloc(SeqId(1), 2)  # 2 free
    assert mem.restore(ModelId("a"), 0).restored
    assert mem.ring(ModelId("b")) is None and mem.pool.num_owned_by(OwnerKind.STAGING) == 0
    mem.check_integrity()


def test_register_on_vmm_needs_free_pages_not_runs():
    mem = make_memory(num_pages=20, backend="vmm")
    add_model(mem, "a")
    with pytest.raises(RemapError, match=r"model 'b' needs 15 pages; only 5 pages are free"):
        add_model(mem, "b")
    assert mem.pool.num_free == 5 and mem.params.models == ["a"]
    mem.check_integrity()


# ---- CUDA ----------------------------------------------------------------------------------
def _needs_cuda_python() -> None:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        pytest.importorskip("cuda.cuda", reason="cuda-python is not installed (pip install 'oneiros[gpu]')")


@pytest.mark.gpu
def test_cuda_slab_and_pool_ranges_see_the_same_bytes_and_keep_the_address():
    from remap import CudaVmmBackend

    _needs_cuda_python()
    backend = make_backend("vmm", 8, 2 << 20, "cuda")
    assert isinstance(backend, CudaVmmBackend)
    for p in range(8):
        backend.run_bytes(p, 1).fill_(p + 1)
    data = backend.map_slab((M0, 0), [5, 2])
    assert [int(data[0]), int(data[2 << 20])] == [6, 3]
    data[(2 << 20) + 10] = 200
    assert int(backend.run_bytes(2, 1)[10]) == 200
    backend.unmap_slab((M0, 0))
    again = backend.map_slab((M0, 0), [7, 0])
    assert again.data_ptr() == data.data_ptr() and int(data[0]) == 8 and int(data[2 << 20]) == 1
    torch.cuda.synchronize()
    backend.close()


@pytest.mark.gpu
def test_cuda_restore_lands_on_other_pages_bit_identical_with_no_migration():
    _needs_cuda_python()
    mem = DeviceMemory(24, PAGE * 512, "cuda", backend=make_backend("vmm", 24, PAGE * 512, "cuda"))  # 2 MiB pages
    kv, layers, _ = add_model(mem, hidden=512)
    ptr = mem.params.tensors(M0, 1)["wq"].data_ptr()
    old = list(mem.params.slab(M0, 1).pages)
    mem.reclaim(M0, 1)
    pages = kv.alloc(SeqId(1), mem.pool.num_free)  # KV takes every free page, the old ones included
    for p in pages:
        kv.view[p].fill_(7.0)
    kv.free(SeqId(1))
    kv.alloc(SeqId(2), len(old) + 1)  # someone else takes some of them again
    outcome = mem.restore(M0, 1)
    assert outcome.restored and outcome.num_blocks_migrated == 0
    assert mem.params.tensors(M0, 1)["wq"].data_ptr() == ptr
    torch.cuda.synchronize()
    for i, want in enumerate(layers):
        for name, t in want.items():
            assert torch.equal(mem.params.tensors(M0, i)[name].cpu(), t), (i, name)
    mem.check_integrity()
    mem.close()
