"""A long randomized run of the memory engine against a simple reference model.

The reference knows only what a user can observe: which layers are resident (and their exact
bytes), which sequences hold how many blocks with what contents, which are swapped out, and how
many pages must be free. Every step ends with check_integrity() and a full comparison. It runs on
the arena (restores migrate KV out of home runs) and on the host VMM backend (restores take any free
pages: they succeed iff a layer's worth of pages is free, and never migrate).
"""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from remap import ModelId, Owner, OwnerKind, RemapError, SeqId
from tests.unit.factories import add_model, make_memory

MODELS = ("a", "b")
NUM_LAYERS = 4
PAGES_PER_LAYER = 3
NUM_PAGES = 48  # 2 models x 15 pages of parameters + 18 free


class MemoryMachine(RuleBasedStateMachine):
    BACKEND = "arena"

    def __init__(self) -> None:
        super().__init__()
        self.mem = make_memory(num_pages=NUM_PAGES, backend=self.BACKEND)
        self.kv, self.want_params = {}, {}
        for i, m in enumerate(MODELS):
            kv, layers, _ = add_model(self.mem, m, NUM_LAYERS, seed=i)
            self.kv[m], self.want_params[m] = kv, layers
        self.resident = {m: set(range(NUM_LAYERS)) for m in MODELS}
        self.blocks: dict[tuple[str, int], list[float]] = {}  # on device: fill value per block
        self.swapped: dict[tuple[str, int], list[float]] = {}
        self.next_value = 1.0
        self.staging_pages = 0  # held by an open staging ring

    # ---- rules ---------------------------------------------------------------------------
    @rule(m=st.sampled_from(MODELS), layer=st.integers(0, NUM_LAYERS - 1))
    def reclaim(self, m, layer):
        if layer in self.resident[m]:
            assert self.mem.reclaim(ModelId(m), layer) == PAGES_PER_LAYER
            self.resident[m].discard(layer)
        else:
            try:
                self.mem.reclaim(ModelId(m), layer)
                raise AssertionError("reclaiming a reclaimed layer must fail")
            except RemapError:
                pass

    @rule(m=st.sampled_from(MODELS), layer=st.integers(0, NUM_LAYERS - 1))
    def restore(self, m, layer):
        if layer in self.resident[m]:
            return
        free_before = self.mem.pool.num_free
        outcome = self.mem.restore(ModelId(m), layer)
        if self.BACKEND == "vmm":  # any pages will do: it fails only when too few are free
            assert outcome.restored == (free_before >= PAGES_PER_LAYER) and outcome.num_blocks_migrated == 0
        if outcome.restored:
            self.resident[m].add(layer)
        else:
            assert outcome.reason

    @rule(m=st.sampled_from(MODELS), seq=st.integers(0, 5), n=st.integers(0, 6))
    def alloc(self, m, seq, n):
        if (m, seq) in self.swapped:
            return
        free_before = self.mem.pool.num_free
        pages = self.kv[m].alloc(SeqId(seq), n)
        if n > free_before:
            assert pages is None and self.mem.pool.num_free == free_before
            return
        assert pages is not None and len(pages) == n
        values = self.blocks.setdefault((m, seq), [])
        for p in pages:
            self.kv[m].view[p].fill_(self.next_value)
            values.append(self.next_value)
            self.next_value += 1.0

    @rule(m=st.sampled_from(MODELS), seq=st.integers(0, 5))
    def free(self, m, seq):
        self.kv[m].free(SeqId(seq))
        self.blocks.pop((m, seq), None)
        self.swapped.pop((m, seq), None)

    @precondition(lambda self: any(self.blocks.values()))
    @rule(data=st.data())
    def migrate(self, data):
        (m, seq) = data.draw(st.sampled_from(sorted(k for k, v in self.blocks.items() if v)))
        table = self.kv[m].table(SeqId(seq))
        idx = data.draw(st.integers(0, len(table) - 1))
        dst = self.mem.pool.alloc(1, Owner(OwnerKind.KV, ModelId(m), seq))
        if dst is None:
            return
        src = table[idx]
        self.kv[m].migrate([src], dst)
        assert self.kv[m].table(SeqId(seq))[idx] == dst[0]

    @precondition(lambda self: any(self.blocks.values()))
    @rule(data=st.data())
    def swap_out(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, v in self.blocks.items() if v)))
        assert self.kv[key[0]].swap_out(SeqId(key[1])) == len(self.blocks[key])
        self.swapped[key] = self.blocks.pop(key)

    @precondition(lambda self: bool(self.swapped))
    @rule(data=st.data())
    def swap_in(self, data):
        key = data.draw(st.sampled_from(sorted(self.swapped)))
        free_before = self.mem.pool.num_free
        pages = self.kv[key[0]].swap_in(SeqId(key[1]))
        if len(self.swapped[key]) > free_before:
            assert pages is None
        else:
            assert pages is not None
            self.blocks[key] = self.swapped.pop(key)

    @rule(m=st.sampled_from(MODELS), num_slots=st.integers(1, 3))
    def stream_one_pass(self, m, num_slots):
        remapped = sorted(set(range(NUM_LAYERS)) - self.resident[m])
        if not remapped:
            return
        ring = self.mem.open_stream(ModelId(m), num_slots)
        if ring is None:
            return
        self.staging_pages = num_slots * PAGES_PER_LAYER
        self.check()  # KV blocks may have moved to make the slots
        ring.begin_pass(remapped)
        for layer in remapped:
            got = ring.acquire(layer)
            for name, t in self.want_params[m][layer].items():
                assert torch.equal(got[name], t)
            ring.release(layer)
        self.mem.close_stream(ModelId(m))
        self.staging_pages = 0

    @precondition(lambda self: self.BACKEND == "arena")
    @rule()
    def compact(self):
        """Every slab and block slides down, contents kept; reclaimed layers lose their homes and
        get new ones when restored (the restore rule then re-homes them)."""
        self.mem.compact()
        free = self.mem.pool.num_free
        assert free == 0 or self.mem.pool.find_free_run(free, homed_ok=True) == NUM_PAGES - free

    # ---- the comparison after every step -----------------------------------------------
    @invariant()
    def check(self):
        self.mem.check_integrity()
        for m in MODELS:
            assert set(self.mem.params.resident_layers(ModelId(m))) == self.resident[m]
            for layer in self.resident[m]:
                got = self.mem.params.tensors(ModelId(m), layer)
                for name, t in self.want_params[m][layer].items():
                    assert torch.equal(got[name], t), (m, layer, name)
        for (m, seq), values in self.blocks.items():
            table = self.kv[m].table(SeqId(seq))
            assert len(table) == len(values)
            for p, v in zip(table, values):
                block = self.kv[m].view[p]
                assert bool((block == v).all()), (m, seq, p, v)
        for (m, seq), values in self.swapped.items():
            assert self.kv[m].is_swapped(SeqId(seq)) and self.kv[m].num_swapped_blocks(SeqId(seq)) == len(values)
        used = sum(len(r) for r in self.resident.values()) * PAGES_PER_LAYER + len(MODELS) * 3
        used += sum(len(v) for v in self.blocks.values()) + self.staging_pages
        assert self.mem.pool.num_free == NUM_PAGES - used


    def teardown(self):
        self.mem.close()


class VmmMemoryMachine(MemoryMachine):
    BACKEND = "vmm"


MemoryMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestMemoryAgainstReference = MemoryMachine.TestCase
VmmMemoryMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
TestVmmMemoryAgainstReference = VmmMemoryMachine.TestCase
