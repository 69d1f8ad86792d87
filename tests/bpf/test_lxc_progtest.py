"""The lxc programs (from_container / to_container) through BPF_PROG_TEST_RUN: verdicts, rewritten
headers with valid checksums, and the conntrack / metrics entries they leave."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pycilium.bpf import loader, progtest
from pycilium.bpf.loader import remove_pin_root
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.util import be16_to_port, be32_to_ip, ip_to_be32
from pycilium.lab.mapwriter import Maps
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.l2 import Ether

from tests.bpf.lxcfix import (
    CLIENT,
    LOCAL,
    REMOTE_BACKENDS,
    VIP,
    VPORT,
    checksums_valid,
    clear_maps,
    icmp_echo,
    tcp,
    udp,
)

pytestmark = pytest.mark.kernel
OK, SHOT, REDIRECT = progtest.TC_ACT_OK, progtest.TC_ACT_SHOT, progtest.TC_ACT_REDIRECT
EGRESS, INGRESS, SERVICE = d("METRIC_DIR_EGRESS"), d("METRIC_DIR_INGRESS"), d("METRIC_DIR_SERVICE")


class Lxc:
    def __init__(self, root: str, prog: loader.LoadedProgram):
        self.maps = Maps(root)
        self.from_fd = prog.fd("from_container")
        self.to_fd = prog.fd("to_container")

    def out(self, pkt: bytes, ifindex: int = CLIENT["ifindex"]) -> progtest.RunResult:
        return progtest.run_tc(self.from_fd, pkt, ingress_ifindex=ifindex)

    def into(self, pkt: bytes) -> progtest.RunResult:
        return progtest.run_tc(self.to_fd, pkt)


@pytest.fixture(scope="module")
def compiled() -> Iterator[tuple[str, loader.LoadedProgram]]:
    root = "/sys/fs/bpf/pyc-test-lxc"
    remove_pin_root(root)
    prog = loader.compile_program("bpf_lxc", loader.NodeDefines(root, loader.sizes_from_config(None),
                                                                {"NODE_IP": ip_to_be32("192.168.50.1")}))  # fmt: skip
    try:
        yield root, prog
    finally:
        prog.close()
        remove_pin_root(root)


@pytest.fixture
def lxc(compiled: tuple[str, loader.LoadedProgram]) -> Lxc:
    root, prog = compiled
    clear_maps(root)
    x = Lxc(root, prog)
    x.maps.endpoint(**CLIENT)
    x.maps.endpoint(**LOCAL)
    return x


# ---- anti-spoofing ---------------------------------------------------------------------------------


def test_unknown_source_ip_is_dropped_and_counted(lxc: Lxc) -> None:
    r = lxc.out(tcp("10.200.1.99", "10.200.2.11", 1000, 80))
    assert r.verdict == SHOT
    assert lxc.maps.metric(d("DROP_INVALID_SIP"), EGRESS) == 1


def test_source_ip_of_another_endpoint_is_dropped(lxc: Lxc) -> None:
    r = lxc.out(tcp(LOCAL["ip"], "10.200.2.11", 1000, 80), ifindex=CLIENT["ifindex"])
    assert r.verdict == SHOT
    assert lxc.maps.metric(d("DROP_INVALID_SIP"), EGRESS) == 1


def test_spoofed_source_mac_is_dropped(lxc: Lxc) -> None:
    r = lxc.out(tcp(CLIENT["ip"], "10.200.2.11", 1000, 80, smac="02:de:ad:be:ef:00"))
    assert r.verdict == SHOT
    assert lxc.maps.metric(d("DROP_INVALID_SMAC"), EGRESS) == 1


def test_non_ipv4_passes_to_the_stack(lxc: Lxc) -> None:
    arp = bytes(Ether(src=CLIENT["mac"], dst="ff:ff:ff:ff:ff:ff", type=0x0806) / (b"\0" * 28))
    assert lxc.out(arp).verdict == OK


# ---- forwarding and conntrack ----------------------------------------------------------------------


def test_pod_to_local_pod_is_redirected_with_macs_rewritten(lxc: Lxc) -> None:
    pkt = tcp(CLIENT["ip"], LOCAL["ip"], 40000, 8080)
    r = lxc.out(pkt)
    assert r.verdict == REDIRECT
    out = Ether(r.data)
    assert out.dst == LOCAL["mac"] and out.src == LOCAL["node_mac"]
    assert bytes(out[IP]) == bytes(Ether(pkt)[IP])  # L3 untouched
    entries = lxc.maps.ct_entries()
    assert len(entries) == 1
    k, e = entries[0]
    assert (be32_to_ip(k.saddr), be32_to_ip(k.daddr), be16_to_port(k.sport), be16_to_port(k.dport)) == (
        CLIENT["ip"], LOCAL["ip"], 40000, 8080)  # fmt: skip
    assert k.flags == d("CT_DIR_OUT") and e.src_sec_id == CLIENT["sec_id"] and e.packets == 1


def test_pod_to_remote_goes_to_the_stack_unchanged(lxc: Lxc) -> None:
    pkt = udp(CLIENT["ip"], "10.200.2.50", 5000, 53)
    r = lxc.out(pkt)
    assert r.verdict == OK and r.data == pkt
    assert len(lxc.maps.ct_entries("ct_any4_global")) == 1


def test_tcp_lifetime_follows_the_handshake_and_close(lxc: Lxc) -> None:
    import time

    a, b = CLIENT["ip"], "10.200.2.50"
    lxc.out(tcp(a, b, 41000, 80, "S"))
    ((_, e),) = lxc.maps.ct_entries()
    now = int(time.monotonic())
    assert abs(e.lifetime - (now + 60)) <= 2 and not e.flags & d("CT_F_SEEN_NON_SYN")
    rep = tcp(b, a, 80, 41000, "SA", smac="02:00:00:00:00:99", dmac=CLIENT["mac"])
    assert lxc.into(rep).verdict == OK
    lxc.out(tcp(a, b, 41000, 80, "A"))
    ((_, e),) = lxc.maps.ct_entries()
    assert abs(e.lifetime - (now + 8000)) <= 2
    assert e.flags & d("CT_F_SEEN_NON_SYN") and e.tx_flags_seen == 0x12 and e.rx_flags_seen == 0x12
    lxc.out(tcp(a, b, 41000, 80, "FA"))
    lxc.into(tcp(b, a, 80, 41000, "FA", smac="02:00:00:00:00:99", dmac=CLIENT["mac"]))
    ((_, e),) = lxc.maps.ct_entries()
    closing = d("CT_F_RX_CLOSING") | d("CT_F_TX_CLOSING")
    assert e.flags & closing == closing and abs(e.lifetime - (now + 10)) <= 2
    assert e.packets == 5


def test_icmp_echo_reply_matches_the_request(lxc: Lxc) -> None:
    assert lxc.out(icmp_echo(CLIENT["ip"], "10.200.2.50", 77)).verdict == OK
    lxc.maps.ipcache("10.200.2.50/32", 3000)
    lxc.maps.endpoint(**{**CLIENT, "flags": d("EP_F_POLICY_INGRESS")})  # enforce ingress: replies still pass
    r = lxc.into(icmp_echo("10.200.2.50", CLIENT["ip"], 77, reply=True, smac="02:00:00:00:00:99"))
    assert r.verdict == OK
    ((_, e),) = lxc.maps.ct_entries("ct_any4_global")
    assert e.packets == 2


# ---- services ----------------------------------------------------------------------------------


def test_service_dnat_rewrites_destination_with_valid_checksums(lxc: Lxc) -> None:
    ids = lxc.maps.service(VIP, VPORT, "tcp", REMOTE_BACKENDS, rev_nat=5)
    r = lxc.out(tcp(CLIENT["ip"], VIP, 42000, VPORT, payload=b"GET /"))
    assert r.verdict == OK
    out = Ether(r.data)
    assert (out[IP].dst, out[TCP].dport) in REMOTE_BACKENDS
    assert out[IP].src == CLIENT["ip"] and out[TCP].sport == 42000
    assert checksums_valid(r.data)
    by_dir = {k.flags: (k, e) for k, e in lxc.maps.ct_entries()}
    svc_k, svc_e = by_dir[d("CT_DIR_SVC")]
    assert be32_to_ip(svc_k.daddr) == VIP and svc_e.backend_id in ids and svc_e.rev_nat_index == 5
    out_k, out_e = by_dir[d("CT_DIR_OUT")]
    assert be32_to_ip(out_k.daddr) == out[IP].dst and out_e.rev_nat_index == 5


def test_udp_service_and_reply_reverse_nat(lxc: Lxc) -> None:
    lxc.maps.service(VIP, 53, "udp", REMOTE_BACKENDS, rev_nat=6)
    r = lxc.out(udp(CLIENT["ip"], VIP, 33333, 53))
    assert r.verdict == OK and checksums_valid(r.data)
    be_ip, be_port = Ether(r.data)[IP].dst, Ether(r.data)[UDP].dport
    reply = udp(
        be_ip, CLIENT["ip"], be_port, 33333, smac="02:00:00:00:00:99", dmac=CLIENT["mac"], payload=b"ans"
    )
    r2 = lxc.into(reply)
    assert r2.verdict == OK
    back = Ether(r2.data)
    assert (back[IP].src, back[UDP].sport) == (VIP, 53)  # the client only ever sees the VIP
    assert back[IP].dst == CLIENT["ip"] and checksums_valid(r2.data)


def test_backends_are_spread_and_established_flows_keep_theirs(lxc: Lxc) -> None:
    lxc.maps.service(VIP, VPORT, "tcp", REMOTE_BACKENDS, rev_nat=5)
    seen = set()
    for sport in range(43000, 43060):
        seen.add(Ether(lxc.out(tcp(CLIENT["ip"], VIP, sport, VPORT)).data)[IP].dst)
    assert seen == {ip for ip, _ in REMOTE_BACKENDS}
    first = Ether(lxc.out(tcp(CLIENT["ip"], VIP, 44000, VPORT)).data)[IP].dst
    # rewrite the service with the backends in another order: the flow keeps its backend
    lxc.maps.service(VIP, VPORT, "tcp", list(reversed(REMOTE_BACKENDS)), rev_nat=5, first_backend_id=900)
    for _ in range(5):
        assert Ether(lxc.out(tcp(CLIENT["ip"], VIP, 44000, VPORT, "A")).data)[IP].dst == first


def test_terminating_backend_drains_but_gets_no_new_connections(lxc: Lxc) -> None:
    ids = lxc.maps.service(VIP, VPORT, "tcp", REMOTE_BACKENDS[:1], rev_nat=5)
    assert Ether(lxc.out(tcp(CLIENT["ip"], VIP, 45000, VPORT)).data)[IP].dst == REMOTE_BACKENDS[0][0]
    # backend 1 terminating, backend 2 active
    lxc.maps.service(VIP, VPORT, "tcp", REMOTE_BACKENDS[:2], rev_nat=5, terminating=frozenset({0}),
                     first_backend_id=ids[0] - 1)  # fmt: skip
    assert Ether(lxc.out(tcp(CLIENT["ip"], VIP, 45000, VPORT, "A")).data)[IP].dst == REMOTE_BACKENDS[0][0]
    assert Ether(lxc.out(tcp(CLIENT["ip"], VIP, 45001, VPORT)).data)[IP].dst == REMOTE_BACKENDS[1][0]


def test_session_affinity_sticks_across_source_ports(lxc: Lxc) -> None:
    lxc.maps.service(VIP, VPORT, "tcp", REMOTE_BACKENDS, rev_nat=7, flags=d("SVC_FLAG_AFFINITY"),
                     affinity_timeout=300)  # fmt: skip
    got = {Ether(lxc.out(tcp(CLIENT["ip"], VIP, sport, VPORT)).data)[IP].dst for sport in range(46000, 46030)}
    assert len(got) == 1


def test_service_without_backends_answers_icmp_port_unreachable(lxc: Lxc) -> None:
    lxc.maps.service(VIP, VPORT, "tcp", [], rev_nat=8)
    pkt = tcp(CLIENT["ip"], VIP, 47000, VPORT)
    r = lxc.out(pkt)
    assert r.verdict == REDIRECT
    ans = Ether(r.data)
    assert ans.dst == CLIENT["mac"]
    assert ans[IP].src == VIP and ans[IP].dst == CLIENT["ip"]
    assert ans[ICMP].type == 3 and ans[ICMP].code == 3
    assert ans[IPerror].src == CLIENT["ip"] and ans[IPerror].dst == VIP
    assert checksums_valid(r.data)
    assert lxc.maps.metric(d("DROP_NO_SERVICE"), SERVICE) == 1
    # the answer passes the pod's to_container on the way in
    assert lxc.into(r.data).verdict == OK


def test_hairpin_to_own_service_is_source_natted_and_reversed(lxc: Lxc) -> None:
    lxc.maps.service(VIP, VPORT, "tcp", [(CLIENT["ip"], 8080)], rev_nat=9)
    r = lxc.out(tcp(CLIENT["ip"], VIP, 48000, VPORT))
    assert r.verdict == REDIRECT
    req = Ether(r.data)
    assert (req[IP].src, req[IP].dst, req[TCP].dport) == ("169.254.42.1", CLIENT["ip"], 8080)
    assert checksums_valid(r.data) and lxc.into(r.data).verdict == OK
    rep = tcp(CLIENT["ip"], "169.254.42.1", 8080, 48000, "SA")
    r2 = lxc.out(rep)
    assert r2.verdict == REDIRECT
    back = Ether(r2.data)
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (VIP, VPORT, CLIENT["ip"], 48000)
    assert checksums_valid(r2.data)


def test_local_backend_is_reached_by_redirect(lxc: Lxc) -> None:
    lxc.maps.service(VIP, VPORT, "tcp", [(LOCAL["ip"], 8080)], rev_nat=10)
    r = lxc.out(tcp(CLIENT["ip"], VIP, 49000, VPORT))
    assert r.verdict == REDIRECT and Ether(r.data).dst == LOCAL["mac"]


# ---- policy ------------------------------------------------------------------------------------


def _enforce(lxc: Lxc, who: dict[str, object], flag: str) -> None:
    lxc.maps.endpoint(**{**who, "flags": d(flag)})  # type: ignore[arg-type]


def test_egress_enforced_without_rules_drops_new_connections(lxc: Lxc) -> None:
    _enforce(lxc, CLIENT, "EP_F_POLICY_EGRESS")
    r = lxc.out(tcp(CLIENT["ip"], "10.200.2.50", 50000, 80))
    assert r.verdict == SHOT
    assert lxc.maps.metric(d("DROP_POLICY"), EGRESS) == 1
    assert lxc.maps.ct_entries() == []


def test_egress_allow_by_identity_and_port(lxc: Lxc) -> None:
    _enforce(lxc, CLIENT, "EP_F_POLICY_EGRESS")
    lxc.maps.ipcache("10.200.2.0/24", 3000)
    lxc.maps.policy(CLIENT["lxc_id"], 3000, egress=True, proto="tcp", port=80)
    assert lxc.out(tcp(CLIENT["ip"], "10.200.2.50", 50001, 80)).verdict == OK
    assert lxc.out(tcp(CLIENT["ip"], "10.200.2.50", 50002, 81)).verdict == SHOT
    assert lxc.out(udp(CLIENT["ip"], "10.200.2.50", 50003, 80)).verdict == SHOT
    assert lxc.out(tcp(CLIENT["ip"], "10.200.3.50", 50004, 80)).verdict == SHOT  # world identity


def test_deny_beats_allow(lxc: Lxc) -> None:
    _enforce(lxc, CLIENT, "EP_F_POLICY_EGRESS")
    lxc.maps.ipcache("10.200.2.0/24", 3000)
    lxc.maps.policy(CLIENT["lxc_id"], 3000, egress=True, proto="tcp", port=80)
    lxc.maps.policy(CLIENT["lxc_id"], 0, egress=True, deny=True)
    r = lxc.out(tcp(CLIENT["ip"], "10.200.2.50", 50005, 80))
    assert r.verdict == SHOT and lxc.maps.metric(d("DROP_POLICY_DENY"), EGRESS) == 1


def test_ingress_policy_at_to_container_and_replies_pass(lxc: Lxc) -> None:
    _enforce(lxc, LOCAL, "EP_F_POLICY_INGRESS")
    lxc.maps.ipcache("10.200.2.0/24", 3000)
    lxc.maps.ipcache("10.200.3.0/24", 4000)
    lxc.maps.policy(LOCAL["lxc_id"], 3000, egress=False, proto="tcp", port=8080)
    ok = tcp("10.200.2.7", LOCAL["ip"], 51000, 8080, smac="02:00:00:00:00:99", dmac=LOCAL["mac"])
    bad = tcp("10.200.3.7", LOCAL["ip"], 51001, 8080, smac="02:00:00:00:00:99", dmac=LOCAL["mac"])
    assert lxc.into(ok).verdict == OK
    assert lxc.into(bad).verdict == SHOT
    assert lxc.maps.metric(d("DROP_POLICY"), INGRESS) == 1
    # the local pod's reply to the allowed connection passes its (unenforced) egress as a reply,
    # and a connection it opens itself to 10.200.3.7 gets a reply through ingress enforcement
    reply = tcp(LOCAL["ip"], "10.200.2.7", 8080, 51000, "SA", smac=LOCAL["mac"], dmac=LOCAL["node_mac"])
    assert progtest.run_tc(lxc.from_fd, reply, ingress_ifindex=LOCAL["ifindex"]).verdict == OK
    own = tcp(LOCAL["ip"], "10.200.3.7", 52000, 443, smac=LOCAL["mac"], dmac=LOCAL["node_mac"])
    assert progtest.run_tc(lxc.from_fd, own, ingress_ifindex=LOCAL["ifindex"]).verdict == OK
    back = tcp("10.200.3.7", LOCAL["ip"], 443, 52000, "SA", smac="02:00:00:00:00:99", dmac=LOCAL["mac"])
    assert lxc.into(back).verdict == OK


def test_policy_counters_count_allowed_packets(lxc: Lxc) -> None:
    _enforce(lxc, CLIENT, "EP_F_POLICY_EGRESS")
    lxc.maps.policy(CLIENT["lxc_id"], 0, egress=True)  # allow all egress (L3 wildcard)
    for sport in (53000, 53001):
        assert lxc.out(tcp(CLIENT["ip"], "10.200.2.50", sport, 80)).verdict == OK
    with lxc.maps.m("policy") as m:
        ((_, e),) = list(m.items())
    assert e.packets == 2


def test_reused_source_port_does_not_inherit_the_old_flows_reverse_nat(lxc: Lxc) -> None:
    """A connection through the VIP closes; a direct connection to the same backend reuses the
    client port (the kernel allows it: a different 4-tuple on the client). Its replies must not be
    rewritten to the VIP."""
    lxc.maps.service(VIP, VPORT, "tcp", REMOTE_BACKENDS[:1], rev_nat=11)
    be_ip, be_port = REMOTE_BACKENDS[0]
    peer = {"smac": "02:00:00:00:00:99", "dmac": CLIENT["mac"]}
    assert lxc.out(tcp(CLIENT["ip"], VIP, 54000, VPORT, "S")).verdict == OK
    lxc.into(tcp(be_ip, CLIENT["ip"], be_port, 54000, "SA", **peer))
    lxc.out(tcp(CLIENT["ip"], VIP, 54000, VPORT, "FA"))
    lxc.into(tcp(be_ip, CLIENT["ip"], be_port, 54000, "FA", **peer))
    # new direct connection on the same tuple
    assert lxc.out(tcp(CLIENT["ip"], be_ip, 54000, be_port, "S")).verdict == OK
    r = lxc.into(tcp(be_ip, CLIENT["ip"], be_port, 54000, "SA", **peer))
    assert Ether(r.data)[IP].src == be_ip and Ether(r.data)[TCP].sport == be_port
    out = {k.flags: e for k, e in lxc.maps.ct_entries()}[d("CT_DIR_OUT")]
    assert out.rev_nat_index == 0 and out.backend_id == 0
