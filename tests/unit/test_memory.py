"""DeviceMemory: reclaim / reuse as KV / restore, migration, swap, staging, and bad input."""

from __future__ import annotations

import pytest
import torch

from remap import (
    BASE_SLAB,
    DeviceMemory,
    KVGeometry,
    ModelId,
    OwnerKind,
    RemapError,
    TENSOR_ALIGN_BYTES,
    SeqId,
    ThreadTransferEngine,
    opaque,
    pack_layout,
)
from replicas.engine.models import ops
from tests.unit.factories import PAGE, add_model, make_layers, make_memory


def assert_params_equal(mem: DeviceMemory, model: str, layers, base) -> None:
    for i, want in enumerate(layers):
        if mem.params.is_resident(ModelId(model), i):
            got = mem.params.tensors(ModelId(model), i)
            for name, t in want.items():
                assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), (model, i, name)
    got = mem.params.tensors(ModelId(model), BASE_SLAB)
    for name, t in base.items():
        assert torch.equal(got[name], t)


def fill_blocks(kv, pages, value: float) -> None:
    for p in pages:
        kv.view[p].fill_(value)


BACKENDS = pytest.mark.parametrize("backend", ["arena", "vmm"])


@BACKENDS
def test_registered_parameters_are_bit_identical_views(backend):
    mem = make_memory(backend=backend)
    kv, layers, base = add_model(mem)
    assert_params_equal(mem, "m0", layers, base)
    assert kv.block_size == PAGE // (4 * 2 * 2 * 16 * 4)
    mem.check_integrity()


def test_a_models_host_copies_are_slices_of_one_buffer():
    # CUDA's caching host allocator rounds every pinned allocation up to a power of two, so each model
    # gets one buffer, a slice per slab (aligned, not overlapping); closing frees it through any slice
    mem = make_memory()
    add_model(mem)
    slabs = sorted((s for s in mem.params.slabs()), key=lambda s: s.host.storage_offset())
    assert len({s.host.untyped_storage().data_ptr() for s in slabs}) == 1
    for a, b in zip(slabs, slabs[1:]):
        assert a.host.storage_offset() + a.num_bytes <= b.host.storage_offset()
    assert all(s.host.storage_offset() % TENSOR_ALIGN_BYTES == 0 and s.host.numel() == s.num_bytes for s in slabs)
    mem.close()
    assert slabs[0].host.untyped_storage().nbytes() == 0


@BACKENDS
def test_reclaim_reuse_as_kv_then_restore_is_bit_identical(backend):
    mem = make_memory(num_pages=16, backend=backend)  # 15 pages of parameters, 1 free
    kv, layers, base = add_model(mem)
    assert mem.pool.num_free == 1
    freed = mem.reclaim(ModelId("m0"), 2)
    assert freed == 3 and mem.pool.num_free == 4
    pages = kv.alloc(SeqId(7), 4)  # the KV cache now lives in layer 2's pages
    assert pages is not None
    fill_blocks(kv, pages, 123.0)  # overwrite every lent byte
    mem.check_integrity()
    kv.free(SeqId(7))
    outcome = mem.restore(ModelId("m0"), 2)
    assert outcome.restored and outcome.num_blocks_migrated == 0
    assert_params_equal(mem, "m0", layers, base)
    mem.check_integrity()


def test_restore_migrates_kv_blocks_out_of_the_home_run_keeping_contents():
    mem = make_memory(num_pages=24)  # 15 pages of parameters, 9 free
    kv, layers, base = add_model(mem)
    mem.reclaim(ModelId("m0"), 1)  # 3 more free pages, homed
    kv.alloc(SeqId(1), 2)
    table = kv.alloc(SeqId(2), 9)  # 7 plain pages, then 2 of layer 1's home run
    assert sum(mem.pool.is_homed(p) for p in table) == 2
    for i, p in enumerate(table):
        kv.view[p].fill_(float(100 + i))
    before = [kv.view[p].clone() for p in table]

    outcome = mem.restore(ModelId("m0"), 1)  # 1 free page, inside the run: nowhere to move to
    assert not outcome.restored and "only 0 pages are free" in outcome.reason
    assert not mem.params.is_resident(ModelId("m0"), 1)
    mem.check_integrity()

    kv.free(SeqId(1))
    outcome = mem.restore(ModelId("m0"), 1)
    assert outcome.restored and outcome.num_blocks_migrated == 2
    after = kv.table(SeqId(2))
    assert not any(mem.pool.is_homed(p) for p in after)
    assert all(torch.equal(kv.view[p], b) for p, b in zip(after, before))
    assert_params_equal(mem, "m0", layers, base)
    mem.check_integrity()


@BACKENDS
def test_swap_out_and_in_preserves_blocks_and_frees_pages(backend):
    mem = make_memory(backend=backend)
    kv, _, _ = add_model(mem)
    pages = kv.alloc(SeqId(5), 3)
    for i, p in enumerate(pages):
        kv.view[p].normal_(generator=torch.Generator().manual_seed(i))
    before = [kv.view[p].clone() for p in pages]
    free_before = mem.pool.num_free
    assert kv.swap_out(SeqId(5)) == 3
    assert mem.pool.num_free == free_before + 3 and kv.is_swapped(SeqId(5))
    mem.check_integrity()
    kv.alloc(SeqId(6), 3)  # someone else takes the pages meanwhile
    new = kv.swap_in(SeqId(5))
    assert new is not None
    assert all(torch.equal(kv.view[p], b) for p, b in zip(new, before))
    mem.check_integrity()


def test_alloc_returns_none_and_changes_nothing_when_full():
    mem = make_memory(num_pages=20)
    kv, _, _ = add_model(mem)
    assert kv.alloc(SeqId(1), 6) is None
    assert kv.table(SeqId(1)) == [] and mem.pool.num_free == 5
    assert kv.alloc(SeqId(1), 5) is not None and kv.alloc(SeqId(1), 1) is None
    assert len(kv.table(SeqId(1))) == 5
    mem.check_integrity()


def test_a_claim_of_bad_page_ids_raises_before_anything_changes():
    from remap import Owner, PagePool

    pool = PagePool(8, PAGE)
    owner = Owner(OwnerKind.KV, ModelId("m"), 1)
    for bad in ([1, 8], [2, 3.0], [-1]):  # a float id would pass a range check and fail half way
        with pytest.raises(RemapError, match="is not an int in the pool's 0..7"):
            pool.claim(bad, owner)
        assert pool.num_free == 8
        pool.check_integrity()
    assert pool.claim([2, 3], owner) and pool.num_free == 6


def test_a_double_free_raises_before_anything_changes_and_frees_keep_each_tier_in_order():
    from remap import IntegrityError, Owner, PagePool

    pool = PagePool(8, PAGE)
    owner = Owner(OwnerKind.KV, ModelId("m"), 1)
    pages = pool.alloc(6, owner)
    pool.set_homed(pages[:2], True)
    for bad in ([pages[0], pages[0]], [pages[1], pages[2], pages[1]]):
        with pytest.raises(IntegrityError, match=f"double free of page {bad[-1]}"):
            pool.free(bad)
        assert pool.num_free == 2 and pool.owner(bad[0]) == owner  # nothing freed
    pool.free(pages[:4])  # two homed, two plain
    pool.check_integrity()
    with pytest.raises(IntegrityError, match=f"double free of page {pages[3]}"):
        pool.free([pages[4], pages[3]])
    assert pool.owner(pages[4]) == owner and pool.num_free == 6
    # plain pages go out LIFO (the last freed first), homed ones only when plain is empty, oldest first
    assert pool.alloc(4, owner) == [pages[3], pages[2], 6, 7]
    assert pool.alloc(2, owner) == [pages[0], pages[1]]


def test_two_models_share_one_pool_and_kv_lands_in_the_other_models_pages():
    mem = make_memory(num_pages=32)
    kv_a, layers_a, base_a = add_model(mem, "a", seed=1)
    kv_b, layers_b, base_b = add_model(mem, "b", seed=2)
    assert mem.pool.num_free == 2
    for layer in (0, 2):
        mem.reclaim(ModelId("b"), layer)
    pages = kv_a.alloc(SeqId(1), 8)
    assert pages is not None and sum(mem.pool.is_homed(p) for p in pages) == 6
    fill_blocks(kv_a, pages, -1.0)
    assert_params_equal(mem, "a", layers_a, base_a)
    mem.check_integrity()
    kv_a.free(SeqId(1))
    for layer in (0, 2):
        assert mem.restore(ModelId("b"), layer).restored
    assert_params_equal(mem, "b", layers_b, base_b)
    mem.check_integrity()


@BACKENDS
@pytest.mark.parametrize("threaded", [False, True])
def test_staging_ring_streams_reclaimed_layers_with_exact_bytes(threaded, backend):
    transfer = ThreadTransferEngine() if threaded else None
    mem = make_memory(num_pages=40, transfer=transfer, backend=backend)
    kv, layers, _ = add_model(mem, num_layers=6)
    for layer in (1, 3, 5):
        mem.reclaim(ModelId("m0"), layer)
    for seq in range(mem.pool.num_free):  # one block each, then every 4th freed: no free run of 3
        kv.alloc(SeqId(seq), 1)
    for seq in range(0, len(kv.sequences), 4):
        kv.free(SeqId(seq))
    assert mem.pool.find_free_run(3, homed_ok=True) is None and mem.pool.num_free == 7
    ring = mem.open_stream(ModelId("m0"), num_slots=2)
    assert ring is not None
    # the arena carves contiguous runs by migrating KV blocks out; vmm maps any 6 free pages, moving nothing
    assert (mem.num_blocks_migrated > 0) == (backend == "arena")
    mem.check_integrity()
    for _ in range(2):  # two forward passes
        ring.begin_pass([1, 3, 5])
        for layer in (1, 3, 5):
            got = ring.acquire(layer)
            for name, t in layers[layer].items():
                assert torch.equal(got[name], t)
            ring.release(layer)
        ring.finish()
    assert ring.num_copies == 5  # pass 2 finds layer 3 still in slot 1 from pass 1
    assert ring.wait_s > 0  # time in copies, which the engine keeps out of its compute estimate
    ring.begin_pass([1, 3, 5])
    with pytest.raises(RemapError, match="in a forward pass"):  # slots being read: no layer may move
        mem.reclaim(ModelId("m0"), 0)
    ring.finish()
    mem.close_stream(ModelId("m0"))
    assert mem.pool.num_owned_by(OwnerKind.STAGING) == 0
    mem.check_integrity()
    mem.close()


def test_streaming_with_enough_slots_copies_each_layer_once():
    mem = make_memory(num_pages=40)
    add_model(mem, num_layers=6)
    for layer in (1, 4):
        mem.reclaim(ModelId("m0"), layer)
    ring = mem.open_stream(ModelId("m0"), num_slots=2)
    waits = []
    for _ in range(3):
        ring.begin_pass([1, 4])
        for layer in (1, 4):
            ring.acquire(layer)
            ring.release(layer)
        ring.finish()
        waits.append(ring.wait_s)
    assert ring.num_copies == 2
    # each pass's own copy time, not the ring's total (the engine takes it out of that step's compute)
    assert waits[0] > 0 and waits[1:] == [0.0, 0.0]


# ---- bad input: clear errors naming the numbers, state unchanged -------------------------
def test_model_larger_than_pool_is_refused_with_the_numbers():
    mem = make_memory(num_pages=10)
    with pytest.raises(RemapError, match=r"needs 15 pages of 4096 B but the pool has only 10"):
        add_model(mem)
    assert mem.pool.num_free == 10 and mem.params.models == []
    mem.check_integrity()


def test_model_that_does_not_fit_the_free_pages_rolls_back():
    mem = make_memory(num_pages=20)
    add_model(mem, "a")
    with pytest.raises(RemapError, match="only 5 pages are free"):
        add_model(mem, "b")
    assert mem.pool.num_free == 5 and mem.params.models == ["a"]
    mem.check_integrity()


@pytest.mark.parametrize("page_size", [1000, 4096 + 128, 0])
def test_page_size_not_a_multiple_of_tensor_alignment_is_refused(page_size):
    with pytest.raises(RemapError, match=f"page size {page_size} B is not a positive multiple"):
        DeviceMemory(8, page_size)


def test_unknown_layer_and_model_ids_are_refused_and_change_nothing():
    mem = make_memory()
    add_model(mem)
    with pytest.raises(RemapError, match=r"has layers 0..3, not 4"):
        mem.reclaim(ModelId("m0"), 4)
    with pytest.raises(RemapError, match=r"has layers 0..3, not -1"):
        mem.restore(ModelId("m0"), -1)
    with pytest.raises(RemapError, match="unknown model 'nope'"):
        mem.reclaim(ModelId("nope"), 0)
    with pytest.raises(RemapError, match="never reclaimed"):
        mem.reclaim(ModelId("m0"), BASE_SLAB)
    mem.reclaim(ModelId("m0"), 0)
    with pytest.raises(RemapError, match="already reclaimed"):
        mem.reclaim(ModelId("m0"), 0)
    with pytest.raises(RemapError, match="already resident"):
        mem.restore(ModelId("m0"), 1)
    assert mem.params.resident_layers(ModelId("m0")) == [1, 2, 3]
    mem.check_integrity()


def test_kv_geometry_too_big_for_a_page_is_refused():
    mem = make_memory()
    layers, base = make_layers()
    with pytest.raises(RemapError, match=r"needs 16384 B of KV, more than a page of 4096 B"):
        mem.register_model(ModelId("big"), layers, base, KVGeometry(32, 8, 8, torch.float32))
    assert mem.params.models == []


def test_changing_a_models_layers_between_passes_retires_its_ring():
    mem = make_memory(num_pages=40)
    add_model(mem, num_layers=6)
    mem.reclaim(ModelId("m0"), 1)
    assert mem.open_stream(ModelId("m0"), num_slots=1) is not None
    mem.reclaim(ModelId("m0"), 4)  # the ring was sized and filled for layer 1 alone
    assert mem.ring(ModelId("m0")) is None and mem.pool.num_owned_by(OwnerKind.STAGING) == 0
    mem.check_integrity()


def test_rings_on_pages_close_in_page_order_whatever_the_hash_seed():
    # the order decides which freed pages the next allocations get; a set of owners (model names
    # hash differently in every process) once made `oneiros sim` results differ between runs
    mem = make_memory(num_pages=60)
    for name in ("a", "b", "c"):
        add_model(mem, name, num_layers=4)
        mem.reclaim(ModelId(name), 1)
        assert mem.open_stream(ModelId(name), num_slots=1) is not None
    rings = {name: mem.ring(ModelId(name)).pages for name in ("a", "b", "c")}
    closed = []
    close = mem.close_stream
    mem.close_stream = lambda model: closed.append(model) or close(model)
    mem.retire_rings_on(rings["c"] + rings["a"] + rings["b"][:1])
    assert closed == ["c", "a", "b"] and mem.pool.num_owned_by(OwnerKind.STAGING) == 0
    mem.check_integrity()


@BACKENDS
def test_an_opaque_blocked_weight_is_stored_as_its_own_bytes_through_reclaim_restore_and_streaming(backend):
    if not opaque.AVAILABLE:
        pytest.skip("this torch cannot wrap bytes as an mkldnn tensor")
    mem = make_memory(num_pages=80, backend=backend)
    layers, base = make_layers(num_layers=3)
    plain = [layer["wq"] for layer in layers]
    # 100 x 70 pads to oneDNN's blocks: more bytes than its elements, which the slab must make room for
    odd = torch.randn(100, 70) * 0.1
    for layer in layers:
        layer["wq"] = torch.ops.mkldnn._reorder_linear_weight(layer["wq"], None)
        layer["odd"] = torch.ops.mkldnn._reorder_linear_weight(odd, None)
    assert opaque.num_bytes(layers[0]["odd"]) > odd.numel() * 4
    specs, _ = pack_layout(layers[0])
    assert {s.name for s in specs if s.layout is not None} == {"wq", "odd"}
    kv = mem.register_model(ModelId("m0"), layers, base, KVGeometry(3, 2, 16, torch.float32))
    x, y = torch.randn(5, 32), torch.randn(2, 70)

    def check(views, i):
        assert views["wq"].is_mkldnn and not views["norm"].is_mkldnn
        torch.testing.assert_close(ops.project(x, views["wq"]), x @ plain[i].T)
        torch.testing.assert_close(ops.project(y, views["odd"]), y @ odd.T)

    for i in range(3):
        check(mem.params.tensors(ModelId("m0"), i), i)
    mem.reclaim(ModelId("m0"), 1)
    pages = kv.alloc(SeqId(0), mem.pool.num_free)  # every free page, the lent layer's too
    fill_blocks(kv, pages, float("nan"))  # the KV overwrites the blocked bytes
    kv.free(SeqId(0))
    ring = mem.open_stream(ModelId("m0"), num_slots=1)
    ring.begin_pass([1])
    check(ring.acquire(1), 1)  # streamed from the host copy into a slot, still blocked
    ring.release(1)
    ring.finish()
    mem.close_stream(ModelId("m0"))
    assert mem.restore(ModelId("m0"), 1).restored
    check(mem.params.tensors(ModelId("m0"), 1), 1)
    mem.check_integrity()
    mem.close()


def test_migrate_moves_a_few_blocks_of_a_long_table_and_all_of_a_short_one_in_place():
    from remap import Owner

    mem = make_memory(num_pages=80)  # 15 pages of parameters
    kv, _, _ = add_model(mem)
    long, short = list(kv.alloc(SeqId(1), 40)), list(kv.alloc(SeqId(2), 3))  # alloc returns the live table
    for p in long + short:
        kv.view[p].fill_(float(p))
    src = [long[7], short[0], long[30], short[2], short[1]]  # 2 of 40 (found one by one), 3 of 3 (one pass)
    dst = mem.pool.alloc(len(src), Owner(OwnerKind.KV, ModelId("m0"), 0))
    want_long = [dst[src.index(p)] if p in src else p for p in long]
    want_short = [dst[src.index(p)] for p in short]
    kv.migrate(src, dst)
    assert kv.table(SeqId(1)) == want_long and kv.table(SeqId(2)) == want_short
    for old, new in zip(long + short, want_long + want_short):
        assert torch.equal(kv.view[new], torch.full_like(kv.view[new], float(old)))
    assert all(mem.pool.owner(p).kind is OwnerKind.FREE for p in src)
    assert mem.pool.owner(dst[1]) == Owner(OwnerKind.KV, ModelId("m0"), SeqId(2))
    assert kv.num_pages_used == 43
    mem.check_integrity()
    kv.free(SeqId(1))
    assert kv.num_pages_used == 3
    mem.check_integrity()
