"""Policy, endpoint flags and ipcache written to real pinned maps, checked with the mirrors and with
the kernel's own LPM lookups (what the datapath sees)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pycilium.agent.identity.backend import MemoryIdentityBackend
from pycilium.agent.identity.labels import ID_HOST, LOCAL_ID_FLAG
from pycilium.agent.ipcache.datapath import PinnedIPCacheDatapath
from pycilium.agent.policy.controlplane import PolicyControlPlane
from pycilium.agent.policy.datapath import (
    EP_F_POLICY_EGRESS,
    EP_F_POLICY_INGRESS,
    PinnedPolicyDatapath,
    dump_policy_map,
)
from pycilium.bpf import loader
from pycilium.bpf.maps import ALL_MAPS, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import ENDPOINTS, EndpointInfo, EndpointKey
from pycilium.bpf.maps.ipcache import IPCACHE, IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.policymap import POLICY, PolicyEntry, PolicyKey
from pycilium.bpf.maps.util import ip_to_be32

pytestmark = pytest.mark.kernel

EP_F_NO_MAC_CHECK = d("EP_F_NO_MAC_CHECK")
NODE = "node-a"
SRV_IP, CLI_IP = "10.200.0.10", "10.200.1.20"
EP = 42


@pytest.fixture
def root(pin_root: str) -> Iterator[str]:
    sizes = {s.size_define: 4096 for s in ALL_MAPS if s.default_size}
    for fd in loader.open_pinned_maps(pin_root, sizes).values():
        os.close(fd)
    yield pin_root


def pod_obj(name: str, ip: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name, "uid": f"u-{name}", "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": ip, "hostIP": "192.168.0.2", "phase": "Running"},
    }


POLICY_SPEC = {
    "podSelector": {"matchLabels": {"app": "srv"}},
    "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
         "ports": [{"port": 1000, "endPort": 2000}, {"port": "http"}, {"protocol": "UDP"}]},
        {"from": [{"ipBlock": {"cidr": "172.16.0.0/12", "except": ["172.16.1.0/24"]}}]},
    ],
}  # fmt: skip


def write_endpoint_entry(root: str, ip: str, ep_id: int) -> None:
    """What the endpoint manager writes at CNI ADD."""
    with PinnedMap(ENDPOINTS, root) as m:
        m.update(
            EndpointKey(ip=ip_to_be32(ip)), EndpointInfo(ifindex=7, lxc_id=ep_id, flags=EP_F_NO_MAC_CHECK)
        )


def make_cp(
    root: str, backend: MemoryIdentityBackend, dp: PinnedPolicyDatapath | None = None
) -> PolicyControlPlane:
    return PolicyControlPlane(
        node_name=NODE,
        identity_backend=backend,
        policy_datapath=dp or PinnedPolicyDatapath(root),
        ipcache_datapath=PinnedIPCacheDatapath(root),
    )


def feed(cp: PolicyControlPlane) -> None:
    cp.upsert_namespace({"metadata": {"name": "default"}})
    cp.upsert_pod(pod_obj("srv", SRV_IP, NODE, {"app": "srv"}))
    cp.upsert_pod(pod_obj("cli", CLI_IP, "node-b", {"app": "cli"}))
    cp.upsert_node({"metadata": {"name": "node-b"}, "status": {"addresses": [{"type": "InternalIP",
                                                                              "address": "192.168.0.2"}]}})  # fmt: skip
    cp.endpoint_added(EP, SRV_IP, "default", "srv")
    cp.upsert_policy({"metadata": {"namespace": "default", "name": "p"}, "spec": POLICY_SPEC})


def kernel_policy_lookup(root: str, identity: int, egress: int, proto: int, port: int) -> PolicyEntry | None:
    key = PolicyKey(prefixlen=80, sec_label=identity, ep_id=EP, egress=egress, protocol=proto,
                    dport=socket.htons(port))  # fmt: skip
    with PinnedMap(POLICY, root) as m:
        return m.lookup(key)


def kernel_ipcache_lookup(root: str, ip: str) -> RemoteEndpointInfo | None:
    with PinnedMap(IPCACHE, root) as m:
        return m.lookup(IpcacheKey(prefixlen=32, addr=ip_to_be32(ip)))


def test_policy_entries_in_the_kernel(root: str) -> None:
    write_endpoint_entry(root, SRV_IP, EP)
    cp = make_cp(root, MemoryIdentityBackend())
    feed(cp)
    cp.mark_synced()
    srv = cp.pods.get("default", "srv")
    cli = cp.pods.get("default", "cli")
    assert srv and cli and srv.identity and cli.identity
    # the keys, as the mirror reads them
    with PinnedMap(POLICY, root) as m:
        keys = list(m.keys())
    assert keys and all(k.ep_id == EP and k.egress == 0 for k in keys)
    by_id: dict[int, list[PolicyKey]] = {}
    for k in keys:
        by_id.setdefault(k.sec_label, []).append(k)
    (host,) = by_id[ID_HOST]
    assert host.prefixlen == 56 and host.protocol == 0 and host.dport == 0
    cli_keys = by_id[cli.identity]
    udp = [k for k in cli_keys if k.protocol == 17]
    assert len(udp) == 1 and udp[0].prefixlen == 64 and udp[0].dport == 0
    named = [k for k in cli_keys if k.protocol == 6 and socket.ntohs(k.dport) == 8080]
    assert len(named) == 1 and named[0].prefixlen == 80
    # the kernel's longest-prefix lookup: exactly 1000..2000 (and the named 8080) for the client
    allowed = {p for p in range(900, 2100) if kernel_policy_lookup(root, cli.identity, 0, 6, p) is not None}
    assert allowed == set(range(1000, 2001))
    assert kernel_policy_lookup(root, cli.identity, 0, 6, 8080) is not None
    assert kernel_policy_lookup(root, cli.identity, 0, 6, 8081) is None
    assert kernel_policy_lookup(root, cli.identity, 0, 17, 53) is not None
    assert kernel_policy_lookup(root, cli.identity, 1, 6, 1500) is None  # egress not written
    assert kernel_policy_lookup(root, ID_HOST, 0, 6, 22) is not None
    assert kernel_policy_lookup(root, 0, 0, 6, 1500) is None
    # endpoint entry: identity and ingress flag set, the endpoint manager's fields kept
    with PinnedMap(ENDPOINTS, root) as m:
        info = m.lookup(EndpointKey(ip=ip_to_be32(SRV_IP)))
    assert info is not None and info.sec_id == srv.identity and info.ifindex == 7 and info.lxc_id == EP
    assert info.flags == EP_F_POLICY_INGRESS | EP_F_NO_MAC_CHECK
    # ipcache: pods and CIDR identities, as the datapath resolves them
    e = kernel_ipcache_lookup(root, CLI_IP)
    assert e is not None and e.sec_identity == cli.identity and e.tunnel_endpoint == ip_to_be32("192.168.0.2")
    e = kernel_ipcache_lookup(root, SRV_IP)
    assert e is not None and e.sec_identity == srv.identity and e.tunnel_endpoint == 0
    inside = kernel_ipcache_lookup(root, "172.20.0.1")
    excepted = kernel_ipcache_lookup(root, "172.16.1.9")
    assert inside is not None and excepted is not None
    assert inside.sec_identity > LOCAL_ID_FLAG and excepted.sec_identity > LOCAL_ID_FLAG
    assert kernel_policy_lookup(root, inside.sec_identity, 0, 6, 443) is not None
    assert kernel_policy_lookup(root, excepted.sec_identity, 0, 6, 443) is None
    # what `pycilium bpf policy get` reads
    rows = dump_policy_map(root, EP)
    assert any(r.port == "1000-1007/TCP" for r in rows) and any(r.port == "ANY/UDP" for r in rows)
    # deleting the policy: flag off, entries gone, CIDRs gone from the ipcache
    cp.delete_policy({"metadata": {"namespace": "default", "name": "p"}})
    with PinnedMap(POLICY, root) as m:
        assert m.count() == 0
    with PinnedMap(ENDPOINTS, root) as m:
        info = m.lookup(EndpointKey(ip=ip_to_be32(SRV_IP)))
    assert info is not None and info.flags == EP_F_NO_MAC_CHECK
    with PinnedMap(IPCACHE, root) as m:
        assert sorted(k.prefixlen for k in list(m.keys())) == [32, 32]
    cp.stop()


class OrderCheckingDatapath(PinnedPolicyDatapath):
    """Records how many policy entries the endpoint had whenever its enforcement flags change."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.seen: list[tuple[int, int]] = []  # (policy flag bits, entries of the endpoint at that time)

    def write_endpoint(self, ep_id: int, ip: str, sec_id: int | None, flags: int, mask: int) -> bool:
        n = sum(1 for k in list(self.policy.keys()) if k.ep_id == ep_id)
        self.seen.append((flags & mask, n))
        return super().write_endpoint(ep_id, ip, sec_id, flags, mask)


def test_flags_only_after_entries(root: str) -> None:
    write_endpoint_entry(root, SRV_IP, EP)
    dp = OrderCheckingDatapath(root)
    cp = make_cp(root, MemoryIdentityBackend(), dp)
    feed(cp)
    cp.mark_synced()
    on = [n for f, n in dp.seen if f & EP_F_POLICY_INGRESS]
    assert on and all(n > 0 for n in on)
    # egress policy too: every time a flag is on, the entries are already there
    cp.upsert_policy({"metadata": {"namespace": "default", "name": "eg"}, "spec": {
        "podSelector": {"matchLabels": {"app": "srv"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}]}})  # fmt: skip
    with PinnedMap(ENDPOINTS, root) as m:
        info = m.lookup(EndpointKey(ip=ip_to_be32(SRV_IP)))
    assert info is not None and info.flags & EP_F_POLICY_EGRESS
    assert all(n > 0 for f, n in dp.seen if f)
    dp.seen.clear()
    for name in ("p", "eg"):
        cp.delete_policy({"metadata": {"namespace": "default", "name": name}})
    # relaxing: the flags went off while the entries were still there
    assert dp.seen and dp.seen[-1][0] == 0 and all(n > 0 for _, n in dp.seen)
    with PinnedMap(POLICY, root) as m:
        assert m.count() == 0
    cp.stop()


def test_restart_over_pinned_maps(root: str) -> None:
    write_endpoint_entry(root, SRV_IP, EP)
    backend = MemoryIdentityBackend()
    cp = make_cp(root, backend)
    feed(cp)
    cp.mark_synced()
    with PinnedMap(POLICY, root) as m:
        before = {bytes(k) for k in list(m.keys())}
    with PinnedMap(IPCACHE, root) as m:
        ipc_before = {bytes(k): bytes(v) for k, v in m.items()}
    # a stale endpoint's entries from an earlier life
    with PinnedMap(POLICY, root) as m:
        m.update(PolicyKey(prefixlen=56, sec_label=1, ep_id=999), PolicyEntry())
    cp.stop()
    cp2 = make_cp(root, backend)
    feed(cp2)
    # same identities (from the API), same CIDR numbers (restored from the ipcache): nothing moved
    with PinnedMap(IPCACHE, root) as m:
        assert {bytes(k): bytes(v) for k, v in m.items()} == ipc_before
    cp2.mark_synced()
    with PinnedMap(POLICY, root) as m:
        assert {bytes(k) for k in list(m.keys())} == before
    with PinnedMap(IPCACHE, root) as m:
        assert {bytes(k): bytes(v) for k, v in m.items()} == ipc_before
    cp2.stop()
