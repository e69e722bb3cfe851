"""RemapController: the per-step policy that decides which parameter layers to lend to the KV cache.

`RemapController(config).plan(snapshot) -> RemapPlan` is pure and synchronous: time and every
measurement come in the snapshot, and the same snapshot always gives the same plan (tenant order in
the snapshot does not matter). Executing the plan is the engine's job.

Central invariant: no plan remaps more than `cap` layers of any model (cap = floor(f * num_layers),
at most num_layers - 1), so every model keeps at least one resident layer.

The page ledger every decision is made against ("spare" pages; negative = a deficit):

    spare = num_free_pages + layer_pages * reclaimed - layer_pages * restored
            - sum(kv_pages_needed) - staging pages of every active model after the plan

Staging is charged in full for the post-plan state, so `num_free_pages` must count the pages the
staging rings hold now as free: rings are re-sized to each plan's StreamPlans (execute: reclaim,
re-size rings, restore). A woken model whose layers were reclaimed while it slept is thereby charged
for the ring it is about to need.

Decisions, in order: put over-budget models at their budget; cover the deficit by reclaiming
inactive tenants (victim order, up to the cap), then active ones (most unused alpha budget first);
back off the restores that reclaims could not fund, except that a streaming model's restores come
before admitting waiting requests (`kv_pages_admitting`; RemapConfig.restore_before_admitting); if
nothing was reclaimed, revert spare pages.

An active model's alpha budget is the paper's: the layers whose copies hide under its next step's
compute. That assumes a copy engine beside the compute (a GPU). Where copies run inline
(`MemorySnapshot.copies_overlap` False: the CPU's SyncTransferEngine) nothing hides, and the budget
is 0.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

_EPS = 1e-9  # float slack for floor(): 0.29 * 100 is 28.999999999999996, and we mean 29


class VictimOrder(str, enum.Enum):
    MRU = "mru"  # most recently active inactive tenant first (paper: turn-taking makes it the safest)
    LRU = "lru"


@dataclass(frozen=True)
class RemapConfig:
    victim_order: VictimOrder = VictimOrder.MRU  # order in which inactive tenants lose layers
    max_remapped_fraction: float = 0.75  # cap = floor(f * num_layers) remapped layers, never all
    double_buffer_min_alpha: int = 9  # alpha >= this streams through alpha+2 slots, else alpha+1
    revert_headroom_pages: int = 0  # spare pages kept above demand before giving pages back to params
    # Ring size limit in slots (+1 when double buffering); None = the paper's alpha+1 / alpha+2.
    # A ring of alpha+1 slots, each a whole layer, costs more pages than the alpha layers free, so
    # an active model's layers could never pay for themselves. Slots are reused round-robin within a
    # pass (remap/staging.py), so 2 suffice: one layer computing while the next one loads.
    max_staging_slots: int | None = 2
    # Budget alpha on decode steps only (True) or on all steps (False, the paper's prefill-aware
    # budget). Prefill steps are long, but the layers they let a model lend stay lent once KV fills
    # the pages, and every decode step after that waits for transfers compute no longer hides.
    budget_on_decode: bool = True
    # A streaming model over its alpha budget gets its layers back before waiting requests are
    # admitted (True), or only from pages no tenant's KV wants (False, the paper's back-off). Every
    # step of an over-budget model waits for the copies its compute does not hide, so admitting
    # another request into those pages slows every stream of that model.
    restore_before_admitting: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "victim_order", VictimOrder(self.victim_order))
        except ValueError:
            raise ValueError(f"victim_order={self.victim_order!r}: expected 'mru' or 'lru'") from None
        f = self.max_remapped_fraction
        if not (isinstance(f, (int, float)) and 0 <= f < 1):
            raise ValueError(f"max_remapped_fraction={f!r}: expected 0 <= f < 1")
        _check_int("double_buffer_min_alpha", self.double_buffer_min_alpha)
        _check_int("revert_headroom_pages", self.revert_headroom_pages)
        if self.max_staging_slots is not None:
            _check_int("max_staging_slots", self.max_staging_slots, minimum=1)


_TENANT_INTS = (("num_layers", 1), ("layer_pages", 1), ("layer_bytes", 1),
                ("num_running", 0), ("num_waiting", 0), ("kv_pages_needed", 0), ("kv_pages_admitting", 0))


@dataclass(frozen=True)
class TenantSnapshot:
    model: str  # model name, unique in a snapshot
    num_layers: int  # transformer layers (>= 1)
    remapped_layers: frozenset[int]  # layer ids whose pages are lent out now (not resident)
    layer_pages: int  # pages one layer slab occupies (>= 1; all layers of a model are the same size)
    layer_bytes: int  # bytes copied host->device to bring one layer back (>= 1)
    num_running: int  # sequences running
    num_waiting: int  # sequences waiting for admission
    kv_pages_needed: int  # extra KV pages this tenant needs now, beyond the pages it holds
    last_active_s: float  # time of its last request or step, seconds on the snapshot's clock
    # Predicted compute time of its next step, seconds; 0 when inactive. None: active but never
    # measured (a model that has not run a step yet): its alpha budget is the cap until it has run,
    # so a zero estimate never freezes the budget of a tenant that has only waited.
    predicted_compute_s: float | None
    kv_pages_admitting: int = 0  # of kv_pages_needed, what admitting waiting requests would take
    cold: bool = False  # idle cluster-wide (a cluster order): an idle tenant that lends before any other
    warming: bool = False  # traffic expected soon (a cluster order): lends last, gets its layers back first

    def __post_init__(self) -> None:
        object.__setattr__(self, "remapped_layers", frozenset(self.remapped_layers))
        for name, minimum in _TENANT_INTS:  # one per step per tenant: the message is built only on failure
            value = getattr(self, name)
            if type(value) is not int or value < minimum:
                _check_int(f"tenant {self.model!r}: {name}", value, minimum)
        if self.kv_pages_admitting > self.kv_pages_needed:
            raise ValueError(f"tenant {self.model!r}: kv_pages_admitting {self.kv_pages_admitting} > "
                             f"kv_pages_needed {self.kv_pages_needed}")
        n = self.num_layers
        bad = [i for i in self.remapped_layers if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise ValueError(f"tenant {self.model!r}: remapped layer ids {sorted(bad)} outside [0, {n})")
        if len(self.remapped_layers) >= self.num_layers:
            raise ValueError(f"tenant {self.model!r}: {len(self.remapped_layers)} of {self.num_layers} "
                             "layers remapped; at least one must stay resident")
        c = self.predicted_compute_s
        if c is not None and not (math.isfinite(c) and c >= 0):
            raise ValueError(f"tenant {self.model!r}: predicted_compute_s={self.predicted_compute_s}")
        if not math.isfinite(self.last_active_s):
            raise ValueError(f"tenant {self.model!r}: last_active_s={self.last_active_s}")

    @property
    def is_active(self) -> bool:
        return self.num_running + self.num_waiting > 0


@dataclass(frozen=True)
class MemorySnapshot:
    now_s: float  # the snapshot's clock, seconds
    num_free_pages: int  # pages owned by no parameter slab and no KV block (staging rings count as free)
    link_bytes_per_s: float  # measured host->device bandwidth, bytes per second
    tenants: tuple[TenantSnapshot, ...]  # every model on the device
    # The tenant served next whose oldest request must run now (the engine's progress guarantee),
    # or None. Then every other tenant lends like an idle one, up to its cap with no staging charged
    # (the engine closes their rings: one tenant computes per step), and the urgent tenant's own
    # budget is its cap: progress first, hiding copies second.
    urgent: str | None = None
    reserved_pages: int = 0  # pages wanted outside every tenant's KV: the parameters of a model being loaded
    copies_overlap: bool = True  # False: streamed layers copy inline (a CPU), so no copy hides under compute

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenants", tuple(self.tenants))
        _check_int("reserved_pages", self.reserved_pages)
        _check_int("num_free_pages", self.num_free_pages)
        if not (math.isfinite(self.link_bytes_per_s) and self.link_bytes_per_s >= 0):
            raise ValueError(f"link_bytes_per_s={self.link_bytes_per_s}: expected finite and >= 0")
        if not math.isfinite(self.now_s):
            raise ValueError(f"now_s={self.now_s}: expected finite")
        names = [t.model for t in self.tenants]
        if len(set(names)) != len(names):
            dups = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate model names {dups} among {len(names)} tenants")
        if self.urgent is not None and self.urgent not in names:
            raise ValueError(f"urgent tenant {self.urgent!r} is not among the tenants {sorted(names)}")


@dataclass(frozen=True)
class LayerAction:
    model: str  # tenant the layer belongs to
    layer: int  # layer id in [0, num_layers)
    reason: str  # why, with the numbers that drove it


@dataclass(frozen=True)
class StreamPlan:
    model: str  # an active tenant with remapped layers after the plan
    layers: tuple[int, ...]  # remapped layer ids, ascending: streamed from host every forward pass
    alpha: int  # len(layers)
    alpha_budget: int  # layers whose transfer the step's compute hides (clipped to the cap)
    num_staging_slots: int  # ring size in slots, each layer_pages pages
    reason: str  # why, with numbers; says "over budget" when alpha > alpha_budget


@dataclass(frozen=True)
class RemapPlan:
    reclaim: tuple[LayerAction, ...]  # execute first: each frees layer_pages pages
    restore: tuple[LayerAction, ...]  # then (rings re-sized to `stream`): each consumes layer_pages pages
    stream: tuple[StreamPlan, ...]  # per active model with remapped layers after the plan, by name
    num_pages_short: int  # KV/staging pages still missing after the plan (0 when demand is covered)
    reason: str = ""  # the page ledger after the plan; says "short" when num_pages_short > 0

    @property
    def is_noop(self) -> bool:
        """No layer changes hands (streams only restate the standing state)."""
        return not self.reclaim and not self.restore

    def describe(self) -> list[str]:
        """One line per decision, for the engine's log."""
        lines = [f"{verb} {model} layers {list(layers)}: {reason}"
                 for verb, actions in (("reclaim", self.reclaim), ("restore", self.restore))
                 for (model, reason), layers in _group(actions).items()]
        lines += [f"stream {s.model} layers {list(s.layers)} through {s.num_staging_slots} slots: {s.reason}"
                  for s in self.stream]
        return lines + ([self.reason] if self.reason else [])


def uniform_layers(num_layers: int, k: int) -> tuple[int, ...]:
    """k distinct layer ids spread evenly over [0, num_layers): the centres of k equal bins."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"cannot pick {k} of {num_layers} layers")
    return tuple((2 * i + 1) * num_layers // (2 * k) for i in range(k))


def num_staging_slots(alpha: int, config: RemapConfig) -> int:
    """Slots a model streaming alpha layers gets: alpha+1, alpha+2 once double buffering pays,
    capped by config.max_staging_slots (+1 when double buffering)."""
    if alpha == 0:
        return 0
    double = alpha >= config.double_buffer_min_alpha
    slots = alpha + 2 if double else alpha + 1
    return slots if config.max_staging_slots is None else min(slots, config.max_staging_slots + double)


def layers_to_add(num_layers: int, remapped: frozenset[int], k: int) -> tuple[int, ...]:
    """k resident layers to remap: missing members of the uniform target set, farthest first."""
    chosen: set[int] = set(remapped)
    missing = [i for i in uniform_layers(num_layers, len(remapped) + k) if i not in chosen]
    picks = []
    for _ in range(k):  # |missing| >= k: the target has len(remapped) + k distinct members
        best = max(missing, key=lambda i: (min((abs(i - j) for j in chosen), default=num_layers), -i))
        missing.remove(best)
        chosen.add(best)
        picks.append(best)
    return tuple(sorted(picks))


def layers_to_restore(num_layers: int, remapped: frozenset[int], k: int) -> tuple[int, ...]:
    """k remapped layers to restore so the rest stay closest to the uniform target set."""
    target = uniform_layers(num_layers, len(remapped) - k)
    keep = set(remapped) & set(target)
    for t in (t for t in target if t not in remapped):  # snap each missing target to its nearest
        keep.add(min(remapped - keep, key=lambda i: (abs(i - t), i)))
    return tuple(sorted(remapped - keep))


@dataclass
class _Tenant:
    """Working state of one tenant while a plan is built: only counts move; ids are chosen last."""
    snap: TenantSnapshot
    cap: int
    budget: int
    count: int  # remapped layers after the decisions so far
    streams: bool  # computes while the plan stands: charged staging slots, budgeted on its compute
    why: list[str] = field(default_factory=list)  # reasons of this tenant's reclaims or restores

    @property
    def count0(self) -> int:
        return len(self.snap.remapped_layers)


class RemapController:
    def __init__(self, config: RemapConfig | None = None) -> None:
        self.config = config or RemapConfig()

    def cap(self, tenant: TenantSnapshot) -> int:
        """Most layers of this model any plan may leave remapped."""
        return self.cap_for(tenant.num_layers)

    def cap_for(self, num_layers: int) -> int:
        return min(math.floor(self.config.max_remapped_fraction * num_layers + _EPS), num_layers - 1)

    def alpha_budget(self, tenant: TenantSnapshot, link_bytes_per_s: float, copies_overlap: bool = True) -> int:
        """Layers whose host->device copies hide under the next step's compute; the cap if inactive.
        None hide where copies run inline: an active tenant then keeps its layers and pays for KV by
        preempting, which on a CPU costs less than a copy of every lent layer on every step."""
        cap = self.cap(tenant)
        if not tenant.is_active or tenant.predicted_compute_s is None:
            return cap
        if not copies_overlap:
            return 0
        hidden = tenant.predicted_compute_s * link_bytes_per_s / tenant.layer_bytes
        return cap if hidden >= cap else math.floor(hidden + _EPS)

    def plan(self, snapshot: MemorySnapshot) -> RemapPlan:
        tenants = [self._working(t, snapshot) for t in sorted(snapshot.tenants, key=lambda t: t.model)]
        spare = (snapshot.num_free_pages - snapshot.reserved_pages - sum(t.snap.kv_pages_needed for t in tenants)
                 - sum(self._staging_pages(t, t.count) for t in tenants))
        # Over-budget models are first put at their budget, so reclaims also fund their restores; if
        # reclaims fall short, restores are backed off until no other tenant's pages are taken.
        over = sorted((t for t in tenants if t.count > t.budget), key=lambda t: (not t.streams, t.snap.model))
        for t in over:
            spare, t.count = spare + self._gain(t, t.budget), t.budget
        spare, reclaimed = self._reclaim(tenants, spare)
        spare, short = self._back_off(over, spare, tenants)
        restored = [t for t in over if t.count < t.count0]  # in decision order, like reclaimed
        for t in restored:
            t.why.append(_over_budget_reason(t, spare))
        if not reclaimed:
            spare = self._revert(tenants, spare, restored)
        return self._build(snapshot, tenants, reclaimed, restored, spare, short)

    def _working(self, t: TenantSnapshot, snapshot: MemorySnapshot) -> _Tenant:
        streams = t.is_active and snapshot.urgent in (None, t.model)
        cap = self.cap(t)
        budget = (self.alpha_budget(t, snapshot.link_bytes_per_s, snapshot.copies_overlap)
                  if streams and snapshot.urgent is None else cap)
        return _Tenant(t, cap, budget, len(t.remapped_layers), streams)

    # -- the ledger ----------------------------------------------------------------------------

    def _staging_pages(self, t: _Tenant, count: int) -> int:
        return num_staging_slots(count, self.config) * t.snap.layer_pages if t.streams else 0

    def _delta(self, t: _Tenant, from_count: int, to_count: int) -> int:
        """Change in spare pages when t's remapped count moves between these (reclaims add pages)."""
        return ((to_count - from_count) * t.snap.layer_pages
                - self._staging_pages(t, to_count) + self._staging_pages(t, from_count))

    def _gain(self, t: _Tenant, new_count: int) -> int:
        return self._delta(t, t.count, new_count)

    # -- the phases ----------------------------------------------------------------------------

    def _victims(self, tenants: list[_Tenant]) -> list[_Tenant]:
        """Tenants that do not stream, in victim order: inactive ones before active ones that wait for
        an urgent tenant's step, cluster-cold ones first, warming ones last, MRU/LRU in between;
        ties broken by model name."""
        sign = -1 if self.config.victim_order is VictimOrder.MRU else 1
        idle = [t for t in tenants if not t.streams]
        return sorted(idle, key=lambda t: (t.snap.is_active, not t.snap.cold, t.snap.warming,
                                           sign * t.snap.last_active_s, t.snap.model))

    def _reclaim(self, tenants: list[_Tenant], spare: int) -> tuple[int, list[_Tenant]]:
        """Cover a deficit: inactive tenants up to the cap, then active ones up to their alpha budget."""
        if spare >= 0:  # no deficit (most plans): nothing to order
            return spare, []
        order = self.config.victim_order.value.upper()
        active = sorted((t for t in tenants if t.streams and t.count < t.budget),
                        key=lambda t: (t.count - t.budget, t.snap.model))  # most unused budget first
        reclaimed = []
        for rank, t in enumerate(self._victims(tenants) + active, start=1):
            if spare >= 0:
                break
            deficit, start = -spare, t.count
            k, gain = self._layers_to_cover(t, deficit)
            if k == 0:
                continue
            spare, t.count = spare + gain, t.count + k
            reclaimed.append(t)
            if t.streams:
                who = f"active, unused alpha budget {t.budget - start} of {t.budget}"
            else:
                state = "inactive" if not t.snap.is_active else f"waits while {_urgent_name(tenants)} runs"
                who = f"{order} victim #{rank} ({state}, last_active_s={t.snap.last_active_s:g}, cap {t.cap})"
            t.why.append(f"{who}: deficit {deficit} pages, {t.count - start} layer(s) x {t.snap.layer_pages} "
                         f"pages, remapped {start}->{t.count} of {t.snap.num_layers}")
        return spare, reclaimed

    def _layers_to_cover(self, t: _Tenant, deficit: int) -> tuple[int, int]:
        """(k, pages gained): the fewest layers (up to t's budget) covering deficit, else the best gain.

        Looks ahead rather than stepping one layer at a time: an active model's first remapped layer
        costs a whole ring of staging slots, which only later layers pay back.
        """
        # _gain(t, t.count + k) spelled out: this loop runs a few dozen times per tenant per plan
        count, lp, config = t.count, t.snap.layer_pages, self.config
        slot_pages = lp if t.streams else 0
        staged = num_staging_slots(count, config) * slot_pages
        best_k = best_gain = 0
        for k in range(1, t.budget - count + 1):  # t.budget == t.cap for an inactive tenant
            gain = k * lp - num_staging_slots(count + k, config) * slot_pages + staged
            if gain >= deficit:
                return k, gain
            if gain > best_gain:  # most pages, then fewest layers
                best_k, best_gain = k, gain
        return best_k, best_gain

    def _back_off(self, over: list[_Tenant], spare: int, tenants: list[_Tenant]) -> tuple[int, int]:
        """Undo target restores, inactive models first, until no other tenant's page is taken; a
        streaming model's restores may take the pages of admissions (restore_before_admitting).
        Returns (spare, pages short): the shortfall is what the paper's back-off would leave, since
        admissions that wait for restores are not short of anything remapping could still give."""
        admitting = sum(t.snap.kv_pages_admitting for t in tenants) if self.config.restore_before_admitting else 0
        targets = {id(t): t.count for t in over}
        paper = self._back_off_to(over, spare, 0)
        if not admitting:
            return paper, max(0, -paper)
        for t in over:
            t.count = targets[id(t)]
        return self._back_off_to(over, spare, admitting), max(0, -paper)

    def _back_off_to(self, over: list[_Tenant], spare: int, admitting: int) -> int:
        for t in sorted(over, key=lambda t: (t.streams, t.snap.model)):
            floor = -admitting if t.streams else 0  # the lowest spare t's restores may leave
            if spare >= floor:
                continue
            base = spare - self._delta(t, t.count0, t.count)  # spare without any of t's restores
            counts = range(t.count, t.count0 + 1)
            fits = [c for c in counts if base + self._delta(t, t.count0, c) >= floor]
            t.count = min(fits) if fits else max(counts, key=lambda c: (self._delta(t, t.count0, c), -c))
            spare = base + self._delta(t, t.count0, t.count)
        return spare

    def _revert(self, tenants: list[_Tenant], spare: int, restored: list[_Tenant]) -> int:
        """Give spare pages back to parameters: active models first, then inactive, reverse victim order."""
        headroom = self.config.revert_headroom_pages
        if not any(t.count > 0 and spare - headroom >= t.snap.layer_pages for t in tenants):
            return spare  # no lent layer fits in the spare pages (most plans): nothing to order
        active = sorted((t for t in tenants if t.streams and t.count > 0),
                        key=lambda t: (-t.count * t.snap.layer_bytes, t.snap.model))  # costliest stream first
        for t in active + self._victims(tenants)[::-1]:
            lp, start, spare0 = t.snap.layer_pages, t.count, spare
            while t.count > 0 and spare - headroom >= lp and spare + (gain := self._gain(t, t.count - 1)) >= headroom:
                spare, t.count = spare + gain, t.count - 1
            if t.count < start:
                _note(restored, t)
                t.why.append(f"reversion: spare {spare0} pages >= {lp} layer pages + {headroom} headroom, "
                             f"remapped {start}->{t.count} (spare {spare} after)")
        return spare

    # -- the plan ------------------------------------------------------------------------------

    def _build(self, snapshot: MemorySnapshot, tenants: list[_Tenant], reclaimed: list[_Tenant],
               restored: list[_Tenant], spare: int, short: int) -> RemapPlan:
        reclaim = tuple(LayerAction(t.snap.model, i, "; ".join(t.why))
                        for t in reclaimed
                        for i in layers_to_add(t.snap.num_layers, t.snap.remapped_layers, t.count - t.count0))
        restore = tuple(LayerAction(t.snap.model, i, "; ".join(t.why))
                        for t in restored
                        for i in layers_to_restore(t.snap.num_layers, t.snap.remapped_layers, t.count0 - t.count))
        after: dict[str, frozenset[int] | set[int]] = {t.snap.model: t.snap.remapped_layers for t in tenants}
        if reclaim or restore:  # copies only where layers change hands (most plans change none)
            after = {model: set(layers) for model, layers in after.items()}
            for a in reclaim:
                after[a.model].add(a.layer)
            for a in restore:
                after[a.model].discard(a.layer)
        stream = tuple(self._stream(t, tuple(sorted(after[t.snap.model])), snapshot.link_bytes_per_s)
                       for t in tenants if t.streams and t.count > 0)
        staging = sum(self._staging_pages(t, t.count) for t in tenants)
        kv = sum(t.snap.kv_pages_needed for t in tenants)
        reason = (f"ledger: free {snapshot.num_free_pages} + reclaimed {_pages(reclaim, tenants)} "
                  f"- restored {_pages(restore, tenants)} - kv needed {kv} - staging {staging} = spare {spare} pages")
        if short:
            reason += (f"; SHORT by {short} pages: no layer left to reclaim (inactive tenants at their cap, "
                       "active tenants at their alpha budget or their staging slots would cost what they free)")
        elif spare < 0:
            reason += f"; admissions wait for {-spare} pages: restores of streaming models over budget come first"
        return RemapPlan(reclaim, restore, stream, short, reason)

    def _stream(self, t: _Tenant, layers: tuple[int, ...], link_bytes_per_s: float) -> StreamPlan:
        alpha, slots = len(layers), num_staging_slots(len(layers), self.config)
        transfer_ms = 1e3 * t.snap.layer_bytes / link_bytes_per_s if link_bytes_per_s > 0 else math.inf
        compute = t.snap.predicted_compute_s
        compute_ms = "unmeasured" if compute is None else f"{1e3 * compute:.3g} ms"
        timing = f"{alpha} x {transfer_ms:.3g} ms transfer vs {compute_ms} compute (cap {t.cap})"
        if alpha > t.budget:
            why = f"OVER BUDGET: alpha {alpha} > alpha_budget {t.budget}, not enough free pages to restore; {timing}"
        else:
            why = f"alpha {alpha} <= alpha_budget {t.budget}: {timing}"
        return StreamPlan(t.snap.model, layers, alpha, t.budget, slots, why)


def _check_int(name: str, value: object, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")


def _over_budget_reason(t: _Tenant, spare: int) -> str:
    limit = "alpha_budget" if t.streams else "cap"
    why = (f"over budget: {t.count0} remapped > {limit} {t.budget}, restoring {t.count0 - t.count} "
           f"x {t.snap.layer_pages} pages")
    if t.count > t.budget:
        why += f", still {t.count} remapped: more would take other tenants' pages (spare {spare})"
    return why


def _urgent_name(tenants: list[_Tenant]) -> str:
    """The urgent tenant of a plan: the only active one that streams while others wait."""
    return next((t.snap.model for t in tenants if t.streams), "another tenant")


def _note(restored: list[_Tenant], t: _Tenant) -> None:
    if all(r is not t for r in restored):
        restored.append(t)


def _pages(actions: tuple[LayerAction, ...], tenants: list[_Tenant]) -> int:
    if not actions:
        return 0
    lp = {t.snap.model: t.snap.layer_pages for t in tenants}
    return sum(lp[a.model] for a in actions)


def _group(actions: tuple[LayerAction, ...]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for a in actions:
        groups.setdefault((a.model, a.reason), []).append(a.layer)
    return groups
