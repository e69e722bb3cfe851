"""The `vllm-v0` scheduling policy (vLLM v0.7.3's `_schedule_default`, chunked prefill off) on small
hand-made cases: prefill-only and decode-only steps, the budget, the watermark, the victim (the last
admitted, not the last arrived), preempted sequences back at the head of the queue, swap-in only in a
step that preempted nothing. Real KV blocks over a real page pool; no model runs (the engine's
exactness under the policy is in test_engine.py)."""

from __future__ import annotations

import pytest

from remap import ModelId
from replicas.engine.sampling import SamplingParams
from replicas.engine.scheduler import Scheduler, SchedulerConfig, SchedulingPolicy
from replicas.engine.sequence import Sequence, SeqStatus
from tests.unit.factories import add_model, make_memory

M = ModelId("m0")
BLOCK = 4  # tokens per page: KVGeometry(4 layers, 2 heads, 16 dims, fp32) = 1 KiB/token on 4 KiB pages


def setup(kv_pages: int, budget: int = 64, mode: str = "recompute", max_seqs: int = 64):
    """A scheduler over a pool with `kv_pages` free after the model's parameters."""
    probe = make_memory(256)
    add_model(probe)
    params = probe.pool.num_pages - probe.pool.num_free
    mem = make_memory(params + kv_pages)
    kv, _, _ = add_model(mem)
    assert kv.block_size == BLOCK and kv.num_free_pages == kv_pages
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, preemption_mode=mode,
                             policy=SchedulingPolicy.VLLM_V0)
    return Scheduler(config, mem.kv), kv


def seq(i: int, prompt_len: int, max_tokens: int = 50) -> Sequence:
    return Sequence(i, M, [5] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True), float(i))


def run_step(sched: Scheduler, seqs: dict[int, Sequence]):
    """Schedule one step and finish it as the engine would (every sampled token is 1)."""
    out = sched.schedule(M)
    sched.postprocess(out, seqs, {s.seq_id: 1 for s in out.seqs if s.samples}, 0.0)
    return out


def add(sched: Scheduler, *new: Sequence) -> dict[int, Sequence]:
    for s in new:
        sched.add(s)
    return {s.seq_id: s for s in new}


def test_a_prefill_step_schedules_no_decodes_and_a_decode_step_no_prefills():
    sched, _ = setup(kv_pages=100)
    seqs = add(sched, seq(0, 8), seq(1, 8))
    out = run_step(sched, seqs)
    assert [(s.seq_id, len(s.token_ids)) for s in out.seqs] == [(0, 8), (1, 8)]  # whole prompts
    seqs |= add(sched, seq(2, 8))
    out = run_step(sched, seqs)
    assert [(s.seq_id, len(s.token_ids)) for s in out.seqs] == [(2, 8)]  # 0 and 1 wait a step
    out = run_step(sched, seqs)
    assert [(s.seq_id, len(s.token_ids)) for s in out.seqs] == [(0, 1), (1, 1), (2, 1)]


def test_prefills_stop_at_the_first_prompt_over_the_budget_first_come_first_served():
    sched, _ = setup(kv_pages=100, budget=20)
    seqs = add(sched, seq(0, 12), seq(1, 12), seq(2, 4))
    out = run_step(sched, seqs)
    assert [s.seq_id for s in out.seqs] == [0]  # 1 does not fit what is left; 2, which would, waits behind it
    out = run_step(sched, seqs)
    assert [s.seq_id for s in out.seqs] == [1, 2]


def test_max_num_seqs_limits_admission():
    sched, _ = setup(kv_pages=100, max_seqs=2)
    seqs = add(sched, seq(0, 4), seq(1, 4), seq(2, 4))
    assert [s.seq_id for s in run_step(sched, seqs).seqs] == [0, 1]
    assert [s.seq_id for s in run_step(sched, seqs).seqs] == [0, 1]  # decodes: 2 has no seat


def test_admission_keeps_the_watermark_free():
    sched, kv = setup(kv_pages=200, budget=2048)  # watermark: 1% of 200 pages = 2
    assert sched.watermark_pages() == 2
    seqs = add(sched, seq(0, 4 * 198), seq(1, 4))
    out = run_step(sched, seqs)
    assert [s.seq_id for s in out.seqs] == [0] and kv.num_free_pages == 2  # 198 pages leave exactly 2
    assert [s.seq_id for s in run_step(sched, seqs).seqs] == [0]  # 1 would take the watermark: decodes only
    assert seqs[1].status is SeqStatus.WAITING


def test_demand_splits_running_growth_from_admissions():
    sched, _ = setup(kv_pages=200, budget=16)  # watermark 2 pages
    seqs = add(sched, seq(0, 4))
    run_step(sched, seqs)  # 0 runs: 5 tokens next step need a second block
    seqs |= add(sched, seq(1, 8), seq(2, 8), seq(3, 8))  # a 16-token step admits 1 and 2: 2 blocks each
    assert sched.kv_demand(M) == (1, 2 + 2 + 2)
    assert sched.kv_pages_needed(M) == 7


def test_a_block_shortage_preempts_the_last_admitted_and_puts_it_at_the_head_of_the_queue():
    sched, _ = setup(kv_pages=5)
    seqs = add(sched, seq(0, 4), seq(1, 4), seq(2, 4))
    run_step(sched, seqs)  # 3 prompts of one page each; every decode then needs a second page
    seqs |= add(sched, seq(3, 4))
    run_step(sched, seqs)  # admitted last: 5 pages - 4 used = 1 free, watermark 0
    assert [s.seq_id for s in sched.running[M]] == [0, 1, 2, 3]
    out = run_step(sched, seqs)  # 0 takes the free page; 3 (the last admitted) goes for 1; 2 then for itself
    assert [s.seq_id for s in out.seqs] == [0, 1] and out.num_preempted == 2
    assert [s.seq_id for s in sched.waiting[M]] == [2, 3]  # back at the head, in admission order
    seqs |= add(sched, seq(4, 4))
    assert [s.seq_id for s in sched.waiting[M]] == [2, 3, 4]  # new arrivals queue behind them


def test_the_victim_is_the_last_admitted_not_the_last_arrived():
    sched, kv = setup(kv_pages=5)
    seqs = add(sched, seq(0, 4), seq(1, 4))
    run_step(sched, seqs)
    sched._preempt(seqs[0])  # noqa: SLF001 - 0 (the first arrival) recomputes: re-admitted after 1
    run_step(sched, seqs)
    assert seqs[0].admitted > seqs[1].admitted
    run_step(sched, seqs)  # 1 decodes into its second page, 0 into its... 5 pages: 2 + 2 + 1 free
    seqs |= add(sched, seq(2, 4))
    run_step(sched, seqs)  # 2 takes the last free page
    assert kv.num_free_pages == 0
    for _ in range(3):
        out = run_step(sched, seqs)
        if out.num_preempted:
            break
    assert out.num_preempted == 1 and seqs[2].status is SeqStatus.WAITING  # 2 was admitted last
    assert seqs[0].status is SeqStatus.RUNNING and seqs[1].status is SeqStatus.RUNNING


def test_swap_mode_brings_sequences_back_only_in_a_step_that_preempted_nothing_before_any_prefill():
    sched, _ = setup(kv_pages=5, mode="swap")
    seqs = add(sched, *(seq(i, 4, max_tokens=8) for i in range(4)))  # each fits the pool alone (3 pages)
    run_step(sched, seqs)
    out = run_step(sched, seqs)  # 4 decodes need 4 more pages, 1 is free: 3 and 2 are swapped out
    assert out.num_preempted == 2 and out.num_swapped_in == 0
    assert [s.seq_id for s in sched.swapped[M]] == [3, 2]  # appended as preempted (vLLM's swapped.extend)
    seqs |= add(sched, seq(4, 4, max_tokens=8))
    out = run_step(sched, seqs)  # swapped ones wait: no prefill for 4, decodes of 0 and 1 only
    assert [s.seq_id for s in out.seqs] == [0, 1]
    for _ in range(200):
        if not sched.has_work(M):
            break
        out = run_step(sched, seqs)
        assert not (out.num_preempted and out.num_swapped_in)
        if any(s.seq_id == 4 and len(s.token_ids) > 1 for s in out.seqs):
            assert not sched.swapped[M]  # 4 is prefilled only once nothing is swapped out
    assert all(s.status is SeqStatus.FINISHED for s in seqs.values())


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_every_sequence_finishes_and_frees_its_pages(mode):
    sched, kv = setup(kv_pages=12, budget=64, mode=mode)
    seqs = add(sched, *(seq(i, 3 + i % 5, max_tokens=6 + i) for i in range(10)))
    for _ in range(500):
        if not sched.has_work(M):
            break
        run_step(sched, seqs)
    assert all(s.status is SeqStatus.FINISHED and len(s.output_token_ids) == s.params.max_tokens
               for s in seqs.values())
    assert kv.num_pages_used == 0 and kv.num_free_pages == 12


def test_a_waiting_head_takes_its_pages_from_later_arrivals_of_another_tenant():
    # remap mode keeps the engine's progress guarantee on top of V0: the oldest request, waiting,
    # is admitted by preempting later arrivals of any tenant once nothing more can be lent (seen in
    # the C2 simulation: without it the head's tenant ran empty steps forever)
    probe = make_memory(256)
    add_model(probe, "m0")
    add_model(probe, "m1")
    params = probe.pool.num_pages - probe.pool.num_free
    mem = make_memory(params + 12)
    add_model(mem, "m0")
    add_model(mem, "m1")
    config = SchedulerConfig(max_num_batched_tokens=64, preemption_mode="remap", policy=SchedulingPolicy.VLLM_V0)
    sched = Scheduler(config, mem.kv, make_room=lambda model, pages: False)  # nothing left to lend
    m1 = ModelId("m1")
    head = seq(0, 16)  # 4 pages, arrived first
    later = [Sequence(i, m1, [5] * 16, SamplingParams(max_tokens=50, ignore_eos=True), float(i)) for i in (1, 2, 3)]
    sched.add(head)
    for s in later:
        sched.add(s)
    out = sched.schedule(m1)
    assert [s.seq_id for s in out.seqs] == [1, 2, 3] and mem.kv[m1].num_free_pages == 0
    out = sched.schedule(M, head, reserve_pages=4)
    assert [s.seq_id for s in out.seqs] == [0] and head.status is SeqStatus.RUNNING
    assert later[2].status is SeqStatus.WAITING and later[2].num_preemptions == 1  # the latest yielded
    assert [s.status for s in later[:2]] == [SeqStatus.RUNNING] * 2
