"""Tensors in an opaque layout (oneDNN's blocked weights) stored as plain bytes in slabs.

oneDNN's CPU GEMM reads a weight fastest in its own blocked layout, which it describes with a memory
descriptor rather than strides; PyTorch holds such a weight as a `torch._mkldnn` tensor. A slab stores
it like any other tensor: its bytes (`raw_bytes`) go to the host copy and from there to pages or a
staging slot, and its descriptor (`describe`) goes into the slab's TensorSpec. `view` gives an mkldnn
tensor over bytes wherever they lie now, so remapping, restoring and streaming move the blocked bytes
with no reorder and no second copy in memory.

PyTorch has no Python call that wraps given memory as an mkldnn tensor; AOTInductor's C shim does
(`aoti_torch_create_tensor_from_blob_v2` with the mkldnn layout and the serialized descriptor), and
`torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs` turns its handle into a Python tensor (the
list form frees the handle; the single form leaks it). `AVAILABLE` is False where either is missing:
callers then keep weights plain.

An mkldnn tensor made over given memory does not own it: `view` keeps a reference to the bytes'
tensor on the view, so the memory lives as long as it would under a plain view.
"""

from __future__ import annotations

import ctypes
import pathlib

import torch

Tensor = torch.Tensor


def _shim():
    try:
        lib = ctypes.CDLL(str(pathlib.Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        create = lib.aoti_torch_create_tensor_from_blob_v2
        create.restype = ctypes.c_int32
        create.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                           ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                           ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_char_p,
                           ctypes.c_int64]
        codes = {"mkldnn": lib.aoti_torch_layout__mkldnn(), "strided": lib.aoti_torch_layout_strided(),
                 "cpu": lib.aoti_torch_device_type_cpu(), torch.float32: lib.aoti_torch_dtype_float32(),
                 torch.uint8: lib.aoti_torch_dtype_uint8()}
        capsule = ctypes.pythonapi.PyCapsule_New
        capsule.restype, capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        steal = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs
        describe = torch.ops.mkldnn._get_mkldnn_serialized_md
        return create, codes, capsule, steal, describe
    except (OSError, AttributeError, RuntimeError):
        return None


_SHIM = _shim()


def _blob(ptr: int, shape: tuple[int, ...], dtype: torch.dtype, layout: bytes | None) -> Tensor:
    create, codes, capsule, steal, _ = _SHIM
    n = len(shape)
    strides = [1] * n
    for i in range(n - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    handle = ctypes.c_void_p()
    rc = create(ptr, n, (ctypes.c_int64 * n)(*shape), (ctypes.c_int64 * n)(*strides), 0, codes[dtype], codes["cpu"],
                0, ctypes.byref(handle), codes["mkldnn" if layout else "strided"], layout, len(layout or b""))
    if rc != 0:
        raise RuntimeError(f"could not view {shape} {dtype} at {ptr:#x} (AOTI shim error {rc})")
    return steal([capsule(handle.value, None, None)])[0]


def _probe() -> bool:
    """True where a weight blocked by oneDNN survives the trip through plain bytes."""
    if _SHIM is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.arange(64 * 32, dtype=torch.float32).view(64, 32) / 100
        blocked = torch.ops.mkldnn._reorder_linear_weight(w, None)
        data = raw_bytes(blocked).clone()
        x = torch.ones(2, 32)
        got = torch.ops.mkldnn._linear_pointwise(x, view(data, (64, 32), torch.float32, describe(blocked)), None,
                                                  "none", [], "")
        return torch.allclose(got, x @ w.T)
    except (AttributeError, RuntimeError):
        return False


def is_opaque(t: Tensor) -> bool:
    return t.layout == torch._mkldnn


def describe(t: Tensor) -> bytes:
    """The serialized memory descriptor of an mkldnn tensor (what `view` needs besides bytes)."""
    return bytes(_SHIM[4](t).numpy())


def num_bytes(t: Tensor) -> int:
    """Bytes a tensor occupies: its elements, or an mkldnn tensor's blocked buffer (padding included)."""
    return torch.ops.mkldnn._nbytes(t) if is_opaque(t) else t.numel() * t.element_size()


def raw_bytes(t: Tensor) -> Tensor:
    """uint8 [num_bytes(t)] over an mkldnn tensor's own buffer (for copying it out)."""
    out = _blob(torch.ops.mkldnn.data_ptr(t), (num_bytes(t),), torch.uint8, None)
    out._owner = t  # the buffer lives as long as the tensor that owns it
    return out


def data_of(t: Tensor) -> Tensor:
    """uint8 [num_bytes(t)] over the bytes an mkldnn tensor computes with: those `view` wrapped, or its own
    buffer (raw_bytes)."""
    owner = getattr(t, "_owner", None)
    return owner if owner is not None and owner.dtype == torch.uint8 else raw_bytes(t)


def view(data: Tensor, shape: tuple[int, ...], dtype: torch.dtype, layout: bytes) -> Tensor:
    """An mkldnn tensor of `shape` whose blocked bytes are `data` (uint8 on the CPU), in place."""
    if data.device.type != "cpu" or not data.is_contiguous():
        raise ValueError(f"an opaque tensor needs contiguous CPU bytes, not {data.device} / {data.stride()}")
    out = _blob(data.data_ptr(), shape, dtype, layout)
    out._owner = data
    return out


AVAILABLE = _probe()
