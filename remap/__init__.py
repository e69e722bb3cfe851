"""remap: the Oneiros memory engine. One pool of pages per device, shared by model parameters,
KV blocks and staging slots; parameters are lent to the KV cache with no write-back and streamed
back from their host master copy. Pure Python + torch: nothing here imports Ray or HTTP code."""

from remap.backend import TENSOR_ALIGN_BYTES, ArenaBackend, Backend
from remap.kv import KVBlocks, KVGeometry
from remap.controller import (
    LayerAction,
    MemorySnapshot,
    RemapConfig,
    RemapController,
    RemapPlan,
    StreamPlan,
    TenantSnapshot,
    VictimOrder,
    uniform_layers,
)
from remap.memory import DEFAULT_PAGE_SIZE_BYTES, AppliedPlan, DeviceMemory
from remap.params import ParamStore, Slab, TensorSpec, pack_layout, slab_num_pages, slab_views
from remap.placement import AnyPages, HomeRuns, Placement, RestoreOutcome
from remap.pool import PagePool
from remap.staging import StagingRing
from remap.transfer import (
    CudaTransferEngine,
    SyncTransferEngine,
    ThreadTransferEngine,
    TransferEngine,
    make_transfer_engine,
    measure_link_bytes_per_s,
)
from remap.types import (
    BASE_SLAB,
    FREE,
    IntegrityError,
    ModelId,
    Owner,
    OwnerKind,
    PageId,
    RemapError,
    SeqId,
)
from remap.vmm import BACKEND_KINDS, CudaVmmBackend, HostVmmBackend, VmmBackend, make_backend

__all__ = [
    "AnyPages", "AppliedPlan", "CudaTransferEngine", "HomeRuns", "Placement", "LayerAction", "MemorySnapshot", "RemapConfig", "RemapController", "RemapPlan", "StreamPlan",
    "TenantSnapshot", "VictimOrder", "uniform_layers",
    "BASE_SLAB", "DEFAULT_PAGE_SIZE_BYTES", "FREE", "TENSOR_ALIGN_BYTES", "ArenaBackend", "Backend",
    "DeviceMemory", "IntegrityError", "KVBlocks", "KVGeometry", "ModelId", "Owner", "OwnerKind", "PageId",
    "PagePool", "ParamStore", "RemapError", "RestoreOutcome", "SeqId", "Slab", "StagingRing",
    "SyncTransferEngine", "TensorSpec", "ThreadTransferEngine", "TransferEngine", "make_transfer_engine",
    "measure_link_bytes_per_s", "pack_layout", "slab_num_pages", "slab_views",
    "BACKEND_KINDS", "CudaVmmBackend", "HostVmmBackend", "VmmBackend", "make_backend",
]
