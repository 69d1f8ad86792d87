"""The ipcache manager: pod IPs cluster-wide, tunnel endpoints, CIDRs, ownership and restart."""

from __future__ import annotations

import ipaddress
from typing import Any

from pycilium.agent.identity.allocator import IdentityAllocator
from pycilium.agent.identity.backend import MemoryIdentityBackend
from pycilium.agent.identity.labels import ID_HOST, ID_INIT, ID_REMOTE_NODE, ID_WORLD, LOCAL_ID_FLAG
from pycilium.agent.identity.pods import PodTracker
from pycilium.agent.ipcache.datapath import IPCACHE_F_REMOTE_NODE, IPCacheEntry, MemoryIPCacheDatapath
from pycilium.agent.ipcache.manager import IPCacheManager

N = ipaddress.IPv4Network


def pod(name: str, ip: str | None, node: str, **kw: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name, "uid": kw.get("uid", f"u-{name}"),
                     "labels": kw.get("labels", {"app": name}),
                     **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if kw.get("terminating") else {})},
        "spec": {"nodeName": node, "hostNetwork": kw.get("host_network", False)},
        "status": {"podIP": ip, "hostIP": kw.get("host_ip"), "phase": kw.get("phase", "Running")},
    }  # fmt: skip


def node(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"addresses": [{"type": "Hostname", "address": name},
                                                                 {"type": "InternalIP", "address": ip}]}}  # fmt: skip


class Setup:
    def __init__(self, dp: MemoryIPCacheDatapath | None = None, backend: MemoryIdentityBackend | None = None):
        self.dp = dp or MemoryIPCacheDatapath()
        self.alloc = IdentityAllocator(backend or MemoryIdentityBackend())
        self.pods = PodTracker(self.alloc, "a")
        self.m = IPCacheManager(self.dp, "a")
        self.pods.subscribe(self.m)

    def entry(self, prefix: str) -> IPCacheEntry | None:
        return self.dp.entries.get(N(prefix))

    def ident(self, name: str) -> int:
        p = self.pods.get("default", name)
        assert p is not None and p.identity is not None
        return p.identity


def test_local_and_remote_pods() -> None:
    s = Setup()
    s.m.upsert_node(node("b", "192.168.0.2"))
    s.pods.upsert_pod(pod("l", "10.200.0.5", "a"))
    s.pods.upsert_pod(pod("r", "10.200.1.5", "b", host_ip="192.168.0.99"))
    s.pods.upsert_pod(pod("r2", "10.200.2.5", "c", host_ip="192.168.0.3"))  # node not known yet
    s.pods.upsert_pod(pod("hn", "192.168.0.2", "b", host_network=True))
    s.pods.upsert_pod(pod("done", "10.200.0.6", "a", phase="Failed"))
    s.pods.upsert_pod(pod("noip", None, "b"))
    assert s.entry("10.200.0.5/32") == IPCacheEntry(s.ident("l"))
    assert s.entry("10.200.1.5/32") == IPCacheEntry(s.ident("r"), "192.168.0.2", IPCACHE_F_REMOTE_NODE)
    assert s.entry("10.200.2.5/32") == IPCacheEntry(s.ident("r2"), "192.168.0.3", IPCACHE_F_REMOTE_NODE)
    assert set(s.dp.entries) == {N("10.200.0.5/32"), N("10.200.1.5/32"), N("10.200.2.5/32")}
    # node IP learned / changed: every pod of that node follows
    s.m.upsert_node(node("c", "192.168.0.33"))
    assert s.entry("10.200.2.5/32") == IPCacheEntry(s.ident("r2"), "192.168.0.33", IPCACHE_F_REMOTE_NODE)
    s.m.upsert_node(node("b", "192.168.0.22"))
    e = s.entry("10.200.1.5/32")
    assert e is not None and e.tunnel_endpoint == "192.168.0.22"
    # label change -> identity change
    s.pods.upsert_pod(pod("r", "10.200.1.5", "b", labels={"app": "changed"}))
    e = s.entry("10.200.1.5/32")
    assert e is not None and e.identity == s.ident("r")
    s.pods.delete_pod(pod("r", None, "b"))
    assert s.entry("10.200.1.5/32") is None


def test_ip_reused_by_a_new_pod() -> None:
    s = Setup()
    s.pods.upsert_pod(pod("old", "10.200.0.7", "a", terminating=True))
    s.pods.upsert_pod(pod("new", "10.200.0.7", "a", labels={"app": "new"}))
    e = s.entry("10.200.0.7/32")
    assert e is not None and e.identity == s.ident("new")
    s.pods.delete_pod(pod("old", None, "a"))
    e = s.entry("10.200.0.7/32")
    assert e is not None and e.identity == s.ident("new")


def test_pending_identity_written_as_init() -> None:
    class Down(MemoryIdentityBackend):
        def create(self, identity: int, security_labels: Any) -> Any:
            from pycilium.agent.identity.backend import BackendError

            raise BackendError("down")

    s = Setup(backend=Down())
    s.pods.upsert_pod(pod("r", "10.200.1.8", "b", host_ip="192.168.0.2"))
    assert s.entry("10.200.1.8/32") == IPCacheEntry(ID_INIT, "192.168.0.2", IPCACHE_F_REMOTE_NODE)


def test_cidrs_and_foreign_keys() -> None:
    foreign = {
        N("0.0.0.0/0"): IPCacheEntry(ID_WORLD),
        N("192.168.0.1/32"): IPCacheEntry(ID_HOST),
        N("192.168.0.2/32"): IPCacheEntry(ID_REMOTE_NODE),
    }
    s = Setup(MemoryIPCacheDatapath(dict(foreign)))
    s.m.mark_synced()
    s.m.upsert_cidr("10.0.0.0/8", LOCAL_ID_FLAG | 1)
    s.m.upsert_cidr("192.168.0.2/32", LOCAL_ID_FLAG | 2)  # a node IP: not taken over
    s.m.upsert_cidr("0.0.0.0/0", ID_WORLD)  # world belongs to the node manager
    assert s.entry("10.0.0.0/8") == IPCacheEntry(LOCAL_ID_FLAG | 1)
    assert s.entry("192.168.0.2/32") == IPCacheEntry(ID_REMOTE_NODE)
    s.m.delete_cidr("10.0.0.0/8")
    s.m.delete_cidr("192.168.0.2/32")
    assert s.dp.entries == foreign  # only our own keys were ever deleted
    # a pod IP inside a CIDR keeps its own /32; the CIDR stays for the rest
    s.m.upsert_cidr("10.200.0.0/16", LOCAL_ID_FLAG | 3)
    s.pods.upsert_pod(pod("p", "10.200.0.9", "a"))
    assert s.m.lookup_ip("10.200.0.9") == IPCacheEntry(s.ident("p"))
    assert s.m.lookup_ip("10.200.3.3") == IPCacheEntry(LOCAL_ID_FLAG | 3)


def test_restart_adopts_and_cleans_after_sync() -> None:
    s = Setup()
    s.m.upsert_node(node("b", "192.168.0.2"))
    s.pods.upsert_pod(pod("keep", "10.200.1.1", "b"))
    s.pods.upsert_pod(pod("gone", "10.200.1.2", "b"))
    s.m.upsert_cidr("10.0.0.0/8", LOCAL_ID_FLAG | 5)
    s.dp.entries[N("192.168.0.2/32")] = IPCacheEntry(ID_REMOTE_NODE)  # the node manager's
    before = dict(s.dp.entries)
    # restart: a new manager (same identities through the same API) over the same map
    s2 = Setup(s.dp, backend=s.alloc.backend)  # type: ignore[arg-type]
    assert s2.m.restored_cidr_identities() == {N("10.0.0.0/8"): LOCAL_ID_FLAG | 5}
    s2.dp.ops.clear()
    s2.m.upsert_node(node("b", "192.168.0.2"))
    s2.pods.upsert_pod(pod("keep", "10.200.1.1", "b"))
    assert s2.dp.ops == [] and s2.dp.entries == before  # nothing rewritten, nothing deleted yet
    assert s2.m.mark_synced() == 2  # the pod that went away and the unclaimed CIDR
    assert set(s2.dp.entries) == {N("10.200.1.1/32"), N("192.168.0.2/32")}
