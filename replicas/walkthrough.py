"""`oneiros demo`: a walk-through of parameter remapping on real memory, printed step by step.

Three tenants share one page pool. A burst on one of them needs more KV pages than are free; the
RemapController lends the idle tenants' layers (MRU first, up to the cap) and, if needed, layers of
the busy tenant within its streaming budget; KV blocks are written into the lent pages; the busy
tenant's remapped layers stream through a staging ring for one forward pass; the burst ends and the
controller gives every page back. Each parameter byte is then compared with the original.
"""

from __future__ import annotations

import time

import torch

from remap import DeviceMemory, KVGeometry, MemorySnapshot, ModelId, RemapConfig, RemapController, SeqId

PAGE = 256 << 10  # small pages so the picture has some resolution
TENANTS = ("chat", "code", "math")
NUM_LAYERS, HIDDEN = 8, 256


def _tenant_weights(seed: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    layers = [
        {name: torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1 for name in ("q", "k", "v", "o")}
        | {"norm": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}
        for _ in range(NUM_LAYERS)
    ]
    return layers, {"embed": torch.randn(1000, HIDDEN, generator=g) * 0.1}


def _snapshot(mem: DeviceMemory, now: float, last_active: dict, busy: dict, link: float) -> MemorySnapshot:
    tenants = tuple(
        mem.tenant_snapshot(
            ModelId(m),
            num_running=busy.get(m, (0, 0))[0],
            num_waiting=0,
            kv_pages_needed=busy.get(m, (0, 0))[1],
            last_active_s=last_active[m],
            predicted_compute_s=0.05 if m in busy else 0.0,
        )
        for m in TENANTS
    )
    return MemorySnapshot(now, mem.pool.num_free, link, tenants)


def run(out=print) -> int:
    originals = {m: _tenant_weights(i) for i, m in enumerate(TENANTS)}
    per_model_pages = NUM_LAYERS * 5 + 5
    mem = DeviceMemory(len(TENANTS) * per_model_pages + 30, PAGE)
    for m, (layers, base) in originals.items():
        mem.register_model(ModelId(m), layers, base, KVGeometry(NUM_LAYERS, 4, 64, torch.float32))
    link = _measure_link(mem)
    controller = RemapController(RemapConfig(max_remapped_fraction=0.75))
    out(f"== 1. three tenants in one pool of {mem.pool.num_pages} pages x {PAGE >> 10} KiB "
        f"(host->device copy measured at {link / 1e9:.1f} GB/s)")
    out(mem.describe())

    kv = mem.kv[ModelId("chat")]
    num_seqs, tokens = 6, 288
    need = num_seqs * kv.num_blocks_for(tokens)
    last_active = {"chat": 100.0, "code": 40.0, "math": 55.0}
    out(f"\n== 2. burst on 'chat': {num_seqs} sequences x {tokens} tokens need {need} KV pages, "
        f"{mem.pool.num_free} are free; 'math' was active more recently than 'code' (MRU victim)")
    plan = controller.plan(_snapshot(mem, 100.0, last_active, {"chat": (num_seqs, need)}, link))
    for line in plan.describe():
        out(f"   plan: {line}")
    applied = mem.apply(plan)
    for seq in range(num_seqs):
        pages = kv.alloc(SeqId(seq), kv.num_blocks_for(tokens))
        if pages is None:
            out(f"   sequence {seq} waits: no room")
            break
        for p in pages:
            kv.view[p].normal_()  # the KV cache really writes over the lent parameter bytes
    lent = sum(mem.pool.is_homed(p) for s in kv.sequences for p in kv.table(s))
    out(f"   reclaimed {applied.num_reclaimed} layers; {kv.num_pages_used} KV pages in use, "
        f"{lent} of them in lent parameter pages")
    out(mem.describe())

    for stream in plan.stream:
        ring = mem.open_stream(ModelId(stream.model), stream.num_staging_slots)
        if ring is None:
            out(f"   no room for {stream.model}'s staging ring")
            continue
        ring.begin_pass(stream.layers)
        exact = True
        for layer in stream.layers:
            got = ring.acquire(layer)
            exact &= all(torch.equal(got[k], v) for k, v in originals[stream.model][0][layer].items())
            ring.release(layer)
        mem.close_stream(ModelId(stream.model))
        out(f"\n== 3. one forward pass of '{stream.model}' streamed its remapped layers {list(stream.layers)} "
            f"through {stream.num_staging_slots} staging slots: bytes exact = {exact}")

    out("\n== 4. the burst ends: KV freed, the controller reverts")
    for seq in list(kv.sequences):
        kv.free(seq)
    plan = controller.plan(_snapshot(mem, 130.0, last_active, {}, link))
    for line in plan.describe():
        out(f"   plan: {line}")
    applied = mem.apply(plan)
    out(mem.describe())

    mem.check_integrity()
    exact = all(
        torch.equal(mem.params.tensors(ModelId(m), i)[k], v)
        for m, (layers, _) in originals.items()
        for i, layer in enumerate(layers)
        if mem.params.is_resident(ModelId(m), i)
        for k, v in layer.items()
    )
    out(f"\n== 5. restored {applied.num_restored} layers; every resident parameter byte equals the original: {exact}; "
        "page ownership checked")
    mem.close()
    return 0 if exact else 1


def _measure_link(mem: DeviceMemory) -> float:
    src = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src, device=mem.device)
    start = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    return 4 * src.numel() / (time.perf_counter() - start)
