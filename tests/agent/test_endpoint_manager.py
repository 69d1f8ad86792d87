"""EndpointManager used directly, the way other agent subsystems use it (in a node netns)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycilium.agent.endpoint import (
    AddRequest,
    Endpoint,
    EndpointError,
    TcProgramAttacher,
    host_ifname,
)
from pycilium.agent.endpoint import netlink as nl
from pycilium.agent.endpoint.model import EP_F_POLICY_EGRESS, EP_F_POLICY_INGRESS, ID_INIT
from pycilium.bpf import loader
from pycilium.bpf.maps.endpointmap import ENDPOINTS, EndpointInfo, EndpointKey
from pycilium.bpf.maps.pinned import PinnedMap
from pycilium.bpf.maps.util import ip_to_be32
from pycilium.cni import protocol as p
from pycilium.lab.netns import in_netns, run

from tests.cni.helpers import Node, new_container_id, ping

pytestmark = pytest.mark.kernel


class RecordingDatapath:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[tuple[str, str]] = []

    def attach(self, host_ifname: str) -> None:
        self.calls.append(("attach", host_ifname))
        if self.fail:
            raise RuntimeError("programs not loadable")

    def detach(self, host_ifname: str) -> None:
        self.calls.append(("detach", host_ifname))


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    n = Node(pod_cidr="10.79.0.0/24", datapath=RecordingDatapath())
    try:
        yield n
    finally:
        n.close()


def _entry(node: Node, ip: str):  # type: ignore[no-untyped-def]
    with PinnedMap(ENDPOINTS, node.pin_root) as m:
        return m.lookup(EndpointKey(ip_to_be32(ip)))


def _add(node: Node, **kw: str) -> Endpoint:
    with node.inside():
        return node.manager.add(AddRequest(new_container_id(), "eth0", f"/var/run/netns/{node.pod()}", **kw))


def test_listeners_see_adds_and_removes(node: Node) -> None:
    first = _add(node, pod_namespace="prod", pod_name="db-0")
    added: list[Endpoint] = []
    removed: list[Endpoint] = []
    unsubscribe = node.manager.subscribe(added.append, removed.append, replay=True)
    assert first.id in [e.id for e in added]  # replayed
    ep = _add(node, pod_namespace="prod", pod_name="web-1", pod_uid="uid-1")
    assert added[-1].id == ep.id and added[-1].pod == "prod/web-1" and added[-1].ipv4 == ep.ipv4
    assert added[-1].host_ifname == host_ifname(ep.container_id) and added[-1].pod_uid == "uid-1"
    with node.inside():
        gone = node.manager.delete(ep.container_id)
        assert node.manager.delete(ep.container_id) is None  # idempotent
        node.manager.delete(first.container_id)
    assert gone is not None and removed[0].id == ep.id and removed[0].pod_name == "web-1"
    unsubscribe()
    _add(node)
    assert len(removed) == 2 and added[-1].id != node.manager.list_endpoints()[-1].id
    assert node.manager.get_by_pod("prod", "web-1") == []


def test_update_identity_and_flags_writes_the_map(node: Node) -> None:
    ep = _add(node, pod_namespace="a", pod_name="b")
    assert _entry(node, ep.ipv4).sec_id == ID_INIT
    node.manager.set_identity(ep.id, 4242)
    node.manager.set_flags(ep.id, EP_F_POLICY_INGRESS | EP_F_POLICY_EGRESS)
    info = _entry(node, ep.ipv4)
    assert info.sec_id == 4242 and info.flags == EP_F_POLICY_INGRESS | EP_F_POLICY_EGRESS
    state = json.loads((Path(node.config.state_dir) / "endpoints" / f"{ep.container_id}.json").read_text())
    assert state["identity"] == 4242 and state["flags"] == 6
    assert node.manager.get(ep.id).identity == 4242  # type: ignore[union-attr]
    assert node.manager.get_by_ip(ep.ipv4).id == ep.id  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        node.manager.update(65000, identity=1)
    # survives a restart: the map entry is rewritten from the state file
    node.restart()
    info = _entry(node, ep.ipv4)
    assert info.sec_id == 4242 and info.flags == 6


def test_identity_resolver_is_used_at_add(tmp_path: Path) -> None:
    n = Node(pod_cidr="10.79.1.0/24")
    try:
        n.manager.identity_resolver = lambda ns, name: 777 if name == "known" else None
        assert _entry(n, _add(n, pod_namespace="x", pod_name="known").ipv4).sec_id == 777
        assert _entry(n, _add(n, pod_namespace="x", pod_name="other").ipv4).sec_id == ID_INIT
    finally:
        n.close()


def test_datapath_hook_attach_detach_and_reattach_on_restore(node: Node) -> None:
    dp = node.datapath
    assert isinstance(dp, RecordingDatapath)
    ep = _add(node)
    assert ("attach", ep.host_ifname) in dp.calls
    dp.calls.clear()
    node.restart()
    assert ("attach", ep.host_ifname) in dp.calls  # re-attached on restore
    with node.inside():
        node.manager.delete(ep.container_id)
    assert dp.calls[-1] == ("detach", ep.host_ifname)


def test_failed_attach_rolls_everything_back() -> None:
    n = Node(pod_cidr="10.79.2.0/24", datapath=RecordingDatapath(fail=True))
    try:
        events: list[Endpoint] = []
        n.manager.subscribe(events.append, events.append)
        before_links, before = set(n.node_links()), n.ipam.status().allocated
        cid = new_container_id()
        with n.inside(), pytest.raises(EndpointError) as ei:
            n.manager.add(AddRequest(cid, "eth0", f"/var/run/netns/{n.pod()}"))
        assert ei.value.cni_code == p.ERR_INTERNAL and "programs not loadable" in ei.value.msg
        assert set(n.node_links()) == before_links
        assert n.ipam.status().allocated == before and n.ipam.lookup(f"{cid}/eth0") is None
        with PinnedMap(ENDPOINTS, n.pin_root) as m:
            assert list(m.items()) == []
        assert os.listdir(Path(n.config.state_dir) / "endpoints") == []
        assert events == [] and n.manager.list_endpoints() == []
        assert ("detach", host_ifname(cid)) in n.datapath.calls  # type: ignore[union-attr]
    finally:
        n.close()


def test_add_from_inside_an_asyncio_loop(node: Node) -> None:
    async def main() -> Endpoint:
        return node.manager.add(AddRequest(new_container_id(), "eth0", f"/var/run/netns/{node.pod()}"))

    with in_netns(node.name):
        ep = asyncio.run(main())
    assert ping(node.name, ep.ipv4)


def test_failed_pod_side_step_rolls_everything_back(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    # the neighbour request of the pod-side batch names an interface that does not exist: the
    # kernel still applies the rest of the batch, the ADD fails with that step's error
    def bad_neigh(index: int, ip: str, lladdr: str, state: int) -> nl.Request:
        return real_neigh(index + 1000, ip, lladdr, state)

    real_neigh = nl.neigh_request
    monkeypatch.setattr(nl, "neigh_request", bad_neigh)
    before_links, before = set(node.node_links()), node.ipam.status().allocated
    cid, pod = new_container_id(), node.pod()
    with node.inside(), pytest.raises(EndpointError) as ei:
        node.manager.add(AddRequest(cid, "eth0", f"/var/run/netns/{pod}"))
    assert ei.value.cni_code == p.ERR_DATAPATH and "netlink" in ei.value.msg
    assert set(node.node_links()) == before_links and node.ipam.status().allocated == before
    assert node.manager.get_by_container(cid) is None
    assert not (Path(node.config.state_dir) / "endpoints" / f"{cid}.json").exists()
    assert "eth0" not in run(["ip", "-br", "link"], netns=pod).stdout


def test_rtnl_batch_and_netns_socket(node: Node) -> None:
    here = os.stat("/proc/thread-self/ns/net").st_ino
    pod = node.pod()
    with nl.Rtnl.at(f"/var/run/netns/{pod}") as rt:
        assert os.stat("/proc/thread-self/ns/net").st_ino == here  # the thread is back at once
        missing, up, lo = rt.batch([nl.link_up_request("pcnope0"), nl.link_up_request("lo"),
                                    nl.get_link_request("lo")])  # fmt: skip
        assert missing.error == errno.ENODEV and up.error == 0 and lo.error == 0
        info = nl.parse_link(lo.messages[0][1])
        assert info.name == "lo" and info.up and info.index == 1
        assert nl.link_info(rt, "pcnope0") is None and not nl.delete_link(rt, "pcnope0")
        assert nl.inspect_pod(rt, "lo").link is not None
    with pytest.raises(nl.NetnsError):
        nl.Rtnl.at("/var/run/netns/pcnope-missing")
    with pytest.raises(nl.NetnsError):
        nl.Rtnl.at("/proc/self/status")  # not a netns: setns refuses it
    assert os.stat("/proc/thread-self/ns/net").st_ino == here


def test_restore_prunes_stale_map_entries_and_leaked_addresses(node: Node) -> None:
    leaked = node.ipam.allocate("leaked/eth0")
    with PinnedMap(ENDPOINTS, node.pin_root) as m:
        m.update(EndpointKey(ip_to_be32("10.79.0.250")), EndpointInfo(ifindex=999, lxc_id=999))
    node.restart()
    assert node.ipam.owner_of(leaked) is None
    assert _entry(node, "10.79.0.250") is None


TRIVIAL_TC = """
#include <uapi/linux/pkt_cls.h>
int from_container(struct __sk_buff *skb) { return TC_ACT_OK; }
int to_container(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


def test_tc_program_attacher_with_real_programs(pin_root: str) -> None:
    prog = loader.compile_program("trivial_lxc", loader.NodeDefines(pin_root), source=TRIVIAL_TC)
    try:
        attacher = TcProgramAttacher(prog.fd("from_container"), prog.fd("to_container"))
        n = Node(pod_cidr="10.79.3.0/24", datapath=attacher)
        try:
            a, b = _add(n), _add(n)
            with n.inside():
                assert attacher.attached(a.host_ifname) and attacher.attached(b.host_ifname)
                loader.detach_tc(a.host_ifname, None)
                assert not attacher.attached(a.host_ifname)
            assert ping(n.name, a.ipv4)
            n.restart()
            with n.inside():
                assert attacher.attached(a.host_ifname)
                n.manager.check(a.container_id)
        finally:
            n.close()
    finally:
        prog.close()


def test_tc_program_attacher_errors(node: Node) -> None:
    ep = _add(node)
    bad = TcProgramAttacher(1 << 20, 1 << 20)  # not an open fd: the kernel says EBADF
    with node.inside():
        with pytest.raises(
            loader.DatapathError, match=f"cannot attach from-container to {ep.host_ifname} ingress"
        ):
            bad.attach(ep.host_ifname)
        with pytest.raises(loader.DatapathError, match="no such network device"):
            bad.attach("pcnope0")
        assert not bad.attached(ep.host_ifname) and not bad.attached("pcnope0")
        bad.detach(ep.host_ifname)  # the qdisc the failed attach left
        bad.detach(ep.host_ifname)  # nothing attached: fine
        bad.detach("pcnope0")  # no device: fine
        node.manager.delete(ep.container_id)


def test_bpf_lxc_datapath(pin_root: str) -> None:
    """With the real lxc programs attached: pod-to-pod (redirect by the endpoints map) and host-to-pod."""
    prog = loader.compile_program("bpf_lxc", loader.NodeDefines(pin_root, loader.sizes_from_config(None)))
    fds = prog.fd("from_container"), prog.fd("to_container")
    try:
        attacher = TcProgramAttacher(*fds)
        n = Node(pod_cidr="10.79.4.0/24", datapath=attacher, pin_root=pin_root)
        try:
            a, b = _add(n), _add(n)
            with n.inside():
                assert attacher.attached(a.host_ifname)
            assert ping(n.name, a.ipv4)
            assert ping(a.netns.rsplit("/", 1)[-1], b.ipv4)
        finally:
            n.close()
    finally:
        prog.close()


def test_only_a_visibly_missing_netns_counts_as_gone(tmp_path: Path) -> None:
    from pycilium.agent.endpoint.manager import _netns_gone

    (tmp_path / "present").touch()
    assert _netns_gone(str(tmp_path / "deleted"))  # its directory is visible, the pin is not
    assert not _netns_gone(str(tmp_path / "present"))
    assert not _netns_gone(str(tmp_path / "unmounted-dir" / "cni-1"))  # not visible: proves nothing
    assert not _netns_gone("/proc/999999999/ns/net")  # another PID namespace proves nothing
    assert not _netns_gone("")
