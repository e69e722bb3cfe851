"""Capacity: how many pages one engine's pool can give, and to whom. The one answer for the engine's
admission, the replica's load check, the cluster controller's spare pages and the autoscaler.

    pool = fixed parameters | lendable parameters | KV, staging and free pages
           (bases, and each    (up to `cap` layers   (what a sequence or a new model
            model's kept        per model, lent        can be given)
            layers)             with no copy)

- `spare_pages`: free now plus what idle tenants can lend now, within the cap: what a new model or
  a new sequence can have without preempting anything (load checks, reports, routing).
- `max_kv_pages`: the pool minus the parameters that can never be lent: what the KV cache could
  hold with every permitted reclaim made (the autoscaler's figure for a replica like this one).
- `kv_pages_for(model)`: `max_kv_pages` minus that model's own staging slots (its lent layers
  stream through them while it runs): the most one request of it may ever need. The engine admits
  a request only below this, and its progress guarantee then runs it to the end.

Without remapping (preemption modes `swap` and `recompute`) nothing is lendable and no model
streams, so `max_kv_pages` is the pool minus every parameter page.

`check_load` applies the same figures to a model about to be loaded: its fixed pages must be free
or lendable now, and it must leave every model (itself included) a KV page and every admitted
request its need.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from remap import BASE_SLAB, DeviceMemory, ModelId, RemapController, RemapError


class LoadRefused(RemapError):
    """A model cannot be loaded here. `permanent`: never on this device, even with every lendable
    parameter page lent and no KV; otherwise not now (KV in use, busy tenants): try again later."""

    def __init__(self, message: str, permanent: bool, too_large: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.too_large = too_large  # larger than the whole pool: no replica of this size can ever host it


@dataclass(frozen=True)
class Capacity:
    num_pages: int  # pages in the pool
    free_pages: int  # owned by nobody now
    reclaimable_pages: int  # parameter pages idle tenants (no request) could lend now, within the cap
    fixed_pages: int  # parameter pages no plan may lend: every base slab and each model's kept layers
    staging_pages: Mapping[ModelId, int]  # per model, the staging slots it needs with every lendable layer lent

    @property
    def spare_pages(self) -> int:
        """Pages a new model or sequence can have now without preempting anything."""
        return self.free_pages + self.reclaimable_pages

    @property
    def max_kv_pages(self) -> int:
        """KV pages the pool could hold with every permitted reclaim made."""
        return self.num_pages - self.fixed_pages

    def kv_pages_for(self, model: ModelId) -> int:
        """The most KV pages one request of `model` may need: it then runs to the end."""
        return self.max_kv_pages - self.staging_pages.get(model, 0)


def measure(memory: DeviceMemory, controller: RemapController | None, idle: set[ModelId],
            max_staging_slots: int | None) -> Capacity:
    """The capacity of `memory` now. `controller` None: nothing is ever lent (no remapping);
    `idle`: the models with no request (they may lend now); `max_staging_slots`: the engine's ring
    size limit (None: a slot per lent layer)."""
    params, pool = memory.params, memory.pool
    fixed = reclaimable = 0
    staging: dict[ModelId, int] = {}
    for model in params.models:
        slabs = sorted(params.slab(model, i).num_pages for i in range(params.num_layers(model)))
        cap = 0
        if controller is not None:
            cap = controller.cap(memory.tenant_snapshot(model, num_running=0, num_waiting=0, kv_pages_needed=0,
                                                        last_active_s=0.0, predicted_compute_s=0.0))
        lendable = sum(slabs[:cap])  # the smallest: a conservative figure where layers differ in size
        fixed += sum(slabs) - lendable + params.slab(model, BASE_SLAB).num_pages
        slots = min(cap, max_staging_slots if max_staging_slots is not None else cap)
        staging[model] = slots * params.max_layer_pages(model)
        if model in idle:
            lent = sum(params.slab(model, i).num_pages for i in params.remapped_layers(model))
            reclaimable += max(0, lendable - lent)
    return Capacity(pool.num_pages, pool.num_free, reclaimable, fixed, staging)


@dataclass(frozen=True)
class NewModel:
    """A model about to be loaded, in pages."""
    name: ModelId
    num_pages: int  # every slab resident
    fixed_pages: int  # what it never lends: its base and the layers beyond its cap
    staging_pages: int  # its staging slots with every lendable layer lent


def check_load(capacity: Capacity, new: NewModel, tenants: Collection[ModelId],
               pending: Iterable[tuple[int, ModelId, int]]) -> None:
    """Raise LoadRefused, with the numbers, unless `new` can be loaded now: its fixed pages must be
    free or lendable by idle tenants, and afterwards it and every tenant keep a KV page and every
    pending request (seq id, model, KV pages it may need) still fits `kv_pages_for`. Permanent
    refusals hold as long as the same tenants are hosted; `too_large` ones on any replica this size."""
    fixed, name = new.fixed_pages, new.name
    least = fixed + new.staging_pages + 1
    if least > capacity.num_pages:
        raise LoadRefused(f"model {name!r} needs {least} pages to serve anything ({fixed} it never lends, "
                          f"{new.staging_pages} of staging slots, a KV page), more than this replica's whole pool of "
                          f"{capacity.num_pages}: it never fits here, nor on any replica of this size", True,
                          too_large=True)
    starved = [m for m in tenants if capacity.kv_pages_for(m) - fixed < 1]
    starved += [name] if capacity.max_kv_pages - fixed - new.staging_pages < 1 else []
    if starved:
        raise LoadRefused(f"model {name!r} would take {fixed} pages for good and leave {sorted(starved)} no KV page "
                          f"(this replica can hold {capacity.max_kv_pages} KV pages beside its tenants): it never "
                          "fits here", True)
    if fixed > capacity.spare_pages:
        permanent = fixed > capacity.max_kv_pages
        raise LoadRefused(
            f"model {name!r} needs {fixed} pages it never lends ({new.num_pages} with every layer resident); this "
            f"replica has {capacity.free_pages} free + {capacity.reclaimable_pages} that idle tenants can lend now, "
            f"of {capacity.num_pages} "
            + (f"(at most {capacity.max_kv_pages} with every lendable page lent and no KV: it never fits here)"
               if permanent else "(the rest holds KV of requests in flight or busy tenants' layers)"), permanent)
    for seq_id, model, need in pending:
        if need > capacity.kv_pages_for(model) - fixed:
            raise LoadRefused(f"loading {name!r} ({fixed} pages it never lends) would leave request {seq_id} of "
                              f"{model!r} unable to finish; load it when that ends", False)
