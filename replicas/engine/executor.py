"""Executors: run one SchedulerOutput and return the sampled token of every sequence that samples.

`TorchExecutor` runs real tensors (CPU or CUDA). Weights always come from the memory engine:
resident layers from their pages, remapped layers from the model's staging ring, fetched layer by
layer as the forward pass reaches them (`LayerSource`). A cost-model executor for the simulator
implements the same `Executor` interface without tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from remap import BASE_SLAB, DeviceMemory, ModelId, SeqId, StagingRing
from replicas.engine.models import AttentionBatch, CausalLM
from replicas.engine.sampling import History, adjust_logits, sample
from replicas.engine.scheduler import SchedulerOutput
from replicas.engine.sequence import Sequence


@dataclass(frozen=True)
class ExecutorResult:
    sampled: dict[SeqId, int]  # next token of each sequence whose `samples` flag was set
    logprobs: dict[SeqId, dict[int, float]]  # chosen token (and top-N) logprobs, where requested
    num_streamed_layers: int  # remapped layers computed from staging slots in this step
    transfer_wait_s: float = 0.0  # of the step's time, spent waiting for streamed layers' copies
    failed: dict[SeqId, str] = field(default_factory=dict)  # requests whose own part of the step failed, and why


class Executor(Protocol):
    def add_model(self, model: ModelId, lm: CausalLM) -> None:
        ...

    def execute(self, output: SchedulerOutput, seqs: Mapping[SeqId, Sequence], ring: StagingRing | None) -> ExecutorResult:
        ...


class LayerSource:
    """Hands a forward pass each layer's weights: resident pages, or the staging ring."""

    def __init__(self, memory: DeviceMemory, model: ModelId, ring: StagingRing | None) -> None:
        self._params, self._model, self._ring = memory.params, model, ring
        self.num_streamed = 0

    def get(self, layer: int) -> Mapping[str, torch.Tensor]:
        if self._params.is_resident(self._model, layer):
            return self._params.tensors(self._model, layer)
        if self._ring is None:
            raise RuntimeError(f"layer {layer} of {self._model!r} is remapped and no staging ring is open")
        self.num_streamed += 1
        return self._ring.acquire(layer)

    def release(self, layer: int) -> None:
        if self._ring is not None and not self._params.is_resident(self._model, layer):
            self._ring.release(layer)


class TorchExecutor:
    def __init__(self, memory: DeviceMemory) -> None:
        self._memory = memory
        self._models: dict[ModelId, CausalLM] = {}

    def add_model(self, model: ModelId, lm: CausalLM) -> None:
        self._models[model] = lm

    def execute(self, output: SchedulerOutput, seqs: Mapping[SeqId, Sequence], ring: StagingRing | None) -> ExecutorResult:
        model, device = output.model, self._memory.device
        batch = AttentionBatch(
            num_new_tokens=[len(s.token_ids) for s in output.seqs],
            num_cached_tokens=[s.num_cached_tokens for s in output.seqs],
            block_tables=[s.block_table for s in output.seqs],
        )
        input_ids = torch.tensor([t for s in output.seqs for t in s.token_ids], dtype=torch.long, device=device)
        sampling = [i for i, s in enumerate(output.seqs) if s.samples]
        if not sampling:
            rows = None
        else:
            last = batch.last_rows()
            rows = torch.tensor([last[i] for i in sampling], dtype=torch.long, device=device)
        source = LayerSource(self._memory, model, ring)
        if ring is not None:
            ring.begin_pass(sorted(set(range(self._memory.params.num_layers(model)))
                                   - set(self._memory.params.resident_layers(model))))
        with torch.inference_mode():
            logits = self._models[model].forward(
                input_ids, batch, self._memory.kv[model].view, source,
                self._memory.params.tensors(model, BASE_SLAB), rows,
            )
        if ring is not None:
            ring.finish()
        if not sampling:
            return ExecutorResult({}, {}, source.num_streamed, self._transfer_wait_s(ring))
        chosen = [seqs[output.seqs[i].seq_id] for i in sampling]
        params, raw = [s.params for s in chosen], logits.float()
        adjusted, failed = _adjust(raw, chosen)
        tokens, logprobs, failed_rows = sample(adjusted, params, [s.generator for s in chosen],
                                               [s.num_generated for s in chosen])
        if logprobs is not None and adjusted is not raw:  # logprobs are the model's, before penalties (vLLM's)
            logprobs = raw.log_softmax(-1)
        failed |= {chosen[row].seq_id: why for row, why in failed_rows.items()}
        sampled = {s.seq_id: int(t) for s, t in zip(chosen, tokens.tolist()) if s.seq_id not in failed}
        lp = {}
        for row, s in enumerate(chosen):
            if logprobs is None or s.params.logprobs is None or s.seq_id in failed:
                continue
            try:
                lp[s.seq_id] = _logprobs_entry(logprobs[row], sampled[s.seq_id], s.params.logprobs)
            except Exception as exc:  # noqa: BLE001 - this request's logprobs, nobody else's
                failed[s.seq_id] = f"logprobs failed: {type(exc).__name__}: {exc}"
                del sampled[s.seq_id]
        return ExecutorResult(sampled, lp, source.num_streamed, self._transfer_wait_s(ring), failed)

    def _transfer_wait_s(self, ring: StagingRing | None) -> float:
        """Of this step's time, the waits for copies: the ring's on the host (inline copies), and the
        device's stalls on copy events (CUDA: streamed layers, and restores of the step's memory plan),
        as far as the device has timed them (a step with nothing to sample does not wait for it)."""
        return (ring.wait_s if ring is not None else 0.0) + self._memory.transfer.take_device_wait_s()


def _logprobs_entry(logprobs: torch.Tensor, token: int, top_n: int) -> dict[int, float]:
    """{token id: logprob}: the chosen token's, and the top `top_n` (0: the chosen only)."""
    entry = {token: float(logprobs[token])}
    if top_n:
        top = torch.topk(logprobs, top_n)
        entry.update({int(i): float(v) for v, i in zip(top.values, top.indices)})
    return entry


def _adjust(raw: torch.Tensor, chosen: list[Sequence]) -> tuple[torch.Tensor, dict[SeqId, str]]:
    """Penalties, bias and min_tokens for the whole batch at once; if that raises, row by row, so
    that the request whose adjustment fails is the only one that fails."""
    params, histories = [s.params for s in chosen], [_history(s) for s in chosen]
    try:
        return adjust_logits(raw, params, histories), {}
    except Exception:  # noqa: BLE001 - find whose it is
        adjusted, failed = raw.clone(), {}
        for row, seq in enumerate(chosen):
            try:
                adjusted[row] = adjust_logits(raw[row:row + 1], params[row:row + 1], histories[row:row + 1])[0]
            except Exception as exc:  # noqa: BLE001 - this request's penalty, nobody else's
                failed[seq.seq_id] = (f"a logits adjustment (penalty, bias, min_tokens) failed: "
                                      f"{type(exc).__name__}: {exc}")
        return adjusted, failed


def _history(seq: Sequence) -> History:
    stop_ids = seq.params.stop_token_ids + (() if seq.params.ignore_eos else seq.eos_token_ids)
    k = seq.params.num_generated  # a continuation's earlier output sits at the end of its prompt
    return History(seq.prompt_token_ids[:len(seq.prompt_token_ids) - k], seq.generated_token_ids, stop_ids)
