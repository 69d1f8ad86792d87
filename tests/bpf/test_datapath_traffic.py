"""Real packets through the lxc and host programs between network namespaces (no agent: the test
writes the maps). One node namespace with four pod namespaces and a world namespace on its
underlay; the pods run the lab's pod server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pycilium.bpf.maps.defines import d
from pycilium.lab import netns
from pycilium.lab.singlenode import NODE_IP, WORLD_IP, SingleNode

pytestmark = pytest.mark.kernel

VIP = "10.96.7.7"


@pytest.fixture(scope="module")
def node() -> Iterator[SingleNode]:
    lab = SingleNode.up(pin_root="/sys/fs/bpf/pyc-test-traffic")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def fresh(node: SingleNode) -> SingleNode:
    """Empty services, policy and conntrack for each test (endpoints and ipcache stay)."""
    for name in ("lb4_services", "lb4_backends", "lb4_reverse_nat", "lb_affinity_match", "lb4_affinity", "policy",
                 "ct4_global", "ct_any4_global", "snat_v4_external"):  # fmt: skip
        with node.maps.m(name) as m:
            m.clear()
    for p in node.pods.values():
        node.write_endpoint(p)
    return node


def _backends(node: SingleNode) -> list[tuple[str, int]]:
    return [(node.pods[n].ip, 8080) for n in ("be1", "be2", "be3")]


def test_pod_to_pod_direct(fresh: SingleNode) -> None:
    (r,) = fresh.probe("client", fresh.pods["be1"].ip, 8080)
    assert r["result"] == "ok" and r["reply"].startswith(f"be1 {fresh.pods['client'].ip}:")


def test_tcp_and_udp_through_a_vip_reach_every_backend(fresh: SingleNode) -> None:
    fresh.maps.service(VIP, 80, "tcp", _backends(fresh), rev_nat=1)
    fresh.maps.service(VIP, 53, "udp", _backends(fresh), rev_nat=2)
    tcp = fresh.probe("client", VIP, 80, count=24)
    assert all(r["result"] == "ok" for r in tcp), tcp
    assert {r["reply"].split()[0] for r in tcp} == {"be1", "be2", "be3"}
    assert all(r["reply"].split()[1].startswith(fresh.pods["client"].ip + ":") for r in tcp)
    udp = fresh.probe("client", VIP, 53, proto="udp", count=24)
    assert all(r["result"] == "ok" for r in udp), udp
    assert {r["reply"].split()[0] for r in udp} == {"be1", "be2", "be3"}


def test_session_affinity_keeps_one_backend(fresh: SingleNode) -> None:
    fresh.maps.service(
        VIP, 80, "tcp", _backends(fresh), rev_nat=3, flags=d("SVC_FLAG_AFFINITY"), affinity_timeout=60
    )
    got = {r["reply"].split()[0] for r in fresh.probe("client", VIP, 80, count=12)}
    assert len(got) == 1


def test_service_without_backends_is_refused_not_hung(fresh: SingleNode) -> None:
    fresh.maps.service(VIP, 80, "tcp", [], rev_nat=4)
    (r,) = fresh.probe("client", VIP, 80, timeout=5)
    assert r["result"] == "refused"  # answered with a reset (a drop would read "timeout")


def test_policy_deny_then_allow(fresh: SingleNode) -> None:
    be1 = fresh.pods["be1"]
    fresh.maps.endpoint(be1.ip, be1.ifindex, be1.lxc_id, netns.mac("eth0", be1.ns), netns.mac(be1.lxc, fresh.ns),
                        be1.identity, flags=d("EP_F_POLICY_INGRESS"))  # fmt: skip
    (r,) = fresh.probe("client", be1.ip, 8080, timeout=1)
    assert r["result"] == "timeout"
    fresh.maps.policy(be1.lxc_id, fresh.pods["client"].identity, egress=False, proto="tcp", port=8080)
    (r,) = fresh.probe("client", be1.ip, 8080)
    assert r["result"] == "ok"
    (r,) = fresh.probe("client", be1.ip, 8080, proto="udp", timeout=1)
    assert r["result"] == "timeout"  # only TCP/8080 is allowed


def test_masquerade_to_the_world(fresh: SingleNode) -> None:
    (r,) = fresh.probe("client", WORLD_IP, 8080)
    assert r["result"] == "ok"
    assert r["reply"].startswith(f"world {NODE_IP}:")  # the world sees the node, not the pod
    with fresh.maps.m("snat_v4_external") as m:
        entries = list(m.items())
    dirs = sorted(k.flags for k, _ in entries)
    assert dirs == [d("CT_DIR_OUT"), d("CT_DIR_IN")]


def test_nodeport_from_the_world_keeps_the_client_ip_for_local_backends(fresh: SingleNode) -> None:
    fresh.maps.service("0.0.0.0", 30080, "tcp", _backends(fresh), rev_nat=5, flags=d("SVC_FLAG_NODEPORT"))
    res = fresh.probe("world", NODE_IP, 30080, count=12)
    assert all(r["result"] == "ok" for r in res), res
    assert {r["reply"].split()[0] for r in res} <= {"be1", "be2", "be3"}
    assert all(r["reply"].split()[1].startswith(WORLD_IP + ":") for r in res)


def test_drops_are_counted_by_reason(fresh: SingleNode) -> None:
    be2 = fresh.pods["be2"]
    before = fresh.maps.metric(d("DROP_POLICY"), d("METRIC_DIR_INGRESS"))
    fresh.maps.endpoint(be2.ip, be2.ifindex, be2.lxc_id, netns.mac("eth0", be2.ns), netns.mac(be2.lxc, fresh.ns),
                        be2.identity, flags=d("EP_F_POLICY_INGRESS"))  # fmt: skip
    fresh.probe("client", be2.ip, 8080, proto="udp", timeout=0.5)
    assert fresh.maps.metric(d("DROP_POLICY"), d("METRIC_DIR_INGRESS")) > before


def test_nothing_uses_netfilter(fresh: SingleNode) -> None:
    fresh.maps.service(VIP, 80, "tcp", _backends(fresh), rev_nat=1)
    assert fresh.probe("client", VIP, 80)[0]["result"] == "ok"
    rules = netns.run(["iptables-save"], netns=fresh.ns, check=False).stdout
    assert "DNAT" not in rules and "MASQUERADE" not in rules
