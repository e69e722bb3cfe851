"""Paged attention over the memory engine's KV layout, with plain torch ops (no custom kernels).

A model's KV cache is one tensor over every page of the pool (see remap/kv.py):

    kv[page, layer, 0 = K | 1 = V, slot, kv_head, dim]        block id == page id

The token at absolute position t of a sequence lives in page table[t // block_size], slot
t % block_size. One step runs several sequences whose new tokens are concatenated into one flat
batch of rows (vLLM v1 style):

    rows:   | seq 0: 7 new (prefill) | seq 1: 1 new | seq 2: 3 new (chunk, 12 cached) | seq 3: 1 new |
    paths:    prefill, one SDPA        decode: one batched SDPA over seqs 1 and 3
                                       prefill, one SDPA

Each layer first writes the step's new K/V into their slots, then reads every sequence's context
back from the pages, so chunked prefill (cached > 0) and decode need no special cases. Decode
sequences are gathered together, padded to the longest block table and masked; prefill sequences
run one at a time. Slots past a sequence's length hold whatever the page held before (pages are
never zeroed), so padded keys and values are zeroed before use: garbage, even NaN, cannot leak in.

Sliding windows (Mistral, Qwen2's sliding layers) are a mask: a query at position p sees keys at
positions p - window < j <= p, the Transformers rule. Blocks that fall out of the window are not
freed; the engine still allocates blocks for the whole context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class AttentionBatch:
    """One forward step over several sequences; their new tokens are consecutive rows, in this order."""

    num_new_tokens: Sequence[int]  # per sequence: query tokens this step (1 = decode), >= 1
    num_cached_tokens: Sequence[int]  # per sequence: tokens whose K/V are in the cache before this step
    block_tables: Sequence[Sequence[int]]  # per sequence: page ids (== block ids) of tokens 0.., in order;
    # must cover num_cached + num_new tokens (extra trailing blocks are allowed)

    @property
    def num_seqs(self) -> int:
        return len(self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        """Rows of the flat batch."""
        return sum(self.num_new_tokens)

    def context_lens(self) -> list[int]:
        """Per sequence: tokens in its context after this step."""
        return [c + n for c, n in zip(self.num_cached_tokens, self.num_new_tokens)]

    def last_rows(self) -> list[int]:
        """Row of each sequence's last new token in the flat batch."""
        rows, end = [], 0
        for n in self.num_new_tokens:
            end += n
            rows.append(end - 1)
        return rows

    def positions(self) -> list[int]:
        """Absolute position of every row."""
        return [t for c, n in zip(self.num_cached_tokens, self.num_new_tokens) for t in range(c, c + n)]

    def check(self, block_size: int, num_pages: int) -> None:
        """ValueError if the batch is malformed for a cache of `num_pages` blocks of `block_size` tokens."""
        if not len(self.num_cached_tokens) == len(self.block_tables) == self.num_seqs:
            raise ValueError(
                f"batch has {self.num_seqs} new-token counts, {len(self.num_cached_tokens)} cached counts "
                f"and {len(self.block_tables)} block tables"
            )
        for i, (n, c, table) in enumerate(zip(self.num_new_tokens, self.num_cached_tokens, self.block_tables)):
            if n < 1 or c < 0:
                raise ValueError(f"sequence {i}: {n} new tokens and {c} cached tokens")
            need = -(-(c + n) // block_size)
            if len(table) < need:
                raise ValueError(
                    f"sequence {i}: {c + n} tokens need {need} blocks of {block_size}, table has {len(table)}"
                )
            bad = [p for p in table[:need] if not 0 <= p < num_pages]
            if bad:
                raise ValueError(f"sequence {i}: page ids {bad} outside the cache's {num_pages} pages")


class PagedAttention:
    """One step's attention, prepared once (index tensors, masks) and called by every layer."""

    def __init__(
        self, batch: AttentionBatch, kv: Tensor, layer_windows: Sequence[int | None], scale: float
    ) -> None:
        num_pages, _, _, block_size = kv.shape[:4]
        batch.check(block_size, num_pages)
        self.kv, self.scale, self.layer_windows = kv, scale, tuple(layer_windows)
        dev = kv.device
        positions = batch.positions()
        tables = [list(t) for t in batch.block_tables]
        rows_table = [tables[i] for i, n in enumerate(batch.num_new_tokens) for _ in range(n)]
        self.positions = torch.tensor(positions, dtype=torch.long, device=dev)  # [rows]
        self._write_pages = torch.tensor([t[p // block_size] for t, p in zip(rows_table, positions)], device=dev)
        self._write_slots = self.positions % block_size
        windows = set(self.layer_windows)
        self._decode = _DecodePlan.build(batch, block_size, windows, dev)
        self._prefills = _PrefillPlan.build_all(batch, block_size, windows, dev)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this step's k, v [rows, kv_heads, dim] in layer `layer`; attention output [rows, heads, dim]."""
        k_cache, v_cache = self.kv[:, layer, 0], self.kv[:, layer, 1]  # [pages, slot, kv_heads, dim] views
        k_cache[self._write_pages, self._write_slots] = k
        v_cache[self._write_pages, self._write_slots] = v
        window = self.layer_windows[layer]
        out = torch.empty_like(q)
        if self._decode is not None:
            out[self._decode.rows] = self._decode.attend(q, k_cache, v_cache, window, self.scale)
        for p in self._prefills:
            out[p.start : p.end] = p.attend(q, k_cache, v_cache, window, self.scale)
        return out


@dataclass(frozen=True)
class _DecodePlan:
    """All one-token sequences of the step, gathered token by token and padded to the longest context.

    Padding keys repeat the sequence's own token 0 (always written, so finite) and are masked out.
    Gathering whole blocks instead would read slots nobody wrote for this sequence: whatever a
    page's earlier owner left there, NaN included, which a score mask cannot neutralise (0 * NaN).
    """

    rows: Tensor  # [num_decodes] row of each decode sequence in the flat batch
    pages: Tensor  # [num_decodes, max_context] page of every key token (padding: the first page)
    slots: Tensor  # [num_decodes, max_context] slot of every key token in its page (padding: 0)
    masks: dict[int | None, Tensor]  # window -> [num_decodes, 1, 1, keys] key visible to the query

    @staticmethod
    def build(batch: AttentionBatch, block_size: int, windows: set[int | None], dev) -> _DecodePlan | None:
        seqs = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        if not seqs:
            return None
        context_lens = [batch.num_cached_tokens[i] + 1 for i in seqs]
        width = max(context_lens)
        lens = torch.tensor(context_lens, device=dev)
        key_pos = torch.arange(width, device=dev)[None, :]  # [1, keys]
        valid = key_pos < lens[:, None]
        width_blocks = -(-width // block_size)
        tables = []
        for i, n in zip(seqs, context_lens):
            table = list(batch.block_tables[i][: -(-n // block_size)])
            tables.append(table + [table[0]] * (width_blocks - len(table)))
        tables = torch.tensor(tables, device=dev)  # [num_decodes, width_blocks]
        token = torch.where(valid, key_pos, 0)  # padding -> token 0
        pages = torch.gather(tables, 1, token // block_size)
        query_pos = (lens - 1)[:, None]
        masks = {w: _window(valid, key_pos, query_pos, w)[:, None, None, :] for w in windows}
        last = batch.last_rows()
        rows = torch.tensor([last[i] for i in seqs], device=dev)
        return _DecodePlan(rows, pages, token % block_size, masks)

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, window: int | None, scale: float) -> Tensor:
        n = len(self.rows)
        k = k_cache[self.pages, self.slots].transpose(1, 2)  # [n, keys, kv_heads, dim] -> [n, kv_heads, keys, dim]
        v = v_cache[self.pages, self.slots].transpose(1, 2)
        query = q[self.rows].view(n, q.shape[1], 1, q.shape[2])  # [n, heads, 1, dim]
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=self.masks[window], scale=scale, enable_gqa=True)
        return out.view(n, q.shape[1], q.shape[2])


@dataclass(frozen=True)
class _PrefillPlan:
    """One sequence with several new tokens (a whole prompt or a chunk of one)."""

    start: int  # first row of the sequence in the flat batch
    end: int  # one past its last row
    context_len: int  # cached + new tokens
    table: Tensor  # [blocks] page ids covering the context
    masks: dict[int | None, Tensor]  # window -> [new, context] key visible to each query

    @staticmethod
    def build_all(batch: AttentionBatch, block_size: int, windows: set[int | None], dev) -> list[_PrefillPlan]:
        plans, start = [], 0
        for n, c, table in zip(batch.num_new_tokens, batch.num_cached_tokens, batch.block_tables):
            if n > 1:
                key_pos = torch.arange(c + n, device=dev)[None, :]
                query_pos = torch.arange(c, c + n, device=dev)[:, None]
                causal = key_pos <= query_pos
                masks = {w: _window(causal, key_pos, query_pos, w) for w in windows}
                blocks = torch.tensor(list(table[: -(-(c + n) // block_size)]), device=dev)
                plans.append(_PrefillPlan(start, start + n, c + n, blocks, masks))
            start += n
        return plans

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, window: int | None, scale: float) -> Tensor:
        # [blocks, slot, kv_heads, dim] -> [1, kv_heads, context, dim]
        k = k_cache[self.table].flatten(0, 1)[: self.context_len].transpose(0, 1)[None]
        v = v_cache[self.table].flatten(0, 1)[: self.context_len].transpose(0, 1)[None]
        query = q[self.start : self.end].transpose(0, 1)[None]  # [1, heads, new, dim]
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=self.masks[window], scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)


def _window(visible: Tensor, key_pos: Tensor, query_pos: Tensor, window: int | None) -> Tensor:
    return visible if window is None else visible & (key_pos > query_pos - window)
