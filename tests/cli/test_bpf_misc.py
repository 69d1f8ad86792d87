"""`bpf endpoint list`, `bpf metrics list`, `bpf prefilter list|update|delete` against real pinned maps."""

from __future__ import annotations

import json

import pytest
from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import EndpointInfo, EndpointKey
from pycilium.bpf.maps.ipcache import IpcacheKey
from pycilium.bpf.maps.metricsmap import MetricsKey, MetricsValue
from pycilium.bpf.maps.util import ip_to_be32, mac_bytes

from tests.cli.conftest import cli, cli_subprocess

pytestmark = pytest.mark.kernel


def _mac(s: str) -> object:
    import ctypes

    return (ctypes.c_uint8 * 6)(*mac_bytes(s))


def test_endpoint_list(maps: str) -> None:
    with PinnedMap(BY_NAME["endpoints"], maps) as m:
        m.update(EndpointKey(ip_to_be32("10.0.1.5")),
                 EndpointInfo(ifindex=29, lxc_id=339, flags=d("EP_F_POLICY_INGRESS") | d("EP_F_POLICY_EGRESS"),
                              mac=_mac("0a:58:0a:00:01:05"), node_mac=_mac("ee:ee:ee:00:00:01"), sec_id=12345))  # fmt: skip
        m.update(EndpointKey(ip_to_be32("10.0.0.1")), EndpointInfo(lxc_id=12, flags=d("EP_F_HOST"), sec_id=1))
    r = cli("--bpf-root", maps, "bpf", "endpoint", "list")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split("   ")[0] == "IP ADDRESS" and "LOCAL ENDPOINT INFO" in lines[0]
    assert lines[1].split(None, 1) == [
        "10.0.0.1:0", "id=12    sec_id=1     flags=0x0001 ifindex=0   mac=00:00:00:00:00:00 nodemac=00:00:00:00:00:00 [ Host ]"]  # fmt: skip
    assert lines[2].split(None, 1) == [
        "10.0.1.5:0",
        "id=339   sec_id=12345 flags=0x0006 ifindex=29  mac=0a:58:0a:00:01:05 nodemac=ee:ee:ee:00:00:01 "
        "[ PolicyIngress PolicyEgress ]",
    ]
    j = json.loads(cli("--bpf-root", maps, "bpf", "endpoint", "list", "-o", "json").out)
    assert j[1] == {"ip": "10.0.1.5", "id": 339, "identity": 12345, "ifindex": 29, "flags": 6,
                    "flag_names": ["PolicyIngress", "PolicyEgress"], "mac": "0a:58:0a:00:01:05",
                    "node_mac": "ee:ee:ee:00:00:01"}  # fmt: skip


def test_endpoint_empty_and_subprocess(maps: str) -> None:
    r = cli_subprocess("--bpf-root", maps, "bpf", "endpoint", "list")
    assert r.code == 0 and r.out.strip() == "No entries found."
    r = cli_subprocess("--bpf-root", maps + "-x", "bpf", "endpoint", "list", "-o", "json")
    assert r.code == 2 and "map endpoints is not pinned" in r.err and r.out == ""


def test_metrics_sums_cpus(maps: str) -> None:
    ncpu = sc.possible_cpus()
    with PinnedMap(BY_NAME["metrics"], maps) as m:
        m.update(MetricsKey(d("DROP_PREFILTER"), d("METRIC_DIR_INGRESS")), MetricsValue(2, 84))  # every CPU
        m.update(MetricsKey(0, d("METRIC_DIR_EGRESS")), MetricsValue(10, 1000))
    r = cli("--bpf-root", maps, "bpf", "metrics", "list")
    assert r.code == 0
    rows = [[c.strip() for c in line.split("   ") if c.strip()] for line in r.out.splitlines()]
    assert rows == [
        ["REASON", "DIRECTION", "PACKETS", "BYTES"],
        ["Forwarded", "EGRESS", str(10 * ncpu), str(1000 * ncpu)],
        ["CIDR prefilter denied", "INGRESS", str(2 * ncpu), str(84 * ncpu)],
    ]
    j = json.loads(cli("--bpf-root", maps, "bpf", "metrics", "list", "-o", "json").out)
    assert j[1] == {"reason": 220, "reason_text": "CIDR prefilter denied", "direction": "INGRESS",
                    "packets": 2 * ncpu, "bytes": 84 * ncpu}  # fmt: skip
    r = cli_subprocess("--bpf-root", maps, "bpf", "metrics", "list")
    assert r.code == 0 and "CIDR prefilter denied" in r.out


def test_metrics_empty(maps: str) -> None:
    assert cli("--bpf-root", maps, "bpf", "metrics", "list").out.strip() == "No entries found."


def test_prefilter_update_list_delete(maps: str) -> None:
    r = cli_subprocess("--bpf-root", maps, "bpf", "prefilter", "update", "10.1.2.3/16", "192.0.2.7/32")
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["Added 10.1.0.0/16", "Added 192.0.2.7/32"]
    with PinnedMap(BY_NAME["prefilter_v4"], maps) as m:  # the key the XDP program looks up
        assert m.lookup(IpcacheKey(32, ip_to_be32("10.1.200.9"))) is not None
    r = cli("--bpf-root", maps, "bpf", "prefilter", "list")
    assert r.out.split() == ["CIDR", "10.1.0.0/16", "192.0.2.7/32"]
    assert json.loads(cli("--bpf-root", maps, "bpf", "prefilter", "list", "-o", "json").out) == [
        "10.1.0.0/16", "192.0.2.7/32"]  # fmt: skip
    r = cli("--bpf-root", maps, "bpf", "prefilter", "delete", "10.1.0.0/16", "10.9.0.0/16")
    assert r.code == 1
    assert r.out.splitlines() == ["Deleted 10.1.0.0/16", "10.9.0.0/16 is not in the prefilter"]
    r = cli("--bpf-root", maps, "bpf", "prefilter", "delete", "192.0.2.7")
    assert r.code == 0
    assert cli("--bpf-root", maps, "bpf", "prefilter", "list").out.strip() == "No entries found."


def test_prefilter_malformed(maps: str) -> None:
    r = cli("--bpf-root", maps, "bpf", "prefilter", "update", "10.1.2.300/8")
    assert r.code == 2 and "not an IPv4 CIDR: '10.1.2.300/8'" in r.err
    r = cli("--bpf-root", maps, "bpf", "prefilter", "update")
    assert r.code == 2 and "required: CIDR" in r.err
