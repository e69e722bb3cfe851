"""Scheduler: continuous batching for several tenants that share one device's page pool.

Each step runs one tenant's batch (temporal sharing): the tenant served longest ago that has work,
so no tenant starves. Within the step, in order: swapped sequences come back if they fit, running
sequences get their next tokens (a decode, or the next chunk of a chunked prefill), then waiting
sequences are admitted FIFO while the token budget, the running-sequence limit and free pages allow.

When a running sequence needs a block and the pool is empty, `make_room` (the engine's remap hook,
mode `remap`) may lend parameter pages; otherwise, or if that fails, the most recently arrived
running sequence of its own tenant is preempted (of any tenant, for the head below): its KV goes to
host (`swap`) or is dropped and recomputed later (`recompute`). Within a tenant memory is first come,
first served: a sequence never loses its pages to a later arrival, and queues stay in arrival order.
(Taking other tenants' pages for every growth made tenants take turns preempting each other.)

Admission never preempts, except for the engine's `head` (its oldest unfinished request): when the
head's tenant is scheduled, the head is admitted first and grows like a running sequence, so later
arrivals of every tenant yield to it. That is the progress guarantee: the head runs on every step of
its tenant until it finishes, and then the next oldest is the head. The scheduler handles integer
ids only; tensors live in the executor.

Two policies (`SchedulerConfig.policy`):

    chunked   the above (the default): decodes and prefill chunks share each step's token budget
    vllm-v0   vLLM v0.7.3's default scheduler (`Scheduler._schedule_default`, chunked prefill off), the
              paper's baseline: a step either prefills whole prompts, FCFS from the waiting queue
              until the budget, max_num_seqs or a block shortage stops it (admission keeps a 1%
              watermark of the KV pages free), and then schedules no decodes; or decodes every
              running sequence, preempting the most recently admitted one on a block shortage (after
              `make_room`, as the paper's patch does) and putting preempted sequences back at the
              head of the waiting queue; or, if that step preempted nothing, swaps sequences back in.
              With the remap hook the head keeps its privileges on top (first in its queue, its
              reservation kept free). A prompt is prefilled in one step, so the engine refuses
              requests longer than the budget.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import islice

from remap import KVBlocks, ModelId, SeqId
from replicas.engine.sequence import FinishReason, Sequence, SeqStatus

logger = logging.getLogger(__name__)


class PreemptionMode(str, enum.Enum):
    REMAP = "remap"  # Oneiros: lend parameter pages first, then recompute as the last resort
    SWAP = "swap"  # KV blocks to host and back (vLLM swap, Pie)
    RECOMPUTE = "recompute"  # drop KV, recompute prompt + output later (vLLM's default)


class SchedulingPolicy(str, enum.Enum):
    CHUNKED = "chunked"  # chunked prefill, the head first (ours; the default)
    VLLM_V0 = "vllm-v0"  # vLLM v0.7.3's default: whole prefills first, no decodes in a prefill step


WATERMARK_FRACTION = 0.01  # vllm-v0: KV pages admission leaves free (vLLM's block manager watermark)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # tokens computed per step: prefill chunks plus decodes
    max_num_seqs: int = 64  # running sequences per tenant
    preemption_mode: PreemptionMode = PreemptionMode.REMAP
    policy: SchedulingPolicy = SchedulingPolicy.CHUNKED
    model_budgets: Mapping[str, int] = field(default_factory=dict)  # per-tenant token budgets (the simulator's
    # one-engine-per-model vLLM: max(max_model_len, 2048) each); others get max_num_batched_tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "preemption_mode", PreemptionMode(self.preemption_mode))
        object.__setattr__(self, "policy", SchedulingPolicy(self.policy))
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(f"limits must be >= 1: {self.max_num_batched_tokens=}, {self.max_num_seqs=}")

    def budget(self, model: str) -> int:
        """Tokens one step of `model` may compute."""
        return self.model_budgets.get(model, self.max_num_batched_tokens)


@dataclass(frozen=True)
class ScheduledSeq:
    seq_id: SeqId
    token_ids: tuple[int, ...]  # the new tokens computed this step (positions num_cached_tokens..)
    num_cached_tokens: int  # tokens already in the KV cache before this step
    block_table: tuple[int, ...]  # page ids covering num_cached_tokens + len(token_ids) tokens
    samples: bool  # this step reaches the sequence's last token: sample its next one


@dataclass(frozen=True)
class SchedulerOutput:
    model: ModelId  # the one tenant this step runs
    seqs: tuple[ScheduledSeq, ...]  # in batch order
    num_preempted: int  # sequences preempted while building this step
    num_swapped_in: int  # sequences whose KV came back from host


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: dict[ModelId, KVBlocks],
        make_room: Callable[[ModelId, int], bool] | None = None,
    ) -> None:
        self.config = config
        self._kv = kv  # live: tenants added later appear here too
        self._make_room = make_room  # (model, pages wanted) -> whether pages were freed
        self.waiting: dict[ModelId, deque[Sequence]] = {}
        self.running: dict[ModelId, list[Sequence]] = {}
        self.swapped: dict[ModelId, deque[Sequence]] = {}
        self._last_served: dict[ModelId, int] = {}
        self._step = 0
        self._admissions = 0  # vllm-v0's running-queue order: each sequence's last admission
        self._head: Sequence | None = None  # this step's head (the engine's oldest request), if any
        self.num_preemptions = 0
        for model in kv:
            self.add_tenant(model)

    def add_tenant(self, model: ModelId) -> None:
        self.waiting.setdefault(model, deque())
        self.running.setdefault(model, [])
        self.swapped.setdefault(model, deque())
        self._last_served.setdefault(model, -1)

    # ---- queue ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting[seq.model].append(seq)

    def has_work(self, model: ModelId | None = None) -> bool:
        if model:  # asked for every tenant several times a step: no list, no generator
            return bool(self.waiting[model] or self.running[model] or self.swapped[model])
        return any(self.waiting[m] or self.running[m] or self.swapped[m] for m in self._kv)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its pages at once."""
        for queue in (self.waiting[seq.model], self.running[seq.model], self.swapped[seq.model]):
            if seq in queue:
                queue.remove(seq)
        self._finish(seq, FinishReason.ABORT)

    def next_tenant(self) -> ModelId | None:
        """The tenant served longest ago that has work (ties by name)."""
        busy = [m for m in self._kv if self.has_work(m)]
        return min(busy, key=lambda m: (self._last_served[m], m)) if busy else None

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, model: ModelId, head: Sequence | None = None, reserve_pages: int = 0) -> SchedulerOutput:
        """One step of `model`'s batch. `head`, when it is this tenant's, runs first (see above);
        other sequences are admitted or swapped in only while `reserve_pages` (what the head may
        still need) stay free."""
        self._step += 1
        self._last_served[model] = self._step
        self._head = head
        if self.config.policy is SchedulingPolicy.VLLM_V0:
            return self._schedule_v0(model, head, reserve_pages)
        kv, budget = self._kv[model], self.config.budget(model)
        preempted_before = self.num_preemptions
        if head is not None and head.model == model and head.status is not SeqStatus.RUNNING:
            self._admit_head(head)
        swapped_in = self._swap_in(model, reserve_pages)
        scheduled: list[ScheduledSeq] = []
        taken: set[SeqId] = set()
        self.running[model].sort(key=_order)  # the oldest grows first and gets the token budget first
        for seq in list(self.running[model]):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted to make room for an earlier one
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._grow(seq, n, taken):
                continue
            scheduled.append(self._scheduled(seq, n, kv))
            taken.add(seq.seq_id)
            budget -= n
        waiting = self.waiting[model]
        while waiting and budget > 0 and len(self.running[model]) < self.config.max_num_seqs:
            seq = waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            need = kv.num_blocks_for(seq.num_computed_tokens + n) - len(kv.table(seq.seq_id))
            if kv.num_free_pages - need < reserve_pages or kv.alloc(seq.seq_id, need) is None:
                break
            waiting.popleft()
            self._run(seq)
            scheduled.append(self._scheduled(seq, n, kv))
            budget -= n
        return SchedulerOutput(model, tuple(scheduled), self.num_preemptions - preempted_before, swapped_in)

    def _schedule_v0(self, model: ModelId, head: Sequence | None, reserve_pages: int) -> SchedulerOutput:
        """One step of vLLM v0.7.3's `_schedule_default` (see the module docstring). With the remap
        hook, the engine's progress guarantee holds on top: a waiting head goes first in its queue and
        other admissions leave the head's `reserve_pages` free."""
        kv, budget, seats = self._kv[model], self.config.budget(model), self.config.max_num_seqs
        running, waiting = self.running[model], self.waiting[model]
        scheduled: list[ScheduledSeq] = []
        if self._make_room is None:
            head, reserve_pages = None, 0
        if head is not None and head.model == model and head.status is SeqStatus.WAITING and waiting[0] is not head:
            waiting.remove(head)
            waiting.appendleft(head)
        if not self.swapped[model]:  # swapped sequences come back before anything new is prefilled
            watermark = self.watermark_pages() if waiting and len(running) < seats else 0  # read only below
            while waiting and len(running) < seats:
                seq = waiting[0]
                n = seq.num_uncomputed_tokens
                need = kv.num_blocks_for(seq.num_tokens)
                if seq is head:  # what it was promised: later arrivals of any tenant yield their pages
                    if n > budget or not self._alloc_head(head, need):
                        break
                elif n > budget or kv.num_free_pages - need < max(watermark, reserve_pages) or kv.alloc(
                        seq.seq_id, need) is None:
                    break
                waiting.popleft()
                self._run(seq)
                scheduled.append(self._scheduled(seq, n, kv))
                budget -= n
            if scheduled:  # "Don't schedule decodes if prefills are scheduled."
                return SchedulerOutput(model, tuple(scheduled), 0, 0)
        preempted_before = self.num_preemptions
        taken: set[SeqId] = set()
        running.sort(key=_admitted)
        for seq in list(running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted for an earlier-admitted one
                continue
            if not self._grow(seq, 1, taken, key=_admitted):
                continue
            scheduled.append(self._scheduled(seq, 1, kv))
            taken.add(seq.seq_id)
            budget -= 1
        swapped_in = 0
        swapped = self.swapped[model]
        if self.num_preemptions == preempted_before and swapped:  # a preemption means no room to bring any back
            watermark = self.watermark_pages()
            while swapped and budget > 0 and len(running) < seats:
                seq = swapped[0]
                if kv.num_free_pages - kv.num_swapped_blocks(seq.seq_id) - 1 < watermark or kv.swap_in(seq.seq_id) is None:
                    break
                swapped.popleft()
                self._run(seq)
                n = seq.num_uncomputed_tokens
                kv.alloc(seq.seq_id, kv.num_blocks_for(seq.num_tokens) - len(kv.table(seq.seq_id)))  # the 1 spare page
                scheduled.append(self._scheduled(seq, n, kv))
                budget -= n
                swapped_in += 1
        return SchedulerOutput(model, tuple(scheduled), self.num_preemptions - preempted_before, swapped_in)

    def _alloc_head(self, head: Sequence, need: int) -> bool:
        """vllm-v0: the waiting head's blocks, lending parameters or preempting later arrivals of any
        tenant for them; False while nothing later holds device memory."""
        kv = self._kv[head.model]
        while kv.alloc(head.seq_id, need) is None:
            if not self._make_room(head.model, need) and not self._preempt_after(head):
                return False
        return True

    def watermark_pages(self) -> int:
        """vllm-v0: pages admission leaves free, 1% of the pages KV holds or could take now."""
        kv_pages = next(iter(self._kv.values())).num_free_pages + sum(k.num_pages_used for k in self._kv.values())
        return int(WATERMARK_FRACTION * kv_pages)

    def _run(self, seq: Sequence) -> None:
        """Make a sequence running (admitted or back from host): the latest in vllm-v0's running queue."""
        self._admissions += 1
        seq.admitted = self._admissions
        seq.status = SeqStatus.RUNNING
        self.running[seq.model].append(seq)

    def _admit_head(self, head: Sequence) -> None:
        """Make the head running: back from host, or out of the queue (its blocks then come from
        `_grow` like any running sequence's). Later arrivals of any tenant are preempted for it."""
        model, kv = head.model, self._kv[head.model]
        running = self.running[model]
        if len(running) >= self.config.max_num_seqs:  # its seat: the latest of this tenant yields it
            self._preempt(max(running, key=_order))
        if head.status is SeqStatus.SWAPPED:
            need = kv.num_swapped_blocks(head.seq_id)
            while kv.swap_in(head.seq_id) is None:
                if not (self._make_room is not None and self._make_room(model, need)) and not self._preempt_after(head):
                    return  # nothing later holds device memory: it waits (admission said it fits alone)
            self.swapped[model].remove(head)
        else:
            self.waiting[model].remove(head)
        head.status = SeqStatus.RUNNING
        running.insert(0, head)

    def _grow(self, seq: Sequence, n: int, taken: set[SeqId], key=None) -> bool:
        """Blocks for n more tokens of a running sequence, preempting later ones (by `key`: arrival,
        or vllm-v0's admission) if needed."""
        kv = self._kv[seq.model]
        need = kv.num_blocks_for(seq.num_computed_tokens + n) - len(kv.table(seq.seq_id))
        while kv.alloc(seq.seq_id, need) is None:
            if self._make_room is not None and self._make_room(seq.model, need):
                continue
            victim = self._victim(seq, taken, key or _order)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, seq: Sequence, taken: set[SeqId], key) -> Sequence:
        """The latest (by `key`) running sequence not yet in this step's batch: of every tenant for the
        head, of `seq`'s own tenant otherwise (as one engine per model would; letting every growth take
        other tenants' pages made them take turns preempting each other: C1 trace, recompute, P99
        stall 0.23 -> 59 s). `seq` itself is among them."""
        tenants = self.running.values() if seq is self._head else (self.running[seq.model],)
        return max((s for seqs in tenants for s in seqs if s.seq_id not in taken), key=key)

    def _preempt_after(self, seq: Sequence) -> bool:
        """Preempt the latest running sequence that arrived after `seq`; False if there is none."""
        later = [s for seqs in self.running.values() for s in seqs if _order(s) > _order(seq)]
        if not later:
            return False
        self._preempt(max(later, key=_order))
        return True

    def preempt_latest(self, keep: Sequence | None = None, model: ModelId | None = None) -> bool:
        """Preempt the latest-arriving running sequence but `keep` (the engine's head), of `model` or
        of any tenant; False if none is left to preempt."""
        running = [s for m, seqs in self.running.items() if model in (None, m) for s in seqs if s is not keep]
        if not running:
            return False
        self._preempt(max(running, key=_order))
        return True

    def _preempt(self, seq: Sequence) -> None:
        kv = self._kv[seq.model]
        self.running[seq.model].remove(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        v0 = self.config.policy is SchedulingPolicy.VLLM_V0
        if self.config.preemption_mode is PreemptionMode.SWAP:
            kv.swap_out(seq.seq_id)
            seq.status = SeqStatus.SWAPPED
            if v0:  # vLLM: swapped.extend(swapped_out)
                self.swapped[seq.model].append(seq)
            else:
                _requeue(self.swapped[seq.model], seq)
        else:
            kv.free(seq.seq_id)
            seq.num_computed_tokens = 0
            seq.status = SeqStatus.WAITING
            if v0:  # vLLM: waiting.extendleft(preempted), each victim admitted before the step's last one
                self.waiting[seq.model].appendleft(seq)
            else:
                _requeue(self.waiting[seq.model], seq)
        logger.debug("preempted seq %d of %s (%s)", seq.seq_id, seq.model, seq.status.value)

    def _swap_in(self, model: ModelId, reserve_pages: int) -> int:
        n, swapped, kv = 0, self.swapped[model], self._kv[model]
        while swapped and len(self.running[model]) < self.config.max_num_seqs:
            seq = swapped[0]
            if kv.num_free_pages - kv.num_swapped_blocks(seq.seq_id) < reserve_pages or kv.swap_in(seq.seq_id) is None:
                break
            swapped.popleft()
            self._run(seq)
            n += 1
        return n

    @staticmethod
    def _scheduled(seq: Sequence, n: int, kv: KVBlocks) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(
            seq.seq_id, tuple(seq.token_ids(start, start + n)), start, tuple(kv.table(seq.seq_id)),
            samples=start + n == seq.num_tokens,
        )

    # ---- after the step ------------------------------------------------------------------
    def postprocess(self, output: SchedulerOutput, seqs: dict[SeqId, Sequence], sampled: dict[SeqId, int],
                    now_s: float, failed: Mapping[SeqId, str] | None = None) -> list[Sequence]:
        """Advance computed tokens, append sampled ones, finish what stops and what `failed` (this
        request's part of the step, or its stop check, raised: it alone ends, with ERROR). Returns
        finished sequences."""
        finished = []
        for s in output.seqs:
            seq = seqs[s.seq_id]
            why = (failed or {}).get(s.seq_id)
            if why is None:
                seq.num_computed_tokens += len(s.token_ids)
                if not s.samples:
                    continue
                seq.append_token(sampled[s.seq_id], now_s)
                try:
                    reason = seq.check_stop()
                except Exception as exc:  # noqa: BLE001 - a stop string's detokenizer, this request's alone
                    why = f"the stop check failed: {type(exc).__name__}: {exc}"
            if why is not None:
                seq.error, reason = why, FinishReason.ERROR
            if reason is not None:
                self.running[seq.model].remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def fail(self, seq: Sequence, why: str) -> None:
        """End a sequence wherever it is with ERROR (its step failed) and free its pages."""
        self.abort(seq)
        seq.finish_reason, seq.error = FinishReason.ERROR, why

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self._kv[seq.model].free(seq.seq_id)

    # ---- demand, for the remap controller ------------------------------------------------
    def kv_pages_needed(self, model: ModelId) -> int:
        """Extra pages the tenant needs for its next step: growth of running sequences, swapped ones
        coming back, and first chunks of waiting ones (up to the token budget)."""
        return sum(self.kv_demand(model))

    def kv_demand(self, model: ModelId) -> tuple[int, int]:
        """kv_pages_needed in two parts: (running: growth of running sequences and swapped ones coming
        back, admitting: what admitting waiting ones would take)."""
        kv, budget, swapped = self._kv[model], self.config.budget(model), self.swapped[model]
        need = sum(kv.num_swapped_blocks(s.seq_id) for s in swapped) if swapped else 0
        if self.config.policy is SchedulingPolicy.VLLM_V0:
            return self._v0_demand(model, need, budget)
        for seq in self.running[model]:
            n = min(seq.num_uncomputed_tokens, budget)
            need += max(0, kv.num_blocks_for(seq.num_computed_tokens + n) - len(kv.table(seq.seq_id)))
            budget -= n
        admitting = 0
        for seq in islice(self.waiting[model], max(0, self.config.max_num_seqs - len(self.running[model]))):
            if budget <= 0:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            admitting += kv.num_blocks_for(seq.num_computed_tokens + n)
            budget -= n
        return need, admitting

    def _v0_demand(self, model: ModelId, need: int, budget: int) -> tuple[int, int]:
        """vllm-v0: a page for each running sequence's next token that starts a block, and the whole
        prompts of the waiting ones its next prefill step would admit, plus the watermark."""
        kv = self._kv[model]
        blocks_for, table = kv.num_blocks_for, kv.table  # per running sequence, for every tenant, every step
        need += sum([blocks_for(s.num_tokens) - len(table(s.seq_id)) for s in self.running[model]])
        if self.swapped[model]:
            return need, 0
        prompts = 0
        for seq in islice(self.waiting[model], max(0, self.config.max_num_seqs - len(self.running[model]))):
            if seq.num_uncomputed_tokens > budget:
                break
            prompts += kv.num_blocks_for(seq.num_tokens)
            budget -= seq.num_uncomputed_tokens
        return need, (prompts + self.watermark_pages() if prompts else 0)


def _order(seq: Sequence) -> tuple[float, SeqId]:
    return seq.order


def _admitted(seq: Sequence) -> int:
    return seq.admitted


def _requeue(queue: deque[Sequence], seq: Sequence) -> None:
    """Put a preempted sequence back in arrival order (ahead of everything that came after it)."""
    i = next((k for k, s in enumerate(queue) if s.order > seq.order), len(queue))
    queue.insert(i, seq)
