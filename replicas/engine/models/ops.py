"""Tensor helpers shared by the architectures: projections, norms and activations over weight dicts.

A layer's weights are a flat mapping from Hugging Face names (prefix stripped) to tensors; a bias
that the checkpoint does not have is simply absent, so one `linear` serves every bias flavour.

Projections that read the same input (q, k, v; gate, up) run as one matmul when their weights lie
back to back in one storage, as they do in a slab (remap/params.py packs a layer's tensors in
`layer_shapes` order, each at a multiple of 256 bytes, so matrices whose byte sizes are multiples
of 256 touch):

    slab:  | q_proj.weight | k_proj.weight | v_proj.weight | o_proj.weight | ...
           |<-------- one [q + 2 kv, hidden] view -------->|

The fused weight is a view (as_strided over the same storage), never a copy. Where they do not
touch (a bias packed between them, as in Qwen2 and OPT; padding; separate tensors) the
projections run one by one, with the same result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from remap import opaque

Tensor = torch.Tensor
Weights = Mapping[str, Tensor]
Shapes = dict[str, tuple[int, ...]]  # parameter name -> shape

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}  # names as in config.json


def project(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias: F.linear, except for a large float32 weight on the CPU, where oneDNN's kernels
    run on it in place: on its plain bytes, or on a weight `blocked` at load (an mkldnn tensor).

    PyTorch sends float32 F.linear on the CPU to MKL's sgemm, which on this project's AMD EPYC streams a
    model's weights at about half oneDNN's rate (docs/benchmarks.md, "Engine against vLLM"). oneDNN
    costs ~13 us more per call, so below ONEDNN_MIN_WEIGHT elements MKL stays faster. Results differ in
    the last bits, as any two GEMMs do; greedy output still equals Hugging Face's (tests/unit)."""
    if weight.is_mkldnn or (_ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32
                            and x.device.type == "cpu" and weight.numel() >= ONEDNN_MIN_WEIGHT):
        return _ONEDNN(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# Where oneDNN overtakes MKL at every batch from 1 to 256 rows on the 2-core EPYC (measured per shape:
# 576 x 576 was still MKL's at one row, 1024 x 512 oneDNN's everywhere).
ONEDNN_MIN_WEIGHT = 1 << 19


def _onednn_linear():
    """oneDNN's linear (the op Inductor's CPU backend calls), or None where this torch lacks it."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        one = torch.ones(1, 1)
        return op if op(one, one, None, "none", [], "").item() == 1.0 else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_linear()


def linear(x: Tensor, w: Weights, name: str) -> Tensor:
    """x @ W.T + b for the projection `name` ("self_attn.q_proj"); the bias is optional."""
    return project(x, w[name + ".weight"], w.get(name + ".bias"))


def linears(x: Tensor, w: Weights, names: tuple[str, ...], sizes: Sequence[int]) -> list[Tensor]:
    """The projections `names` (output widths `sizes`) of the same input x, as one matmul where their
    weights (and biases, if any) are one tensor (`blocked` fused them at load) or lie back to back;
    each output is a view of the fused result. Back-to-back views are found once per placement of a
    slab (remap's SlabViews.derived), not per call."""
    name = fused_name(names)
    if name + ".weight" in w:
        fused = w[name + ".weight"], w.get(name + ".bias")
    else:
        cache = getattr(w, "derived", None)
        fused = cache.get(names) if cache is not None else None
        if fused is None:
            fused = _fuse(w, names)
            if cache is not None:
                cache[names] = fused
    weight, bias = fused
    if weight is None:
        return [linear(x, w, n) for n in names]
    return list(project(x, weight, bias).split(sizes, dim=-1))


def fused_name(names: Sequence[str]) -> str:
    """The name `blocked` gives the projections `names` fused into one ("self_attn.q_proj+...")."""
    return "+".join(names)


def _fuse(w: Weights, names: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) of `names` as one projection over their back-to-back views; weight None where
    they cannot fuse."""
    weight = stacked([w[n + ".weight"] for n in names])
    biases = [w.get(n + ".bias") for n in names]
    bias = None
    if weight is not None and any(b is not None for b in biases):
        bias = stacked(biases) if all(b is not None for b in biases) else None
        weight = weight if bias is not None else None
    return weight, bias


def blocked(tensors: Mapping[str, Tensor], groups: Sequence[tuple[str, ...]] = ()) -> dict[str, Tensor]:
    """A layer's tensors as the CPU computes them fastest: each group of projections in `groups`
    (those reading one input) fused into one weight (and bias) named `fused_name`, and every float32
    matrix of ONEDNN_MIN_WEIGHT or more elements reordered into oneDNN's blocked layout (an mkldnn
    tensor, which remap stores as its own bytes: remap/opaque.py). Every matrix of a layer is a
    projection; pass a base's lm_head alone. A group fuses only where its weight will be blocked, so
    small models keep their tensors as they are.

    vLLM's CPU backend reorders its weights the same way at load. At 4 to 32 rows the blocked layout
    saves 13-30% of GEMM time over oneDNN on plain weights (scripts/bench_gemm.py)."""
    out = dict(tensors)
    for names in groups:
        weights = [out.get(n + ".weight") for n in names]
        biases = [out.get(n + ".bias") for n in names]
        if (any(t is None for t in weights) or not _blocks(sum(t.numel() for t in weights), weights[0])
                or len({b is None for b in biases}) > 1):
            continue
        out = _replace(out, names, fused_name(names), torch.cat(weights),
                       None if biases[0] is None else torch.cat(biases))
    return {n: _reorder(t) if t.dim() == 2 and _blocks(t.numel(), t) else t for n, t in out.items()}


def embedding(weight: Tensor, ids: Tensor) -> Tensor:
    """Rows `ids` of an embedding matrix [vocab, hidden]: indexed, or read in place from a blocked (mkldnn)
    weight whose row layout `blocked_rows` verified (a tied lm_head, blocked for the GEMM)."""
    if not weight.is_mkldnn:
        return weight[ids]
    layout = _ROW_LAYOUTS.get(tuple(weight.shape))
    if layout is None:
        raise ValueError(f"no verified row layout for the blocked weight {list(weight.shape)}: "
                         "ops.blocked_rows must accept it before its rows are read")
    return layout.rows(opaque.data_of(weight).view(weight.dtype), ids, weight.shape)


@dataclass(frozen=True)
class RowLayout:
    """Where element (o, i) of a blocked 2-d weight lies in its bytes, in elements:
    (o // o_block) * o_outer + (o % o_block) * o_inner + (i // i_block) * i_outer + (i % i_block) * i_inner.
    oneDNN's blocked weight formats have this form; on the project's AVX2 EPYC a [32000, 768] weight is
    [500][768][64] (64 rows interleaved), so o_block 64, o_inner 1, i_inner 64."""

    o_block: int
    o_outer: int
    o_inner: int
    i_block: int
    i_outer: int
    i_inner: int

    def rows(self, flat: Tensor, ids: Tensor, shape: Sequence[int]) -> Tensor:
        """Rows `ids` [n] -> [n, shape[1]] of the `shape` weight whose elements (padding included) are `flat`."""
        out_features, in_features = shape
        blocks = flat.as_strided(
            (-(-out_features // self.o_block), self.o_block, -(-in_features // self.i_block), self.i_block),
            (self.o_outer, self.o_inner, self.i_outer, self.i_inner))
        return blocks[ids // self.o_block, ids % self.o_block].reshape(ids.shape[0], -1)[:, :in_features]

    @staticmethod
    def fit(offsets: Tensor) -> tuple[int, int, int] | None:
        """(block, outer, inner) with offsets[k] == (k // block) * outer + (k % block) * inner, or None."""
        n = offsets.numel()
        if n == 0 or int(offsets[0]) != 0:
            return None
        inner = int(offsets[1]) if n > 1 else 1
        k = torch.arange(n, dtype=offsets.dtype)
        off = (offsets != k * inner).nonzero()
        block = int(off[0]) if off.numel() else n
        outer = int(offsets[block]) if block < n else 0
        return (block, outer, inner) if torch.equal(offsets, k // block * outer + k % block * inner) else None


_ROW_LAYOUTS: dict[tuple[int, int], RowLayout] = {}  # weight shape -> its verified blocked row layout


def blocked_rows(plain: Tensor, weight: Tensor) -> bool:
    """Whether `embedding` can read the rows of `weight` (`plain` reordered by ops.blocked): its layout,
    found by reordering index-valued weights of the same shape, must give back every row of `plain`
    bit for bit. Remembered per shape for this process (oneDNN picks one format per shape and ISA)."""
    shape = tuple(plain.shape)
    if shape not in _ROW_LAYOUTS:
        layout = _row_layout(shape)
        if layout is None:
            return False
        _ROW_LAYOUTS[shape] = layout
    flat = opaque.data_of(weight).view(weight.dtype)
    return torch.equal(_ROW_LAYOUTS[shape].rows(flat, torch.arange(shape[0]), shape), plain)


def _row_layout(shape: tuple[int, int]) -> RowLayout | None:
    """The RowLayout of ops.blocked's reorder of a float32 `shape` weight (the only dtype it blocks),
    from two probes holding each element's row + 1 and column + 1 (the layout's padding holds 0), or
    None where it is not of that form."""
    rows, cols = shape
    if max(rows, cols) + 1 >= 1 << 24:  # float32 holds integers exactly up to 2^24
        return None
    row_probe = _reorder(torch.arange(1, rows + 1, dtype=torch.float32)[:, None].expand(shape))
    col_probe = _reorder(torch.arange(1, cols + 1, dtype=torch.float32)[None, :].expand(shape))
    row_of, col_of = (opaque.data_of(p).view(torch.float32) for p in (row_probe, col_probe))
    first_col = (col_of == 1).nonzero().flatten()  # (o, 0) for every o
    first_row = (row_of == 1).nonzero().flatten()  # (0, i) for every i
    if first_col.numel() != rows or first_row.numel() != cols:
        return None
    o_offsets = torch.empty(rows, dtype=torch.long).index_put_((row_of[first_col].long() - 1,), first_col)
    i_offsets = torch.empty(cols, dtype=torch.long).index_put_((col_of[first_row].long() - 1,), first_row)
    o_fit, i_fit = RowLayout.fit(o_offsets), RowLayout.fit(i_offsets)
    return None if o_fit is None or i_fit is None else RowLayout(*o_fit, *i_fit)


def _blocks(numel: int, t: Tensor) -> bool:
    return (_ONEDNN is not None and t.dtype == torch.float32 and t.device.type == "cpu"
            and numel >= ONEDNN_MIN_WEIGHT)


def _reorder(t: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(t.contiguous(), None)


def _replace(tensors: dict[str, Tensor], names: Sequence[str], name: str, weight: Tensor,
             bias: Tensor | None) -> dict[str, Tensor]:
    """`tensors` with the members' weights and biases replaced by one fused entry where the first was."""
    members = {n + suffix for n in names for suffix in (".weight", ".bias")}
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key == names[0] + ".weight":
            out[name + ".weight"] = weight
            if bias is not None:
                out[name + ".bias"] = bias
        elif key not in members:
            out[key] = t
    return out


def stacked(tensors: Sequence[Tensor]) -> Tensor | None:
    """One view concatenating `tensors` along dim 0 if they lie back to back in one storage (same dtype,
    device and trailing shape, each contiguous), else None."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    storage, end = first.untyped_storage(), first.data_ptr()
    for t in tensors:
        if (t.data_ptr() != end or not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.shape[1:] != first.shape[1:] or t.untyped_storage().data_ptr() != storage.data_ptr()):
            return None
        end += t.numel() * t.element_size()
    if end > storage.data_ptr() + storage.nbytes():
        return None
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


FUSED_NORM_MAX_ROWS = 256


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm: normalise in float32, scale in the weights' dtype (as Transformers does).

    In float32 that is exactly F.rms_norm (bit for bit, tests/unit/test_models.py), one op instead of
    seven: on the 2-core CPU ~7 us less per call at decode sizes (21 against 28 us at 16 rows of 576),
    but slower over a prefill's thousands of rows (1.7 against 1.4 ms at 4096 rows of 768), so it
    takes up to FUSED_NORM_MAX_ROWS rows."""
    if x.dtype == weight.dtype == torch.float32 and x.shape[0] <= FUSED_NORM_MAX_ROWS:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm(x: Tensor, w: Weights, name: str, eps: float) -> Tensor:
    """LayerNorm `name`; weight and bias are absent when the norm has no affine parameters."""
    return F.layer_norm(x, x.shape[-1:], w.get(name + ".weight"), w.get(name + ".bias"), eps)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for it: pinned and asynchronous on CUDA (a pageable
    copy would synchronise with everything queued before it)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def proj_shapes(name: str, out_features: int, in_features: int, bias: bool) -> Shapes:
    """Parameter shapes of a linear projection in Hugging Face layout (weight is [out, in])."""
    shapes: Shapes = {name + ".weight": (out_features, in_features)}
    if bias:
        shapes[name + ".bias"] = (out_features,)
    return shapes
