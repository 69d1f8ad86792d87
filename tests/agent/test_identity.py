"""Identity labels, cluster-wide allocation (create-conflict as the lock), GC, pod tracking."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pycilium.agent.identity import allocator as allocmod
from pycilium.agent.identity.allocator import IdentityAllocationError, IdentityAllocator, probe_sequence
from pycilium.agent.identity.backend import (
    SECURITY_LABELS,
    BackendError,
    MemoryIdentityBackend,
)
from pycilium.agent.identity.labels import (
    ID_HOST,
    ID_WORLD,
    LOCAL_ID_FLAG,
    MAX_GLOBAL_ID,
    MIN_GLOBAL_ID,
    cidr_labels,
    is_local_id,
    labels_key,
    labels_to_map,
    pod_identity_labels,
)
from pycilium.agent.identity.pods import PodTracker

WEB = pod_identity_labels({"app": "web"}, "default", {"team": "a"})
DB = pod_identity_labels({"app": "db"}, "default", {"team": "a"})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FlakyBackend(MemoryIdentityBackend):
    """A memory backend that can be switched off (API server away)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise BackendError("connection refused")

    def create(self, identity: int, security_labels: Any) -> dict[str, Any]:
        self._check()
        return super().create(identity, security_labels)

    def get(self, identity: int) -> dict[str, Any] | None:
        self._check()
        return super().get(identity)

    def list(self) -> list[dict[str, Any]]:
        self._check()
        return super().list()


# ---- labels --------------------------------------------------------------------------------------


def test_pod_identity_labels() -> None:
    ls = pod_identity_labels(
        {"app": "web", "pod-template-hash": "abc", "io.kubernetes.pod.namespace": "evil"},
        "prod",
        {"team": "x"},
    )
    assert ls == {
        "k8s:app=web",
        "k8s:io.kubernetes.pod.namespace=prod",
        "k8s:io.cilium.k8s.namespace.labels.team=x",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
    }
    assert labels_to_map(ls)["k8s:app"] == "web"
    assert labels_key(ls) == ";".join(sorted(ls))
    assert cidr_labels("10.1.2.3/8") == {"cidr:10.0.0.0/8", "reserved:world"}


def test_probe_sequence_is_deterministic_and_in_range() -> None:
    a = list(probe_sequence(WEB, 5))
    assert a == list(probe_sequence(set(WEB), 5))
    assert all(MIN_GLOBAL_ID <= i <= MAX_GLOBAL_ID for i in a)
    assert len(set(probe_sequence(WEB))) == MAX_GLOBAL_ID - MIN_GLOBAL_ID + 1


# ---- allocation ----------------------------------------------------------------------------------


def test_two_agents_agree_and_distinct_sets_differ() -> None:
    be = MemoryIdentityBackend()
    a, b = IdentityAllocator(be), IdentityAllocator(be)
    b.mark_synced()  # b's watch has not delivered a's identity yet: its cache is empty
    ia = a.allocate(WEB)
    assert MIN_GLOBAL_ID <= ia <= MAX_GLOBAL_ID
    be.calls.clear()
    assert b.allocate(WEB) == ia  # 409 on create, GET, same labels
    assert be.calls == [("create", ia), ("get", ia)]
    assert b.allocate(DB) != ia and a.allocate(DB) == b.allocate(DB)
    assert a.lookup(ia) == WEB and b.lookup(ia) == WEB
    assert a.all()[ID_HOST] == frozenset({"reserved:host"})
    assert a.allocate({"reserved:host"}) == ID_HOST


def test_conflict_with_other_labels_probes_next() -> None:
    be = MemoryIdentityBackend()
    first, second = list(probe_sequence(WEB, 2))
    be.create(first, labels_to_map(DB))  # the number WEB hashes to holds DB
    a = IdentityAllocator(be)
    a.mark_synced()
    assert a.allocate(WEB) == second
    b = IdentityAllocator(be)
    b.mark_synced()
    be.calls.clear()
    assert b.allocate(WEB) == second  # same walk: 409 (DB), 409 (WEB: ours)
    assert be.calls == [("create", first), ("get", first), ("create", second), ("get", second)]
    c = IdentityAllocator(be)  # not synced: lists first and finds it without probing
    be.calls.clear()
    assert c.allocate(WEB) == second and be.calls == []


def test_concurrent_agents_heavy_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocmod, "_probe_start", lambda key: MIN_GLOBAL_ID)  # every set collides
    be = MemoryIdentityBackend()
    sets = [pod_identity_labels({"app": f"a{i}"}, "default") for i in range(12)]
    results: list[dict[str, int]] = []
    lock = threading.Lock()

    def agent(seed: int) -> None:
        alloc = IdentityAllocator(be)
        alloc.mark_synced()  # no listing: every agent races on create
        got = {}
        for ls in sets[seed % 3 :] + sets[: seed % 3]:
            got[labels_key(ls)] = alloc.allocate(ls)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert len(set(results[0].values())) == len(sets)
    assert sorted(results[0].values()) == list(range(MIN_GLOBAL_ID, MIN_GLOBAL_ID + len(sets)))


def test_cache_from_watch_avoids_api_calls() -> None:
    be = MemoryIdentityBackend()
    ia = IdentityAllocator(be).allocate(WEB)
    b = IdentityAllocator(be)
    for obj in be.list():
        b.upsert_identity(obj)
    b.mark_synced()
    be.calls.clear()
    assert b.allocate(WEB) == ia and be.calls == []


def test_backend_down_raises_allocation_error() -> None:
    be = FlakyBackend()
    be.down = True
    with pytest.raises(IdentityAllocationError):
        IdentityAllocator(be).allocate(WEB)


def test_cidr_identities() -> None:
    a = IdentityAllocator(None)
    i1 = a.allocate_cidr("10.0.0.0/8")
    assert is_local_id(i1) and i1 > LOCAL_ID_FLAG
    assert a.allocate_cidr("10.0.0.0/8") == i1
    i2 = a.allocate_cidr("10.1.0.0/16")
    assert i2 != i1 and a.lookup(i2) == {"cidr:10.1.0.0/16", "reserved:world"}
    assert a.allocate_cidr("0.0.0.0/0") == ID_WORLD
    a.release_cidr("10.0.0.0/8")
    assert a.cidr_identity("10.0.0.0/8") == i1
    a.release_cidr("10.0.0.0/8")
    assert a.cidr_identity("10.0.0.0/8") is None and a.lookup(i1) is None
    assert a.restore_cidr("192.168.0.0/16", LOCAL_ID_FLAG | 77)
    assert a.allocate_cidr("192.168.0.0/16") == LOCAL_ID_FLAG | 77
    assert a.restore_cidr("172.16.0.0/12", LOCAL_ID_FLAG | 78)
    assert a.drop_unused_restored() == ["172.16.0.0/12"]
    assert a.cidr_identity("192.168.0.0/16") == LOCAL_ID_FLAG | 77


# ---- garbage collection ----------------------------------------------------------------------------


def test_gc_after_grace_with_preconditions() -> None:
    be = MemoryIdentityBackend()
    clock = Clock()
    a = IdentityAllocator(be, clock=clock)
    iw = a.allocate(WEB)
    idb = a.allocate(DB)
    a.release(WEB)
    a.release(idb)
    in_use = {labels_key(DB)}
    assert a.gc(in_use, grace=60) == []  # first sighting starts the clock
    clock.t += 30
    assert a.gc(in_use, grace=60) == []
    clock.t += 31
    assert a.gc(in_use, grace=60) == [iw]
    assert be.get(iw) is None and be.get(idb) is not None and a.lookup(iw) is None


def test_gc_does_not_delete_changed_or_referenced() -> None:
    be = MemoryIdentityBackend()
    clock = Clock()
    a = IdentityAllocator(be, clock=clock)
    iw = a.allocate(WEB)
    idb = a.allocate(DB)
    a.release(DB)
    a.gc(set(), grace=10)
    be.touch(idb)  # someone else wrote it since we looked: the precondition fails
    clock.t += 11
    assert a.gc(set(), grace=10) == []
    assert be.get(idb) is not None and be.get(iw) is not None  # WEB is referenced locally
    # another agent's collector: GC by a second allocator that never used it
    b = IdentityAllocator(be, clock=clock)
    b.resync()
    assert b.gc({labels_key(WEB)}, grace=0) == [idb]
    assert be.get(idb) is None and be.get(iw) is not None


def test_deleted_identity_in_use_is_recreated() -> None:
    be = MemoryIdentityBackend()
    a = IdentityAllocator(be)
    iw = a.allocate(WEB)
    obj = be.get(iw)
    assert obj is not None
    assert be.delete(iw, obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])
    a.delete_identity(obj)  # the watch event
    again = be.get(iw)
    assert again is not None and again[SECURITY_LABELS] == labels_to_map(WEB)
    assert a.lookup(iw) == WEB


def test_deleted_identity_taken_by_others_is_reassigned() -> None:
    be = MemoryIdentityBackend()
    a = IdentityAllocator(be)
    tracker = PodTracker(a, "n1")
    tracker.upsert_pod({"metadata": {"namespace": "default", "name": "p", "uid": "u", "labels": {"app": "web"}},
                        "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.0.5"}})  # fmt: skip
    p = tracker.get("default", "p")
    assert p is not None and p.identity is not None
    old = p.identity
    obj = be.get(old)
    assert obj is not None
    be.delete(old, obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])
    be.create(old, {"k8s:app": "intruder"})  # re-created by another agent for other labels
    seen: list[tuple[int, int]] = []
    a.on_reassigned(lambda ls, o, n: seen.append((o, n)))
    a.delete_identity(obj)
    p2 = tracker.get("default", "p")
    assert p2 is not None and p2.identity not in (None, old)
    assert seen == [(old, p2.identity)]
    assert tracker.by_identity(p2.identity) == [p2]


# ---- pod tracker ---------------------------------------------------------------------------------


def _pod(name: str, labels: dict[str, str], ns: str = "default", **kw: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": kw.get("uid", f"uid-{name}"), "labels": labels},
        "spec": {"nodeName": "n1", "hostNetwork": kw.get("host_network", False)},
        "status": {"podIP": kw.get("ip", "10.0.0.9"), "phase": kw.get("phase", "Running")},
    }


def test_tracker_identities_and_refs() -> None:
    be = MemoryIdentityBackend()
    a = IdentityAllocator(be)
    t = PodTracker(a, "n1")
    t.upsert_namespace({"metadata": {"name": "default", "labels": {"team": "a"}}})
    t.upsert_pod(_pod("w1", {"app": "web"}))
    t.upsert_pod(_pod("w2", {"app": "web"}))
    t.upsert_pod(_pod("h", {"app": "web"}, host_network=True))
    t.upsert_pod(_pod("done", {"app": "batch"}, phase="Succeeded"))
    w1, w2, h, done = (t.get("default", n) for n in ("w1", "w2", "h", "done"))
    assert w1 and w2 and h and done
    assert w1.identity == w2.identity and w1.identity is not None
    assert h.identity is None and done.identity is None
    assert a.references()[w1.identity] == 2
    assert t.in_use_label_keys() == {labels_key(WEB)}
    t.upsert_pod(_pod("w2", {"app": "db"}))
    w2b = t.get("default", "w2")
    assert w2b is not None and w2b.identity not in (None, w1.identity)
    assert a.references()[w1.identity] == 1
    # namespace labels are part of the identity
    t.upsert_namespace({"metadata": {"name": "default", "labels": {"team": "b"}}})
    w1b = t.get("default", "w1")
    assert w1b is not None and w1b.identity not in (None, w1.identity)
    t.delete_pod(_pod("w1", {}))
    t.delete_pod(_pod("w2", {}))
    assert a.references() == {}


def test_tracker_pending_when_api_down() -> None:
    be = FlakyBackend()
    a = IdentityAllocator(be)
    t = PodTracker(a, "n1")
    be.down = True
    t.upsert_pod(_pod("w1", {"app": "web"}))
    p = t.get("default", "w1")
    assert p is not None and p.identity is None and t.pending() == {"default/w1"}
    assert labels_key(pod_identity_labels({"app": "web"}, "default")) in t.in_use_label_keys()
    assert t.retry_pending() == 1
    be.down = False
    assert t.retry_pending() == 0
    p = t.get("default", "w1")
    assert p is not None and p.identity is not None


def test_tracker_uid_change_is_a_new_pod() -> None:
    a = IdentityAllocator(MemoryIdentityBackend())
    t = PodTracker(a, "n1")
    events: list[tuple[str | None, str | None]] = []

    class L:
        def pod_changed(self, old: Any, new: Any) -> None:
            events.append((old.uid if old else None, new.uid if new else None))

    t.subscribe(L())
    t.upsert_pod(_pod("p", {"a": "b"}, uid="u1"))
    t.upsert_pod(_pod("p", {"a": "b"}, uid="u2"))
    t.delete_pod(_pod("p", {"a": "b"}, uid="u1"))  # stale delete of the old incarnation: ignored
    assert events == [(None, "u1"), ("u1", None), (None, "u2")]
    assert t.get("default", "p") is not None


@pytest.fixture
def gc_world() -> Iterator[tuple[MemoryIdentityBackend, Clock]]:
    yield MemoryIdentityBackend(), Clock()


def test_controlplane_gc_uses_cluster_pods(gc_world: tuple[MemoryIdentityBackend, Clock]) -> None:
    from pycilium.agent.ipcache.datapath import MemoryIPCacheDatapath
    from pycilium.agent.policy.controlplane import PolicyControlPlane
    from pycilium.agent.policy.datapath import MemoryPolicyDatapath

    be, clock = gc_world
    cp = PolicyControlPlane(node_name="n1", identity_backend=be, policy_datapath=MemoryPolicyDatapath(),
                            ipcache_datapath=MemoryIPCacheDatapath(), gc_grace=100, clock=clock)  # fmt: skip
    assert cp.run_gc() == []  # not synced: nothing is collected
    cp.upsert_pod(_pod("w1", {"app": "web"}, ip="10.0.0.1"))
    cp.upsert_pod(_pod("d1", {"app": "db"}, ip="10.0.0.2"))
    cp.mark_synced()
    w = cp.pods.get("default", "w1")
    d = cp.pods.get("default", "d1")
    assert w and d and w.identity and d.identity
    cp.delete_pod(_pod("d1", {}))
    cp.run_gc()
    clock.t += 101
    assert cp.run_gc() == [d.identity]
    assert be.get(w.identity) is not None and be.get(d.identity) is None
