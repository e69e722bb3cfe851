"""Seeded random runs of the memory engine with several models, rings carved out of fragmented
pools, swaps and restores, with check_integrity() after every operation. Seed 392 once caught
`_evict` moving one model's block into a page the previous model's migration had just freed
inside the run being cleared."""

from __future__ import annotations

import random

import pytest

from remap import ModelId, RemapError, SeqId
from tests.unit.factories import add_model, make_memory


def run_seed(seed: int, steps: int = 60, backend: str = "arena") -> None:
    rng = random.Random(seed)
    mem = make_memory(num_pages=rng.randint(40, 70), backend=backend)
    models = []
    for i, name in enumerate(("a", "b", "c")):
        try:
            add_model(mem, name, 4, seed=i)
            models.append(ModelId(name))
        except RemapError:  # the pool is full: fewer tenants this run
            pass
    next_seq = 0
    for _ in range(steps):
        op, model = rng.random(), rng.choice(models)
        kv, params = mem.kv[model], mem.params
        if op < 0.35:
            kv.alloc(SeqId(next_seq), rng.randint(1, 3))
            next_seq += 1
        elif op < 0.55 and kv.sequences:
            kv.free(rng.choice(kv.sequences))
        elif op < 0.65:
            layer = rng.randrange(4)
            if params.is_resident(model, layer) and len(params.resident_layers(model)) > 1:
                mem.reclaim(model, layer)
        elif op < 0.75:
            layer = rng.randrange(4)
            if not params.is_resident(model, layer):
                mem.restore(model, layer)
        elif op < 0.9:
            if len(params.resident_layers(model)) < 4 and mem.open_stream(model, rng.randint(1, 3)) is not None:
                mem.check_integrity()
                mem.close_stream(model)
        elif kv.sequences:
            seq = rng.choice(kv.sequences)
            if kv.table(seq):
                kv.swap_out(seq)
        mem.check_integrity()
    mem.close()


@pytest.mark.parametrize("first_seed", [0, 100, 200, 300])
def test_random_multi_model_runs_keep_every_invariant(first_seed):
    for seed in range(first_seed, first_seed + 100):
        run_seed(seed)


def test_random_multi_model_runs_keep_every_invariant_on_vmm():
    for seed in range(100):
        run_seed(seed, backend="vmm")


def test_clearing_a_run_never_moves_a_block_into_the_run_it_clears():
    run_seed(392)
