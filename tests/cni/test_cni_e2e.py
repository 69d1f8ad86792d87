"""The real `pycilium-cni` binary driven like a container runtime, against the agent's CNI API on one node."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
from pycilium.agent.endpoint import GATEWAY_IP, ID_INIT, host_ifname
from pycilium.bpf.maps.endpointmap import ENDPOINTS, EndpointKey
from pycilium.bpf.maps.pinned import PinnedMap
from pycilium.bpf.maps.util import ip_to_be32, mac_str
from pycilium.cni import protocol as p
from pycilium.lab.netns import ifindex, run

from tests.cni.helpers import Node, ip_json, new_container_id, ping

pytestmark = pytest.mark.kernel


def _map_entry(node: Node, ip: str):  # type: ignore[no-untyped-def]
    with PinnedMap(ENDPOINTS, node.pin_root) as m:
        return m.lookup(EndpointKey(ip_to_be32(ip)))


def _add(node: Node, version: str | None = None) -> tuple[str, str, dict]:  # type: ignore[type-arg]
    pod, cid = node.pod(), new_container_id()
    conf = dict(node.netconf, cniVersion=version) if version else None
    r = node.cni("ADD", cid, pod, conf=conf)
    assert r.rc == 0, r
    return pod, cid, r.json


def _ip(result: dict) -> str:  # type: ignore[type-arg]
    return str(result["ips"][0]["address"]).split("/")[0]


def test_add_builds_the_pod_network(node: Node) -> None:
    pod, cid, res = _add(node)
    host = host_ifname(cid)
    # the Result
    assert res["cniVersion"] == "1.1.0"
    assert [i["name"] for i in res["interfaces"]] == [host, "eth0"]
    assert res["interfaces"][1]["sandbox"] == f"/var/run/netns/{pod}"
    assert "sandbox" not in res["interfaces"][0]
    assert res["interfaces"][0]["mtu"] == res["interfaces"][1]["mtu"] == 1450
    ip = _ip(res)
    assert res["ips"] == [{"address": f"{ip}/32", "gateway": GATEWAY_IP, "interface": 1}]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": GATEWAY_IP}]
    # inside the pod
    (eth0,) = [link for link in ip_json(pod, "addr") if link["ifname"] == "eth0"]
    assert eth0["mtu"] == 1450 and "UP" in eth0["flags"]
    assert eth0["address"] == res["interfaces"][1]["mac"]
    assert [(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["family"] == "inet"] == [(ip, 32)]
    (default,) = ip_json(pod, "route", "show", "default")
    assert default["gateway"] == GATEWAY_IP and default["dev"] == "eth0" and "onlink" in default["flags"]
    (neigh,) = ip_json(pod, "neigh", "show", GATEWAY_IP)
    assert neigh["lladdr"] == res["interfaces"][0]["mac"] and "PERMANENT" in neigh["state"]
    # on the node
    (route,) = ip_json(node.name, "route", "show", f"{ip}/32")
    assert route["dev"] == host and route["scope"] == "link"
    (hostlink,) = ip_json(node.name, "link", "show", host)
    assert hostlink["mtu"] == 1450 and "UP" in hostlink["flags"]
    assert run(["sysctl", "-n", f"net.ipv4.conf.{host}.rp_filter"], netns=node.name).stdout.strip() == "0"
    assert run(["sysctl", "-n", f"net.ipv4.conf.{host}.forwarding"], netns=node.name).stdout.strip() == "1"
    # the endpoints map
    ep = node.manager.get_by_container(cid)
    assert ep is not None and ep.ipv4 == ip and ep.pod == f"default/{cid[:12]}"
    info = _map_entry(node, ip)
    assert info is not None
    assert info.ifindex == ifindex(host, node.name) == ep.host_ifindex
    assert info.lxc_id == ep.id and 1 <= ep.id <= 65535
    assert mac_str(bytes(info.mac)) == res["interfaces"][1]["mac"]
    assert mac_str(bytes(info.node_mac)) == res["interfaces"][0]["mac"]
    assert info.sec_id == ID_INIT and info.flags == 0
    # persisted state
    state = json.loads((Path(node.config.state_dir) / "endpoints" / f"{cid}.json").read_text())
    assert state["ipv4"] == ip and state["id"] == ep.id
    assert node.cni("DEL", cid, pod).rc == 0


def test_host_to_pod_and_pod_to_pod_ping(node: Node) -> None:
    pod_a, cid_a, res_a = _add(node)
    pod_b, cid_b, res_b = _add(node)
    a, b = _ip(res_a), _ip(res_b)
    assert ping(node.name, a) and ping(node.name, b)
    assert ping(pod_a, node.router_ip)
    assert ping(pod_a, b) and ping(pod_b, a)
    for pod, cid in ((pod_a, cid_a), (pod_b, cid_b)):
        assert node.cni("DEL", cid, pod).rc == 0
    assert not ping(node.name, a)


def test_check_ok_then_fails_when_the_interface_is_broken(node: Node) -> None:
    pod, cid, res = _add(node)
    conf = dict(node.netconf, prevResult=res)
    assert node.cni("CHECK", cid, pod, conf=conf).rc == 0
    run(["ip", "addr", "flush", "dev", "eth0"], netns=pod)
    r = node.cni("CHECK", cid, pod, conf=conf)
    assert r.rc != 0 and r.code == p.ERR_CHECK_FAILED, r
    assert f"lacks {_ip(res)}/32" in r.json["details"]
    # a prevResult that does not match the endpoint
    other = json.loads(json.dumps(res))
    other["ips"][0]["address"] = "10.99.99.99/32"
    run(["ip", "addr", "add", f"{_ip(res)}/32", "dev", "eth0"], netns=pod)
    r = node.cni("CHECK", cid, pod, conf=dict(node.netconf, prevResult=other))
    assert r.code == p.ERR_CHECK_FAILED and "prevResult" in r.json["msg"]
    # unknown container
    r = node.cni("CHECK", new_container_id(), pod)
    assert r.code == p.ERR_UNKNOWN_CONTAINER
    assert node.cni("DEL", cid, pod).rc == 0


def test_del_is_idempotent_and_survives_a_vanished_netns(node: Node) -> None:
    pod, cid, res = _add(node)
    ip = _ip(res)
    before = node.ipam.status().allocated
    assert node.cni("DEL", cid, pod).rc == 0
    assert node.cni("DEL", cid, pod).rc == 0
    assert node.ipam.status().allocated == before - 1
    # vanished netns: the runtime removed it before DEL
    pod, cid, res = _add(node)
    ip = _ip(res)
    run(["ip", "netns", "del", pod])
    r = node.cni("DEL", cid, pod)
    assert r.rc == 0 and r.stdout == "", r
    assert host_ifname(cid) not in node.node_links()
    assert node.ipam.owner_of(ip) is None and _map_entry(node, ip) is None
    assert node.manager.get_by_container(cid) is None
    # never-seen container, no netns at all
    r = node.cni("DEL", new_container_id(), None)
    assert r.rc == 0, r


def test_status_and_version(node: Node) -> None:
    assert node.cni("STATUS").rc == 0
    r = node.cni("VERSION", stdin=b'{"cniVersion": "0.4.0"}')
    assert r.rc == 0 and r.json == {"cniVersion": "0.4.0", "supportedVersions": list(p.SUPPORTED_VERSIONS)}


def test_gc_removes_attachments_that_are_not_valid(node: Node) -> None:
    pod_a, cid_a, res_a = _add(node)
    _pod_b, cid_b, res_b = _add(node)
    keep = [{"containerID": e.container_id, "ifname": e.ifname} for e in node.manager.list_endpoints()
            if e.container_id != cid_b]  # fmt: skip
    r = node.cni("GC", conf=dict(node.netconf, **{"cni.dev/valid-attachments": keep}))
    assert r.rc == 0 and r.stdout == "", r
    assert node.manager.get_by_container(cid_b) is None
    assert host_ifname(cid_b) not in node.node_links()
    assert node.ipam.owner_of(_ip(res_b)) is None and _map_entry(node, _ip(res_b)) is None
    assert node.manager.get_by_container(cid_a) is not None and ping(node.name, _ip(res_a))
    assert node.cni("DEL", cid_a, pod_a).rc == 0


def test_gc_releases_leaked_addresses(node: Node) -> None:
    leaked = node.ipam.allocate("deadbeef/eth0")
    r = node.cni("GC", conf=dict(node.netconf, **{"cni.dev/valid-attachments": []}))
    assert r.rc == 0, r
    assert node.ipam.owner_of(leaked) is None


def test_ten_concurrent_adds_get_distinct_addresses(node: Node) -> None:
    pods = [(node.pod(), new_container_id()) for _ in range(10)]
    results: dict[str, object] = {}

    def add(pod: str, cid: str) -> None:
        results[cid] = node.cni("ADD", cid, pod)

    threads = [threading.Thread(target=add, args=pc) for pc in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ips = []
    for _, cid in pods:
        r = results[cid]
        assert r.rc == 0, r  # type: ignore[attr-defined]
        ips.append(_ip(r.json))  # type: ignore[attr-defined]
    assert len(set(ips)) == 10
    assert len({node.manager.get_by_container(c).id for _, c in pods}) == 10  # type: ignore[union-attr]
    assert all(ping(pod, node.router_ip) for pod, _ in pods[:3])
    dels = [threading.Thread(target=lambda pc=pc: results.__setitem__(pc[1], node.cni("DEL", pc[1], pc[0])))
            for pc in pods]  # fmt: skip
    for t in dels:
        t.start()
    for t in dels:
        t.join()
    assert all(results[c].rc == 0 for _, c in pods)  # type: ignore[attr-defined]
    assert not [e for e in node.manager.list_endpoints() if e.container_id in {c for _, c in pods}]


def test_failed_add_is_rolled_back(node: Node, tmp_path: Path) -> None:
    links, alloc = set(node.node_links()), node.ipam.status().allocated
    files = set(os.listdir(Path(node.config.state_dir) / "endpoints"))
    not_a_netns = tmp_path / "netns-file"
    not_a_netns.write_text("")
    cid = new_container_id()
    r = node.cni("ADD", cid, str(not_a_netns))
    assert r.rc != 0 and r.code == p.ERR_NETNS, r
    assert "not a network namespace" in r.json["msg"]
    assert set(node.node_links()) == links
    assert node.ipam.status().allocated == alloc
    assert set(os.listdir(Path(node.config.state_dir) / "endpoints")) == files
    assert node.manager.get_by_container(cid) is None
    # the interface name is taken inside the pod netns: error 101, nothing left behind
    pod, cid1, _res = _add(node)
    cid2 = new_container_id()
    r = node.cni("ADD", cid2, pod)
    assert r.code == p.ERR_INTERFACE_EXISTS, r
    assert host_ifname(cid2) not in node.node_links()
    assert node.ipam.lookup(f"{cid2}/eth0") is None
    assert node.cni("DEL", cid1, pod).rc == 0
    # a netns that does not exist is rejected by the plugin, naming the variable
    r = node.cni("ADD", new_container_id(), "/var/run/netns/pcnope-missing")
    assert r.code == p.ERR_INVALID_ENV and "CNI_NETNS" in r.json["msg"]


def test_older_config_versions(node: Node) -> None:
    pod, cid, res = _add(node, "0.3.1")
    assert res["cniVersion"] == "0.3.1" and res["ips"][0]["version"] == "4"
    assert "mtu" not in res["interfaces"][1]
    r = node.cni("CHECK", cid, pod, conf=dict(node.netconf, cniVersion="0.3.1"))
    assert r.code == p.ERR_INCOMPATIBLE_VERSION
    assert node.cni("DEL", cid, pod, conf=dict(node.netconf, cniVersion="0.3.1")).rc == 0
    pod, cid, res = _add(node, "1.0.0")
    assert "version" not in res["ips"][0]
    assert node.cni("CHECK", cid, pod, conf=dict(node.netconf, cniVersion="1.0.0", prevResult=res)).rc == 0
    assert node.cni("DEL", cid, pod).rc == 0


def test_agent_down_add_says_try_again_and_del_is_queued(node: Node) -> None:
    pod, cid, res = _add(node)
    ip = _ip(res)
    node.stop()
    try:
        r = node.cni("ADD", new_container_id(), node.pod())
        assert r.rc != 0 and r.code == p.ERR_TRY_AGAIN_LATER, r
        r = node.cni("STATUS")
        assert r.code == p.ERR_UNAVAILABLE
        r = node.cni("DEL", cid, pod)
        assert r.rc == 0 and r.stdout == "", r
        queued = Path(node.config.state_dir) / "delete-queue" / f"{cid}.json"
        assert json.loads(queued.read_text())["containerID"] == cid
        log = Path(node.config.cni_log_file).read_text()
        assert "DEL queued" in log
    finally:
        node.start()
    assert not queued.exists()
    assert node.manager.get_by_container(cid) is None
    assert node.ipam.owner_of(ip) is None and _map_entry(node, ip) is None
    assert host_ifname(cid) not in node.node_links()


def test_restart_restores_endpoints_and_never_reuses_addresses(node: Node) -> None:
    pod_a, cid_a, res_a = _add(node)
    pod_b, cid_b, res_b = _add(node)
    a, b = _ip(res_a), _ip(res_b)
    ep_a = node.manager.get_by_container(cid_a)
    node.stop()
    with PinnedMap(ENDPOINTS, node.pin_root) as m:  # the restart must rewrite it
        m.delete(EndpointKey(ip_to_be32(a)))
    run(["ip", "netns", "del", pod_b])  # pod b goes away while the agent is down
    node.start()
    got = node.manager.get_by_container(cid_a)
    assert got is not None and got.id == ep_a.id and got.ipv4 == a  # type: ignore[union-attr]
    assert _map_entry(node, a) is not None and _map_entry(node, a).lxc_id == ep_a.id  # type: ignore[union-attr]
    assert node.manager.get_by_container(cid_b) is None and node.ipam.owner_of(b) is None
    assert not (Path(node.config.state_dir) / "endpoints" / f"{cid_b}.json").exists()
    assert ping(node.name, a)
    # the restarted IPAM knows a is taken: a new pod gets another address
    pod_c, cid_c, res_c = _add(node)
    assert _ip(res_c) != a
    assert node.manager.get_by_container(cid_c).id != ep_a.id  # type: ignore[union-attr]
    for pod, cid in ((pod_a, cid_a), (pod_c, cid_c)):
        assert node.cni("DEL", cid, pod).rc == 0


def test_debug_endpoints_over_the_socket(node: Node) -> None:
    pod, cid, _res = _add(node)
    status, body = p.call_agent(node.config.cni_socket_path, "GET", "/v1/cni/endpoints", None)
    assert status == 200 and cid in [e["container_id"] for e in body]
    status, body = p.call_agent(node.config.cni_socket_path, "GET", "/v1/cni/ipam", None)
    assert status == 200 and body["summary"].startswith("IPv4: ") and body["cidr"] == node.pod_cidr
    assert node.cni("DEL", cid, pod).rc == 0


def test_socket_is_private(node: Node) -> None:
    st = os.stat(node.config.cni_socket_path)
    assert st.st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(node.config.cni_socket_path)).st_mode & 0o777 == 0o700


def test_ipam_exhaustion_is_a_clear_cni_error() -> None:
    small = Node(pod_cidr="10.78.0.0/29")  # 6 usable: router + 5 pods
    try:
        for _ in range(5):
            _add(small)
        r = small.cni("ADD", new_container_id(), small.pod())
        assert r.rc != 0 and r.code == p.ERR_IPAM_EXHAUSTED, r
        assert r.json["msg"] == "IPAM: range 10.78.0.0/29 is full (6/6 allocated)"
        assert small.ipam.status().allocated == 6
        r = small.cni("STATUS")
        assert r.code == p.ERR_UNAVAILABLE and "full" in r.json["msg"]
        assert len(small.manager.list_endpoints()) == 5
    finally:
        small.close()


def test_console_script_entry_point_works_too(node: Node) -> None:
    script = Path(sys.executable).parent / "pycilium-cni"  # pycilium-cni = pycilium.cni.main:main
    assert script.exists(), "the pycilium package is not installed in this interpreter's environment"
    pod, cid = node.pod(), new_container_id()
    r = node.cni("ADD", cid, pod, binary=str(script))
    assert r.rc == 0 and r.json["ips"][0]["interface"] == 1, r
    assert node.cni("DEL", cid, pod, binary=str(script)).rc == 0
