"""Paged attention over the memory engine's KV layout: torch SDPA (CPU and GPU) behind a backend seam.

A model's KV cache is one tensor over every page of the pool (see remap/kv.py):

    kv[page, layer, 0 = K | 1 = V, slot, kv_head, dim]        block id == page id

The token at absolute position t of a sequence lives in page table[t // block_size], slot
t % block_size. One step runs several sequences whose new tokens are concatenated into one flat
batch of rows (vLLM v1 style):

    rows:   | seq 0: 7 new (prefill) | seq 1: 1 new | seq 2: 3 new (chunk, 12 cached) | seq 3: 1 new |
    calls:    prefill group: seqs 0 and 2 padded   decode group: seqs 1 and 3, one SDPA call
              to 7 queries x 15 keys, one SDPA call

Each layer first writes the step's new K/V into their slots, then reads every sequence's context
back from the pages, so chunked prefill (cached > 0) and decode need no special cases. A group's
sequences are gathered token by token (head-major, see below), padded to its longest query count and
longest context, and masked; the plan is built once per step and reused by every layer: its integer
index arrays go to the device in one copy (StepMetadata), the masks are computed there. Prefills
share one call unless padding would more than double the work (then they split into several
groups); decodes always share one.

Grouped-query attention is folded into the query axis: the `group = heads / kv_heads` query heads
that read one KV head become `group` extra query rows of that head, so SDPA sees as many heads in
q as in k and v, and nothing repeats K/V or upcasts them:

    q [seqs, queries, heads, dim]  ->  [seqs, kv_heads, queries * group, dim]   (row = query * group + g)
    k [seqs, keys, kv_heads, dim]  ->  [seqs, kv_heads, keys, dim]
    mask [seqs, 1, queries * group, keys]   (decode: [seqs, 1, 1, keys], broadcast; none if unneeded)

On the CPU a decode group (one query a sequence) of MATMUL_DECODE_MIN_HEADS (sequence, KV head) pairs
or more skips SDPA, whose flash kernel tiles queries by 32 or more and spreads little work over two
threads badly: two batched matmuls and a softmax over the contiguous K/V take about 60% of its time
at 16 sequences (_decode_attention).

Masks are additive (0 / -inf) in the KV dtype, which SDPA's memory-efficient CUDA kernel takes
as is; on CUDA the key axis is padded to a multiple of 16 so that kernel needs no copy of the mask.

Padding never reads a slot nobody wrote: padded keys repeat the sequence's own token 0 (always
written, so finite) and are masked out; padded query rows repeat the sequence's last query and
its visibility, and their output is dropped. Pages are never zeroed, so a slot past a sequence's
length can hold anything, NaN included, which a mask cannot neutralise (0 * NaN); gathering token
by token means such slots are never read. Where the layout allows (every stride a whole number of
kv_heads * dim elements, as remap/kv.py lays pages out), a token is one row of a flat [rows, kv_heads *
dim] view of the same storage, and gathers and writes are single-index row copies (index_select,
index_copy_): on the CPU about 5x faster than indexing the 6-d tensor with (page, slot) pairs. Where
a stride is whole only in heads (a page of 256 KB against 3 heads of 64), a token is a few
consecutive rows of heads (KVRows.split). Gathers read one row per KV head (KVRows.by_head) into a
[seqs, kv_heads, keys, dim] buffer, the layout attention takes, so nothing transposes or copies it
again.

Sliding windows (Mistral, Qwen2's sliding layers) are a mask: a query at position p sees keys at
positions p - window < j <= p, the Transformers rule. Blocks that fall out of the window are not
freed; the engine still allocates blocks for the whole context.

Backends: `torch` (the default, CPU and CUDA) is this module. `flashinfer` is a named seam for
FlashInfer's batch decode / prefill wrappers over this paged layout: it is accepted only on CUDA
with the package importable, and planning it raises NotImplementedError, since it was never written
against a GPU (see plan_attention).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from replicas.engine.models.ops import to_device

Tensor = torch.Tensor

BACKENDS = ("torch", "flashinfer")
DEFAULT_BACKEND = "torch"
MAX_PADDING_FACTOR = 2.0  # a prefill group's padded query x key area may be at most this times its real area
CUDA_KEY_ALIGN = 16  # key axis padded to this on CUDA: the memory-efficient kernel's mask alignment
# A decode group on the CPU takes _decode_attention from this many (sequence, KV head) pairs, and only with
# more than one thread: below, or on one thread, SDPA's one call costs less than the matmuls' four ops (the
# 2-core EPYC, 2 threads: 4 x 2 heads of 32, 32 keys 30 against 40 us; 4 x 4 heads of 64 61 against 51 us)
MATMUL_DECODE_MIN_HEADS = 16


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

    def first_rows(self) -> list[int]:
        """Row of each sequence's first new token in the flat batch."""
        rows, start = [], 0
        for n in self.num_new_tokens:
            rows.append(start)
            start += n
        return rows

    def last_rows(self) -> list[int]:
        """Row of each sequence's last new token in the flat batch."""
        return [r + n - 1 for r, n in zip(self.first_rows(), self.num_new_tokens)]

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


def check_backend(name: str, device: torch.device) -> str:
    """`name` if that attention backend can run on `device`; ValueError saying why not otherwise."""
    if name == "torch":
        return name
    if name != "flashinfer":
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
    if device.type != "cuda":
        raise ValueError(f"the flashinfer attention backend needs a CUDA device, not {device}")
    if importlib.util.find_spec("flashinfer") is None:
        raise ValueError("the flashinfer attention backend needs the flashinfer package, which is not importable")
    return name


def plan_attention(
    backend: str, batch: AttentionBatch, kv: Tensor, layer_windows: Sequence[int | None], scale: float
) -> PagedAttention:
    """One step's attention on `backend` (see check_backend), planned once for every layer."""
    if check_backend(backend, kv.device) == "flashinfer":
        # The seam is here so that gpu_check and a config can name it; the wrappers (BatchDecodeWith-
        # PagedKVCacheWrapper / BatchPrefillWithPagedKVCacheWrapper, planned once per step over
        # kv[:, layer] with its page stride) have not been written: no GPU where this code was built.
        raise NotImplementedError("the flashinfer attention backend is not implemented yet; use 'torch'")
    return PagedAttention(batch, kv, layer_windows, scale)


class PagedAttention:
    """One step's attention with torch SDPA, prepared once (index tensors, masks) and called by every layer."""

    backend = "torch"

    def __init__(
        self, batch: AttentionBatch, kv: Tensor, layer_windows: Sequence[int | None], scale: float
    ) -> None:
        num_pages, _, _, block_size = kv.shape[:4]
        batch.check(block_size, num_pages)
        self.kv, self.scale, self.layer_windows = kv, scale, tuple(layer_windows)
        positions = batch.positions()
        tables = [list(t) for t in batch.block_tables]
        rows_table = [tables[i] for i, n in enumerate(batch.num_new_tokens) for _ in range(n)]
        meta = StepMetadata()
        positions_at = meta.add(positions)
        pages_at = meta.add([t[p // block_size] for t, p in zip(rows_table, positions)])
        last_rows_at = meta.add(batch.last_rows())
        decodes = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        prefills = [i for i, n in enumerate(batch.num_new_tokens) if n > 1]
        groups = ([decodes] if decodes else []) + _prefill_groups(batch, prefills)
        key_align = CUDA_KEY_ALIGN if kv.device.type == "cuda" else 1
        plans = [_GroupPlan.build(batch, seqs, block_size, key_align, meta) for seqs in groups]
        on_device = meta.send(kv.device)  # the step's one host->device copy
        self.positions = on_device[positions_at]  # [rows] absolute position of every row
        self.last_rows = on_device[last_rows_at]  # [seqs] row of each sequence's last new token
        self._write_pages, self._write_slots = on_device[pages_at], self.positions % block_size
        self._rows = KVRows.of(kv)
        if self._rows is not None:
            self._write_rows = self._rows.token_rows(self._write_pages, self._write_slots)
        windows = set(self.layer_windows)
        heads = None if self._rows is None else self._rows.by_head(kv.shape[5])  # what every group gathers by
        self._groups = [p.finish(on_device, windows, kv.dtype, heads) for p in plans]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this step's k, v [rows, kv_heads, dim] in layer `layer`; attention output [rows, heads, dim]."""
        caches = self.kv[:, layer, 0], self.kv[:, layer, 1]  # [pages, slot, kv_heads, dim] views
        rows = self._rows
        if rows is not None:
            offsets = rows.offsets(layer)
            unit = rows.flat.shape[1]
            rows.flat.index_copy_(0, (self._write_rows + offsets[0]).view(-1), k.reshape(-1, unit))
            rows.flat.index_copy_(0, (self._write_rows + offsets[1]).view(-1), v.reshape(-1, unit))
        else:
            caches[0][self._write_pages, self._write_slots] = k
            caches[1][self._write_pages, self._write_slots] = v
        window = self.layer_windows[layer]
        if len(self._groups) == 1 and self._groups[0].covers_all:
            return self._groups[0].attend(q, layer, caches, window, self.scale)
        out = torch.empty_like(q)
        for g in self._groups:
            out[g.out_rows] = g.attend(q, layer, caches, window, self.scale)
        return out


@dataclass(frozen=True)
class KVRows:
    """A model's KV tensor [pages, layers, 2, slot, kv_heads, dim] as a flat [rows, kv_heads * dim /
    split] view of the same storage: a token's K (or V) is `split` consecutive rows, and strides are
    in rows. split is 1 (a row per token) unless some stride is a whole number of heads but not of
    tokens, as a 256 KB page is for SmolLM2's 3 KV heads of 64."""

    flat: Tensor
    page: int
    layer: int
    which: int
    slot: int
    split: int = 1

    @staticmethod
    def of(kv: Tensor) -> KVRows | None:
        """The flat view of `kv`, or None where a stride is not a whole number of heads."""
        kv_heads, dim = kv.shape[4], kv.shape[5]
        if kv.stride(5) != 1 or kv.stride(4) != dim:
            return None
        for split in (s for s in range(1, kv_heads + 1) if kv_heads % s == 0):
            unit = kv_heads // split * dim
            if not any(st % unit for st in kv.stride()[:4]):
                break
        else:
            return None
        num_rows = sum((n - 1) * st for n, st in zip(kv.shape[:4], kv.stride()[:4])) // unit + split
        flat = kv.as_strided((num_rows, unit), (unit, 1), kv.storage_offset())
        return KVRows(flat, *(st // unit for st in kv.stride()[:4]), split)

    def token_rows(self, pages: Tensor, slots: Tensor) -> Tensor:
        """Rows [..., split] of layer 0's K for tokens at (pages, slots), each token's in order; add
        offsets(layer) for another layer or V."""
        first = pages * self.page + slots * self.slot
        return first[..., None] + torch.arange(self.split, device=first.device)

    def offsets(self, layer: int) -> tuple[int, int]:
        """What to add to token_rows for this layer's K and V."""
        return layer * self.layer, layer * self.layer + self.which

    def by_head(self, dim: int) -> KVRows:
        """The same storage with one row per KV head (`dim` elements): gathers that fill a buffer
        head-major, [seqs, kv_heads, keys, dim], the layout attention reads, with no transposing copy."""
        per = self.flat.shape[1] // dim
        return KVRows(self.flat.view(-1, dim), self.page * per, self.layer * per, self.which * per,
                      self.slot * per, self.split * per)


class StepMetadata:
    """A step's integer index arrays, gathered on the host and moved to the device in one copy (pinned
    and asynchronous on CUDA), instead of one synchronising copy per array."""

    def __init__(self) -> None:
        self._parts: list[Tensor] = []

    def add(self, values: Sequence[int] | Sequence[Sequence[int]] | Tensor) -> int:
        """Register an int64 array (any shape); its index into what `send` returns."""
        self._parts.append(torch.as_tensor(values, dtype=torch.long))
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[Tensor]:
        """Every registered array on `device`, in order, as views of one buffer."""
        flat = torch.cat([p.flatten() for p in self._parts]) if self._parts else torch.empty(0, dtype=torch.long)
        flat = to_device(flat, device)
        return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in self._parts]), self._parts)]


def _prefill_groups(batch: AttentionBatch, seqs: list[int]) -> list[list[int]]:
    """Prefill sequences in as few groups as keep each group's padded area (sequences x longest new
    x longest context) within MAX_PADDING_FACTOR of its real area (sum of new x context)."""
    order = sorted(seqs, key=lambda i: (batch.num_cached_tokens[i] + batch.num_new_tokens[i],
                                        batch.num_new_tokens[i]), reverse=True)
    groups: list[list[int]] = []
    for i in order:
        if groups and _padded_area(batch, groups[-1] + [i]) <= MAX_PADDING_FACTOR * _real_area(batch, groups[-1] + [i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _padded_area(batch: AttentionBatch, seqs: list[int]) -> int:
    news = [batch.num_new_tokens[i] for i in seqs]
    contexts = [batch.num_cached_tokens[i] + batch.num_new_tokens[i] for i in seqs]
    return len(seqs) * max(news) * max(contexts)


def _real_area(batch: AttentionBatch, seqs: list[int]) -> int:
    return sum(batch.num_new_tokens[i] * (batch.num_cached_tokens[i] + batch.num_new_tokens[i]) for i in seqs)


@dataclass(frozen=True)
class _GroupPlan:
    """A group's host-side plan: where its index arrays sit in the step's metadata, and what the host
    knows without looking at the device (shapes, which masks are unneeded)."""

    at: dict[str, int]  # array name -> index into StepMetadata.send's result
    num_queries: int  # longest new-token count of the group's sequences
    num_keys: int  # longest context, rounded up to the key alignment
    block_size: int
    all_visible: Callable[[int | None], bool]  # window -> every query sees every key (no mask needed)
    all_real: bool  # no padded queries
    covers_all: bool  # the group's queries are exactly rows 0.. of the flat batch, in order

    @staticmethod
    def build(batch: AttentionBatch, seqs: list[int], block_size: int, key_align: int,
              meta: StepMetadata) -> _GroupPlan:
        news = [batch.num_new_tokens[i] for i in seqs]
        cached = [batch.num_cached_tokens[i] for i in seqs]
        contexts = [c + n for c, n in zip(cached, news)]
        first = batch.first_rows()
        num_queries = max(news)
        num_keys = -(-max(contexts) // key_align) * key_align
        offsets = [[min(j, n - 1) for j in range(num_queries)] for n in news]  # padding: the last query again
        q_rows = [[first[i] + j for j in row] for i, row in zip(seqs, offsets)]
        query_pos = [[c + j for j in row] for c, row in zip(cached, offsets)]
        width_blocks = -(-num_keys // block_size)
        tables = []
        for i, n in zip(seqs, contexts):
            table = list(batch.block_tables[i][: -(-n // block_size)])
            tables.append(table + [table[0]] * (width_blocks - len(table)))
        keep = [s * num_queries + j for s, n in enumerate(news) for j in range(n)]
        out_rows = [first[i] + j for i, n in zip(seqs, news) for j in range(n)]
        at = {"q_rows": meta.add(q_rows), "query_pos": meta.add(query_pos), "tables": meta.add(tables),
              "contexts": meta.add(contexts), "out_rows": meta.add(out_rows), "keep": meta.add(keep)}
        full = num_queries == 1 and all(c == num_keys for c in contexts)  # decodes of one length, unpadded

        def all_visible(window: int | None) -> bool:
            return full and (window is None or window >= num_keys)

        all_real = len(keep) == len(seqs) * num_queries
        return _GroupPlan(at, num_queries, num_keys, block_size, all_visible, all_real,
                          all_real and out_rows == list(range(batch.num_tokens)))

    def finish(self, arrays: list[Tensor], windows: set[int | None], dtype: torch.dtype,
               rows: KVRows | None = None) -> _Group:
        """The group's device tensors: key maps and masks computed on the device from the sent arrays;
        `rows`: the KV's flat view by head (KVRows.by_head), or None."""
        a = {name: arrays[i] for name, i in self.at.items()}
        key_pos = torch.arange(self.num_keys, device=a["contexts"].device)[None, :]  # [1, keys]
        valid = key_pos < a["contexts"][:, None]  # [seqs, keys]
        token = torch.where(valid, key_pos, 0)  # padding keys: token 0 (always written, so finite)
        pages = torch.gather(a["tables"], 1, token // self.block_size)
        masks = {}
        for w in windows:
            if self.all_visible(w):
                masks[w] = None
                continue
            query_pos = a["query_pos"][:, :, None]
            visible = valid[:, None, :] & (key_pos[:, None, :] <= query_pos)  # [seqs, queries, keys]
            if w is not None:
                visible &= key_pos[:, None, :] > query_pos - w
            masks[w] = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
                ~visible, float("-inf"))[:, None]  # [seqs, 1, queries, keys]
        slots = token % self.block_size
        if rows is None:
            return _Group(a["q_rows"], (pages, slots), None, masks, a["out_rows"],
                          None if self.all_real else a["keep"], self.covers_all)
        index = rows.token_rows(pages, slots).transpose(1, 2).contiguous()  # [seqs, kv_heads, keys]
        return _Group(a["q_rows"], index, rows, masks, a["out_rows"], None if self.all_real else a["keep"],
                      self.covers_all)


@dataclass(frozen=True)
class _Group:
    """Sequences attended in one SDPA call, padded to `num_queries` queries and `num_keys` keys each.

    Index maps (q_rows, keys) hold only real rows and written slots; padding repeats the sequence's
    last query row and its token 0 (see the module docstring).
    """

    q_rows: Tensor  # [seqs, num_queries] flat-batch row of each query (padding: the sequence's last row)
    keys: Tensor | tuple[Tensor, Tensor]  # every key token (padding: token 0): its rows in `rows` (one
    # per KV head, layer 0's K) [seqs, kv_heads, num_keys], or its (page, slot) [seqs, num_keys] where
    # the KV has no flat view
    rows: KVRows | None  # the KV's flat view by head (KVRows.by_head), or None
    masks: dict[int | None, Tensor | None]  # window -> additive [seqs, 1, num_queries, num_keys], or None
    # where every key is visible to every query
    out_rows: Tensor  # [real queries] flat-batch row of each real query, in the order `keep` selects
    keep: Tensor | None  # [real queries] index into the flattened [seqs * num_queries] output; None = all
    covers_all: bool  # the group's queries are exactly rows 0.. of the flat batch, in order
    folded: dict = field(default_factory=dict)  # (window, group) -> mask with each query row repeated
    # per GQA group [seqs, 1, num_queries * group, num_keys]: built at the first layer, reused by the rest
    gathered: dict = field(default_factory=dict)  # 0 = K | 1 = V -> [seqs, kv_heads, num_keys, dim], the
    # buffer every layer gathers into (a fresh CPU allocation this size page-faults: 64 MB cost 31 ms
    # against 6 ms reused, measured on this project's 2-core machine)

    def attend(self, q: Tensor, layer: int, caches: tuple[Tensor, Tensor], window: int | None,
               scale: float) -> Tensor:
        """Output [real queries, heads, dim] of this group's queries, in `out_rows` order. caches: the
        layer's K and V [pages, slot, kv_heads, dim] (read through `rows` where it exists)."""
        seqs, num_queries = self.q_rows.shape
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = caches[0].shape[2]
        group = heads // kv_heads
        # [seqs, queries, kv_heads, group, dim] -> [seqs, kv_heads, queries * group, dim]
        picked = q if self.covers_all and num_queries == 1 else q[self.q_rows]  # decode: q_rows is 0..seqs-1
        query = picked.view(seqs, num_queries, kv_heads, group, dim).transpose(1, 2)
        query = query.reshape(seqs, kv_heads, num_queries * group, dim)
        key, value = self._gather(caches, layer, 0), self._gather(caches, layer, 1)  # [seqs, kv_heads, keys, dim]
        mask = self.masks[window]
        if mask is not None and num_queries > 1 and group > 1:
            mask = self.folded.get((window, group))
            if mask is None:
                mask = self.masks[window][:, :, :, None, :].expand(-1, -1, -1, group, -1)
                mask = self.folded[(window, group)] = mask.reshape(seqs, 1, num_queries * group, -1)
        by_matmul = num_queries == 1 and query.device.type == "cpu" and key.is_contiguous()
        if by_matmul and _decode_by_matmul(seqs * kv_heads):
            out = _decode_attention(query, key, value, mask, scale)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        # [seqs, kv_heads, queries * group, dim] -> [seqs * queries, heads, dim]
        out = out.view(seqs, kv_heads, num_queries, group, dim).transpose(1, 2).reshape(seqs * num_queries, heads, dim)
        return out if self.keep is None else out[self.keep]

    def _gather(self, caches: tuple[Tensor, Tensor], layer: int, which: int) -> Tensor:
        """The group's keys [seqs, kv_heads, num_keys, dim] of this layer's K or V (`which`), in this
        step's buffer: contiguous where the KV has a flat view, else a transposed view."""
        buffer = self.gathered.get(which)
        if self.rows is not None:
            if buffer is None:
                buffer = self.gathered[which] = caches[0].new_empty((*self.keys.shape, caches[0].shape[3]))
            offset = self.rows.offsets(layer)[which]
            torch.index_select(self.rows.flat, 0, (self.keys + offset).view(-1),
                               out=buffer.view(-1, self.rows.flat.shape[1]))
            return buffer
        if buffer is None:
            buffer = self.gathered[which] = caches[0].new_empty((*self.keys[0].shape, *caches[0].shape[2:]))
        return torch.ops.aten.index.Tensor_out(caches[which], list(self.keys), out=buffer).transpose(1, 2)


def _decode_by_matmul(num_heads: int) -> bool:
    """Whether a CPU decode group over `num_heads` (sequence, KV head) pairs takes _decode_attention."""
    return num_heads >= MATMUL_DECODE_MIN_HEADS and torch.get_num_threads() > 1


def _decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v as two batched matmuls, for decode groups on the CPU.

    query [seqs, kv_heads, group, dim] (one query per sequence, GQA folded); key, value [seqs, kv_heads,
    keys, dim]; mask additive [seqs, 1, 1, keys] or None. The same sums as SDPA's math path, in the
    inputs' dtype (float32 on the CPU). SDPA's CPU flash kernel tiles queries by 32 or more and pays
    for it at one query a sequence: at 16 sequences, 4 KV heads of 64 and 48 / 96 / 258 keys it took
    193 / 265 / 478 us against 107 / 175 / 412 us here (the project's 2-core EPYC)."""
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1), value)
