"""Conntrack garbage collection from user space, on an adaptive interval.

The CT maps are LRU hashes, so a full table never fails an insert; but expired entries would
otherwise linger until evicted, and an evicted live flow is a dropped connection. A GC pass walks
ct4_global and ct_any4_global in batches, deletes entries whose lifetime (monotonic seconds) has
passed, and with each expired flow the NAT mappings of the same tuple (both directions). The
next interval shrinks when much was expired and grows when little was (Cilium's rule).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import PinnedMap
from pycilium.bpf.maps.ctmap import CT4_GLOBAL, CT_ANY4_GLOBAL, Ct4Key, CtEntry
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.metricsmap import METRICS
from pycilium.bpf.maps.natmap import SNAT_V4_EXTERNAL, Nat4Entry
from pycilium.bpf.maps.packing import packer

log = logging.getLogger("pycilium.datapath.ctgc")

MIN_INTERVAL = 10.0
START_INTERVAL = 300.0


@dataclass
class GCResult:
    scanned: int = 0
    deleted: int = 0
    nat_deleted: int = 0
    per_map: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (scanned, left, max)

    @property
    def ratio(self) -> float:
        return self.deleted / self.scanned if self.scanned else 0.0


def next_interval(current: float, ratio: float, max_interval: float) -> float:
    """Shorter after a pass that deleted much (>25%), longer after one that deleted little (<5%)."""
    if ratio > 0.25:
        return max(MIN_INTERVAL, current * (1.0 - min(ratio, 0.9)))
    if ratio < 0.05:
        return min(max_interval, current * 1.5)
    return current


def _nat_keys_for(key_raw: bytes, nat: PinnedMap[Ct4Key, Nat4Entry]) -> list[bytes]:
    """The NAT OUT entry of the same tuple and its IN pair."""
    k = Ct4Key.from_buffer_copy(key_raw)
    k.flags = d("CT_DIR_OUT")
    out = nat.lookup(k)
    if out is None:
        return []
    rev = Ct4Key(saddr=k.daddr, daddr=out.to_addr, sport=k.dport, dport=out.to_port, nexthdr=k.nexthdr,
                 flags=d("CT_DIR_IN"))  # fmt: skip
    return [bytes(k), bytes(rev)]


_LIFETIME = packer(CtEntry, only=("lifetime",))


def gc_pass(bpf_root: str, now: float | None = None) -> GCResult:
    """One pass over both CT maps; deletes expired entries and their NAT mappings."""
    now_s = int(time.monotonic() if now is None else now)
    res = GCResult()
    lifetime_of = _LIFETIME.unpack_from
    nat_flows = (d("CT_DIR_OUT"), d("CT_DIR_NODEPORT"))
    flags_off = Ct4Key.flags.offset
    try:
        nat: PinnedMap[Ct4Key, Nat4Entry] | None = PinnedMap(SNAT_V4_EXTERNAL, bpf_root)
    except FileNotFoundError:
        nat = None
    try:
        for spec in (CT4_GLOBAL, CT_ANY4_GLOBAL):
            with PinnedMap(spec, bpf_root) as ct:
                expired: list[bytes] = []
                nat_keys: list[bytes] = []
                total = 0
                for k, v in ct.raw_items():
                    total += 1
                    if lifetime_of(v)[0] < now_s:
                        expired.append(k)
                        if nat is not None and k[flags_off] in nat_flows:
                            nat_keys.extend(_nat_keys_for(k, nat))
                res.scanned += total
                if expired:
                    res.deleted += sc.map_delete_batch(ct.fd, expired)
                if nat is not None and nat_keys:
                    res.nat_deleted += nat.delete_batch(Ct4Key.from_buffer_copy(x) for x in nat_keys)
                res.per_map[spec.name] = (total, total - len(expired), ct.info.max_entries)
    finally:
        if nat is not None:
            nat.close()
    return res


def ct_created_counts(bpf_root: str) -> dict[str, int]:
    """Conntrack entries the datapath has created, per map (REASON_CT_CREATED in the metrics map)."""
    names = {d("METRIC_DIR_CT_TCP"): CT4_GLOBAL.name, d("METRIC_DIR_CT_ANY"): CT_ANY4_GLOBAL.name}
    out = dict.fromkeys(names.values(), 0)
    try:
        with PinnedMap(METRICS, bpf_root) as m:
            for k, vs in m.items_percpu():
                if k.reason == d("REASON_CT_CREATED") and k.dir in names:
                    out[names[k.dir]] += sum(v.count for v in vs)
    except FileNotFoundError:
        pass
    return out


def estimate_evictions(prev_left: int, scanned: int, created_delta: int) -> int:
    """Entries that were created since the last pass but are gone without GC deleting them: evicted by
    the LRU (a full table) or purged by the agent (removed backends), so an upper bound."""
    return max(0, created_delta - (scanned - prev_left))


def map_pressure(bpf_root: str, names: tuple[str, ...] = ("ct4_global", "ct_any4_global", "snat_v4_external")
                 ) -> dict[str, float]:  # fmt: skip
    """Fill level (entries / max_entries) of the maps that can fill up."""
    from pycilium.bpf.maps import BY_NAME

    out: dict[str, float] = {}
    for name in names:
        try:
            with PinnedMap(BY_NAME[name], bpf_root) as m:
                out[name] = sum(1 for _ in m.raw_items()) / max(m.info.max_entries, 1)
        except FileNotFoundError:
            continue
    return out


class ConntrackGC:
    """Runs gc_pass in a thread on the adaptive (or a fixed) interval."""

    def __init__(self, bpf_root: str, fixed_interval: float = 0.0, max_interval: float = 43200.0):
        self.bpf_root = bpf_root
        self.fixed = fixed_interval
        self.max_interval = max_interval
        self.interval = fixed_interval or START_INTERVAL
        self.last: GCResult | None = None
        self.runs = 0
        self.evictions: dict[str, int] = {}  # map -> estimated LRU evictions so far (upper bound)
        self._created: dict[str, int] | None = None
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> GCResult:
        t0 = time.monotonic()
        created = ct_created_counts(self.bpf_root)
        res = gc_pass(self.bpf_root)
        if self._created is not None and self.last is not None:
            for name, (scanned, _left, _max) in res.per_map.items():
                prev = self.last.per_map.get(name)
                if prev is not None:
                    ev = estimate_evictions(
                        prev[1], scanned, created.get(name, 0) - self._created.get(name, 0)
                    )
                    self.evictions[name] = self.evictions.get(name, 0) + ev
                    if ev:
                        log.warning("conntrack entries evicted before expiry (table full?)",
                                    extra={"map": name, "evicted": ev, "max_entries": _max})  # fmt: skip
        for name in res.per_map:
            self.evictions.setdefault(name, 0)
        self._created = created
        self.last, self.runs = res, self.runs + 1
        if not self.fixed:
            self.interval = next_interval(self.interval, res.ratio, self.max_interval)
        log.info("conntrack gc", extra={"scanned": res.scanned, "deleted": res.deleted, "nat_deleted": res.nat_deleted,
                                        "seconds": round(time.monotonic() - t0, 3), "next_interval": self.interval})  # fmt: skip
        return res

    def kick(self) -> None:
        """Run a pass now (e.g. when a map is nearly full)."""
        self._kick.set()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:
                    log.exception("conntrack gc failed")
                self._kick.wait(self.interval)
                self._kick.clear()

        self._thread = threading.Thread(target=loop, name="ct-gc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread:
            self._thread.join(timeout=5)
