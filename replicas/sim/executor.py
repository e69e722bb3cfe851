"""SimExecutor: runs the engine's steps with no tensors and advances a virtual clock by their modeled cost.

Everything but the math is real: the scheduler, the RemapController, the page pool, KV block tables,
staging rings and their integrity checks. Only bytes are missing. `NullBackend` gives the memory
engine meta-tensor views (shapes, no storage) and host master copies on meta too, and `meta_weights` hands the engine a checkpoint of meta tensors, so a GH200-sized pool of 13B-parameter
tenants fits in a few MB of this machine's memory.

Per step the executor charges (see cost.py): the batch's compute; streamed layers of the step's
model (hidden under compute when its ring has >= 2 slots); and the blocking copies the engine made
since the last step: swap-outs and swap-ins of KV blocks, restored layers, KV blocks migrated out of
restored layers' home runs.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass, field

import torch

from remap import Backend, DeviceMemory, ModelId, PageId, SeqId, StagingRing
from replicas.engine.executor import ExecutorResult
from replicas.engine.models import CausalLM, ModelConfig
from replicas.engine.models.architecture import architecture_for
from replicas.engine.scheduler import SchedulerOutput
from replicas.engine.sequence import Sequence, SeqStatus
from replicas.sim.clock import VirtualClock
from replicas.sim.cost import BatchShape, CostModel, StepCost

logger = logging.getLogger(__name__)

META = torch.device("meta")


class NullBackend(Backend):
    """Pages with no bytes: every view is a meta tensor of the right shape, every copy a no-op."""

    needs_home_runs = True  # the arena's placement (HomeRuns), so migrations happen as they would

    def __init__(self, num_pages: int, page_size_bytes: int) -> None:
        self.device, self.num_pages, self.page_size_bytes = META, num_pages, page_size_bytes

    def run_bytes(self, first: PageId, num_pages: int) -> torch.Tensor:
        return torch.empty(num_pages * self.page_size_bytes, dtype=torch.uint8, device=META)

    def kv_view(self, model: ModelId, shape_per_page: Seq[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self.num_pages, *shape_per_page, dtype=dtype, device=META)

    def copy_pages(self, src: Seq[PageId], dst: Seq[PageId], num_bytes: int) -> None:
        pass

    def read_pages(self, pages: Seq[PageId], num_bytes: int, out: torch.Tensor) -> None:
        pass  # `out` (a swap's host tensor) is never touched, so its pages are never committed

    def write_pages(self, pages: Seq[PageId], num_bytes: int, data: torch.Tensor) -> None:
        pass

    def host_copy(self, num_bytes: int) -> torch.Tensor:
        return torch.empty(num_bytes, dtype=torch.uint8, device=META)  # a 13B model's would be 26 GB


class SimDeviceMemory(DeviceMemory):
    """DeviceMemory over a NullBackend: real page bookkeeping, no bytes anywhere."""

    def __init__(self, num_pages: int, page_size_bytes: int = 2 << 20) -> None:
        super().__init__(num_pages, page_size_bytes, backend=NullBackend(num_pages, page_size_bytes))

    @classmethod
    def for_device(cls, memory_bytes: int, page_size_bytes: int = 2 << 20, reserved_fraction: float = 0.1
                   ) -> SimDeviceMemory:
        """A pool over a device's memory less what activations and the runtime keep (vLLM leaves ~10%)."""
        return cls(int(memory_bytes * (1 - reserved_fraction)) // page_size_bytes, page_size_bytes)


def meta_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict of meta tensors with the checkpoint's names, shapes and dtype, for `LLMEngine.add_model`."""
    arch = architecture_for(config)
    shapes = {f"{arch.layer_prefix}{i}.{n}": s for i in range(config.num_layers) for n, s in arch.layer_shapes().items()}
    shapes |= arch.base_shapes()
    return {name: torch.empty(shape, dtype=config.dtype, device=META) for name, shape in shapes.items()}


@dataclass
class SimStats:
    num_steps: int = 0
    busy_s: float = 0.0  # clock time spent in steps
    compute_s: float = 0.0
    transfer_s: float = 0.0  # streamed layers' copies, hidden or not
    exposed_transfer_s: float = 0.0  # streaming time compute did not hide
    blocking_s: float = 0.0  # swaps, restores, migrations
    num_streamed_layers: int = 0
    num_tokens: int = 0  # tokens computed (prefill, decode and recomputed)
    steps: deque[tuple[ModelId, StepCost]] = field(default_factory=deque)  # last `keep_steps` steps (SimExecutor)


class SimExecutor:
    """The engine's Executor without tensors: a fixed next token per sampling sequence, time from a CostModel."""

    def __init__(self, memory: DeviceMemory, cost: CostModel, clock: VirtualClock, token_id: int = 0,
                 keep_steps: int = 10_000) -> None:
        self._memory, self.cost, self.clock, self.token_id = memory, cost, clock, token_id
        self._configs: dict[ModelId, ModelConfig] = {}
        self._remapped: dict[ModelId, frozenset[int]] = {}  # each model's lent layers after the last step
        self._swapped_blocks: dict[SeqId, int] = {}  # swapped-out sequence -> blocks it took to host
        self._migrated = memory.num_blocks_migrated
        self._rings: dict[ModelId, tuple[StagingRing, frozenset[int]] | None] = {}  # model -> last step's ring
        self._last_model: ModelId | None = None  # the previous step's
        # a deque drops the oldest step in O(1); a list shifted 10k entries on every step once full
        self.stats = SimStats(steps=deque(maxlen=keep_steps))

    def add_model(self, model: ModelId, lm: CausalLM) -> None:
        if self.token_id in lm.config.eos_token_ids or not 0 <= self.token_id < lm.config.vocab_size:
            raise ValueError(f"token {self.token_id} is an eos or outside {model!r}'s vocabulary: sequences "
                             "would stop after one token")
        self._configs[model] = lm.config
        self._remapped[model] = self._memory.params.remapped_layers(model)

    def execute(self, output: SchedulerOutput, seqs: Mapping[SeqId, Sequence], ring: StagingRing | None) -> ExecutorResult:
        model, config = output.model, self._configs[output.model]
        batch = BatchShape(tuple(len(s.token_ids) for s in output.seqs),
                           tuple(s.num_cached_tokens for s in output.seqs),
                           sum(s.samples for s in output.seqs))
        num_streamed = len(self._memory.params.remapped_layers(model)) if ring else 0
        swap_out, swap_in = self._swap_traffic(seqs)
        cost = self.cost.step(
            config, batch,
            streamed_bytes=self._copied_layers(model, ring, num_streamed) * self._memory.params.max_layer_bytes(model),
            num_slots=ring.num_slots if ring else 2,
            swap_out_bytes=swap_out, swap_in_bytes=swap_in,
            restore_bytes=self._restored_bytes(),
            migrate_bytes=self._migrated_bytes(),
            num_streamed=num_streamed,
            switched=self._last_model not in (None, model),
        )
        self._last_model = model
        self.clock.advance(cost.total_s)
        self._record(model, cost, num_streamed, sum(batch.num_new_tokens))
        sampled = {s.seq_id: self.token_id for s in output.seqs if s.samples}
        return ExecutorResult(sampled, {}, num_streamed, cost.exposed_transfer_s)  # not compute: see engine.step

    # ---- what the engine moved since the last step ---------------------------------------
    def _copied_layers(self, model: ModelId, ring: StagingRing | None, num_streamed: int) -> int:
        """Streamed layers copied this step: all of them, unless the ring has a slot for each and
        already held them in its last pass (a slot keeps its layer across passes: remap/staging.py)."""
        layers = self._memory.params.remapped_layers(model)  # the same set lent: the same layers resident
        last = self._rings.get(model)
        kept = ring is not None and num_streamed <= ring.num_slots and last is not None and last[0] is ring and last[1] == layers
        self._rings[model] = (ring, layers) if ring is not None else None
        return 0 if kept else num_streamed

    def _swap_traffic(self, seqs: Mapping[SeqId, Sequence]) -> tuple[float, float]:
        """(bytes swapped out, bytes swapped in) since the last step, from the sequences' states."""
        out_bytes = in_bytes = 0.0
        if not self._swapped_blocks and not any(kv.num_swapped for kv in self._memory.kv.values()):
            return out_bytes, in_bytes  # nothing on the host before or now (every step without swapping)
        swapped = {sid for sid, s in seqs.items() if s.status is SeqStatus.SWAPPED}
        for sid in swapped - self._swapped_blocks.keys():
            kv = self._memory.kv[seqs[sid].model]
            self._swapped_blocks[sid] = kv.num_swapped_blocks(sid)
            out_bytes += self._swapped_blocks[sid] * kv.block_bytes
        for sid in list(self._swapped_blocks.keys() - swapped):
            blocks = self._swapped_blocks.pop(sid)
            seq = seqs.get(sid)
            if seq is not None and seq.status is SeqStatus.RUNNING:  # back on device (not aborted)
                in_bytes += blocks * self._memory.kv[seq.model].block_bytes
        return out_bytes, in_bytes

    def _restored_bytes(self) -> float:
        nbytes = 0.0
        for model in self._configs:  # restored: lent at the last step, resident now
            now = self._memory.params.remapped_layers(model)
            if now is self._remapped[model]:  # the same set object: no reclaim or restore since (ParamStore)
                continue
            nbytes += sum(self._memory.params.slab(model, i).num_bytes for i in self._remapped[model] - now)
            self._remapped[model] = now
        return nbytes

    def _migrated_bytes(self) -> float:
        moved, self._migrated = self._memory.num_blocks_migrated - self._migrated, self._memory.num_blocks_migrated
        return moved * self._memory.page_size_bytes

    def _record(self, model: ModelId, cost: StepCost, num_streamed: int, num_tokens: int) -> None:
        st = self.stats
        st.num_steps += 1
        st.busy_s += cost.total_s
        st.compute_s += cost.compute_s
        st.transfer_s += cost.transfer_s
        st.exposed_transfer_s += cost.exposed_transfer_s
        st.blocking_s += cost.blocking_s
        st.num_streamed_layers += num_streamed
        st.num_tokens += num_tokens
        st.steps.append((model, cost))  # the deque keeps the last keep_steps
        logger.debug("sim step %s: %s", model, cost)


def make_sim_engine(device, engine_config=None, *, num_pages: int | None = None, page_size_bytes: int = 2 << 20,
                    cost: CostModel | None = None, clock: VirtualClock | None = None, token_id: int = 0):
    """An LLMEngine on a SimDeviceMemory sized for `device` (a DeviceProfile), driven by a SimExecutor
    on a VirtualClock; the link bandwidth is the profile's, not measured. Add models with
    `engine.add_model(name, config, meta_weights(config))`."""
    import dataclasses

    from replicas.engine.engine import EngineConfig, LLMEngine  # the engine imports models; keep ours light

    engine_config = engine_config or EngineConfig()
    if engine_config.link_bytes_per_s is None:
        engine_config = dataclasses.replace(engine_config, link_bytes_per_s=device.link_bytes_per_s)
    cost = cost or CostModel(device)
    if engine_config.copies_overlap is None:  # the cost model's copies, not the simulated memory's inline ones
        engine_config = dataclasses.replace(engine_config, copies_overlap=cost.params.copies_overlap)
    memory = (SimDeviceMemory(num_pages, page_size_bytes) if num_pages is not None
              else SimDeviceMemory.for_device(device.memory_bytes, page_size_bytes))
    clock = clock or VirtualClock()
    executor = SimExecutor(memory, cost, clock, token_id)
    engine = LLMEngine(memory, engine_config, clock=clock, executor=executor, step_timer=clock)
    return engine, executor
