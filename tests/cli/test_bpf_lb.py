"""`bpf lb list [--revnat|--frontends|--backends]` against real pinned load-balancer maps."""

from __future__ import annotations

import json

import pytest
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.lbmap import (
    Lb4Backend,
    Lb4BackendKey,
    Lb4Key,
    Lb4ReverseNat,
    Lb4ReverseNatKey,
    Lb4Service,
)
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16

from tests.cli.conftest import cli, cli_subprocess

pytestmark = pytest.mark.kernel

TCP, UDP = 6, 17


def fill_lb(root: str) -> None:
    """Written the way the agent writes a service: backends, slots, reverse NAT, then the frontend."""
    with PinnedMap(BY_NAME["lb4_backends"], root) as b:
        b.update(
            Lb4BackendKey(1), Lb4Backend(ip_to_be32("10.0.0.93"), port_to_be16(53), UDP, d("BE_STATE_ACTIVE"))
        )
        b.update(Lb4BackendKey(2), Lb4Backend(ip_to_be32("10.0.1.7"), port_to_be16(8080), TCP, d("BE_STATE_ACTIVE"),
                                              ip_to_be32("192.168.1.11")))  # fmt: skip
        b.update(Lb4BackendKey(3), Lb4Backend(ip_to_be32("10.0.1.8"), port_to_be16(8080), TCP,
                                              d("BE_STATE_TERMINATING")))  # fmt: skip
    with PinnedMap(BY_NAME["lb4_services"], root) as s:
        dns = ip_to_be32("10.96.0.10")
        s.update(Lb4Key(dns, port_to_be16(53), 1, UDP, 0), Lb4Service(backend_id=1, rev_nat_index=5))
        web = ip_to_be32("10.96.0.20")
        s.update(Lb4Key(web, port_to_be16(80), 1, TCP, 0), Lb4Service(backend_id=2))
        s.update(Lb4Key(web, port_to_be16(80), 2, TCP, 0), Lb4Service(backend_id=3))
        s.update(Lb4Key(0, port_to_be16(30080), 1, TCP, 0), Lb4Service(backend_id=2, rev_nat_index=7))
        s.update(Lb4Key(0, port_to_be16(30080), 2, TCP, 0), Lb4Service(backend_id=99, rev_nat_index=7))
        s.update(Lb4Key(dns, port_to_be16(53), 0, UDP, 0),
                 Lb4Service(count=1, rev_nat_index=5, flags=d("SVC_FLAG_CLUSTERIP")))  # fmt: skip
        s.update(Lb4Key(web, port_to_be16(80), 0, TCP, 0),
                 Lb4Service(backend_id=10800, count=2, rev_nat_index=6, local_count=1,
                            flags=d("SVC_FLAG_CLUSTERIP") | d("SVC_FLAG_AFFINITY")))  # fmt: skip
        s.update(Lb4Key(0, port_to_be16(30080), 0, TCP, 0),
                 Lb4Service(count=2, rev_nat_index=7,
                            flags=d("SVC_FLAG_NODEPORT") | d("SVC_FLAG_ROUTABLE") | d("SVC_FLAG_EXT_LOCAL_SCOPE")))  # fmt: skip
    with PinnedMap(BY_NAME["lb4_reverse_nat"], root) as r:
        r.update(Lb4ReverseNatKey(5), Lb4ReverseNat(ip_to_be32("10.96.0.10"), port_to_be16(53)))
        r.update(Lb4ReverseNatKey(6), Lb4ReverseNat(ip_to_be32("10.96.0.20"), port_to_be16(80)))


def test_lb_list_cilium_table(maps: str) -> None:
    fill_lb(maps)
    r = cli("--bpf-root", maps, "bpf", "lb", "list")
    assert r.code == 0, r.err
    rows = [line.split("   ") for line in r.out.splitlines()]
    rows = [[c.strip() for c in row if c.strip()] for row in rows]
    assert rows[0] == ["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]
    assert rows[1:] == [
        ["0.0.0.0:30080/TCP (0)", "0.0.0.0:0 (7) (0) [NodePort, Local]"],
        ["0.0.0.0:30080/TCP (1)", "10.0.1.7:8080/TCP (7) (1)"],
        ["0.0.0.0:30080/TCP (2)", "<backend 99 missing> (7) (2)"],
        ["10.96.0.10:53/UDP (0)", "0.0.0.0:0 (5) (0) [ClusterIP, non-routable]"],
        ["10.96.0.10:53/UDP (1)", "10.0.0.93:53/UDP (5) (1)"],
        ["10.96.0.20:80/TCP (0)", "0.0.0.0:0 (6) (0) [ClusterIP, sessionAffinity, non-routable]"],
        ["10.96.0.20:80/TCP (1)", "10.0.1.7:8080/TCP (6) (1)"],  # slot revnat from the frontend
        ["10.96.0.20:80/TCP (2)", "10.0.1.8:8080/TCP (6) (2) [terminating]"],
    ]
    # columns are aligned
    lines = r.out.splitlines()
    assert (
        len({line.index("BACKEND") if "BACKEND" in line else line.index("0.0.0.0:0") for line in lines[:2]})
        == 1
    )


def test_lb_list_json(maps: str) -> None:
    fill_lb(maps)
    r = cli("--bpf-root", maps, "bpf", "lb", "list", "-o", "json")
    services = json.loads(r.out)
    assert [(s["address"], s["port"], s["proto"]) for s in services] == [
        ("0.0.0.0", 30080, "TCP"), ("10.96.0.10", 53, "UDP"), ("10.96.0.20", 80, "TCP")]  # fmt: skip
    web = services[2]
    assert web["rev_nat"] == 6 and web["count"] == 2 and web["local_count"] == 1
    assert web["affinity_timeout"] == 10800
    assert web["flag_names"] == ["ClusterIP", "sessionAffinity", "non-routable"]
    assert web["backends"] == [
        {"slot": 1, "backend_id": 2, "address": "10.0.1.7", "port": 8080, "proto": "TCP", "state": "active",
         "node_ip": "192.168.1.11"},
        {"slot": 2, "backend_id": 3, "address": "10.0.1.8", "port": 8080, "proto": "TCP", "state": "terminating",
         "node_ip": ""},
    ]  # fmt: skip
    assert services[0]["backends"][1] == {"slot": 2, "backend_id": 99, "missing": True}


def test_lb_list_revnat_frontends_backends(maps: str) -> None:
    fill_lb(maps)
    r = cli("--bpf-root", maps, "bpf", "lb", "list", "--revnat")
    assert r.out.splitlines()[0].split() == ["ID", "FRONTEND", "ADDRESS"]
    assert [line.split() for line in r.out.splitlines()[1:]] == [
        ["5", "10.96.0.10:53"],
        ["6", "10.96.0.20:80"],
    ]
    r = cli("--bpf-root", maps, "bpf", "lb", "list", "--backends")
    assert [line.split() for line in r.out.splitlines()[1:]] == [
        ["1", "UDP://10.0.0.93:53", "active"],
        ["2", "TCP://10.0.1.7:8080", "active", "192.168.1.11"],
        ["3", "TCP://10.0.1.8:8080", "terminating"],
    ]
    r = cli("--bpf-root", maps, "bpf", "lb", "list", "--frontends")
    lines = r.out.splitlines()
    assert lines[0].split()[:2] == ["SERVICE", "ADDRESS"]
    assert len(lines) == 4
    assert "0.0.0.0:30080/TCP" in lines[1] and "[NodePort, Local]" in lines[1]
    j = json.loads(cli("--bpf-root", maps, "bpf", "lb", "list", "--revnat", "-o", "json").out)
    assert j == [
        {"id": 5, "address": "10.96.0.10", "port": 53},
        {"id": 6, "address": "10.96.0.20", "port": 80},
    ]
    j = json.loads(cli("--bpf-root", maps, "bpf", "lb", "list", "--backends", "-o", "json").out)
    assert [b["backend_id"] for b in j] == [1, 2, 3]


def test_lb_empty_subprocess_and_errors(maps: str) -> None:
    r = cli_subprocess("--bpf-root", maps, "bpf", "lb", "list")
    assert r.code == 0 and r.out.strip() == "No entries found."
    assert cli("--bpf-root", maps, "bpf", "lb", "list", "-o", "json").out.strip() == "[]"
    r = cli("--bpf-root", maps, "bpf", "lb", "list", "--revnat", "--backends")
    assert r.code == 2 and "not allowed with argument" in r.err
    r = cli("--bpf-root", maps + "-x", "bpf", "lb", "list")
    assert r.code == 2 and "map lb4_services is not pinned" in r.err
