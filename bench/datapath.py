"""Datapath benchmark: the BPF service path against direct pod-to-pod and against an iptables
kube-proxy-style rule set of the same size, all measured in one run on this machine.

1. Per-packet cost (BPF_PROG_TEST_RUN, 1,000,000 repeats each): from_container for a packet of an
   established VIP flow, to_container for its reply, and a minimal program that parses Ethernet/IPv4
   and does one hash lookup.
2. Connection rate (new TCP connections per second, one client, the lab's pod server) in the
   one-node lab: (a) pod to pod directly, to the three backend pods in turn; (b) pod to a VIP through the programs with 1,000 and
   10,000 services in the maps; (c) with the programs detached, pod to a VIP through
   KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* (statistic random DNAT, iptables-legacy) with 1,000 and
   10,000 services. Each VIP figure is measured interleaved with its direct pod-to-pod baseline in
   short alternating rounds (bench/connrate.py) and reported as the median per-round ratio.

Results are ratios against the baselines of the same run; absolute figures vary with the machine.
Run as root: `python -m bench.datapath [--rounds 15] [--round-seconds 1] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from pycilium.agent.config import AgentConfig
from pycilium.bpf import loader, progtest
from pycilium.bpf.node_defines import node_defines
from pycilium.lab import netns
from pycilium.lab.mapwriter import Maps
from pycilium.lab.singlenode import CLUSTER_CIDR, NODE_IP, POD_CIDR, SERVER_PORT, SingleNode
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

MINIMAL_SRC = r"""
#include "common.h"
int minimal(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = (void *)(eth + 1);
	struct endpoint_key k = {};
	if ((void *)(ip4 + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	k.ip = ip4->daddr;
	return map_lookup(endpoints, &k) ? TC_ACT_OK : TC_ACT_SHOT;
}
"""


def vip(i: int) -> str:
    return f"10.96.{(i >> 8) & 0xFF}.{i & 0xFF}" if i < 65536 else "10.97.0.1"


def per_packet(repeat: int) -> dict[str, float]:
    root = "/sys/fs/bpf/pyc-bench-pkt"
    loader.remove_pin_root(root)
    cfg = AgentConfig.model_validate({"cluster-pool-ipv4-cidr": CLUSTER_CIDR})
    defines = node_defines(cfg, pin_root=root, node_ip=NODE_IP, pod_cidr=POD_CIDR)
    lxc = loader.compile_program("bpf_lxc", defines)
    mini = loader.compile_program("minimal", defines, source=MINIMAL_SRC)
    try:
        maps = Maps(root)
        cmac, hmac = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
        maps.endpoint("10.210.1.10", 10, 10, cmac, hmac, 1000)
        maps.service("10.96.0.10", 80, "tcp", [("10.210.2.11", 8080), ("10.210.2.12", 8080)], rev_nat=1)
        syn = bytes(
            Ether(src=cmac, dst=hmac) / IP(src="10.210.1.10", dst="10.96.0.10") / TCP(sport=40000, dport=80)
        )
        r = progtest.run_tc(lxc.fd("from_container"), syn, ingress_ifindex=10)
        be = Ether(r.data)[IP].dst
        est = bytes(Ether(src=cmac, dst=hmac) / IP(src="10.210.1.10", dst="10.96.0.10")
                    / TCP(sport=40000, dport=80, flags="A") / (b"x" * 64))  # fmt: skip
        reply = bytes(Ether(src="02:00:00:00:00:99", dst=cmac) / IP(src=be, dst="10.210.1.10")
                      / TCP(sport=8080, dport=40000, flags="A") / (b"y" * 64))  # fmt: skip
        out: dict[str, float] = {}
        for name, fd, pkt, ifx in (("established_vip_from_container", lxc.fd("from_container"), est, 10),
                                    ("reply_to_container", lxc.fd("to_container"), reply, 0),
                                    ("minimal_parse_one_lookup", mini.fd("minimal"), est, 0)):  # fmt: skip
            samples = [
                progtest.run_tc(fd, pkt, ingress_ifindex=ifx, repeat=repeat).duration_ns for _ in range(3)
            ]
            out[name] = float(statistics.median(samples))
        return out
    finally:
        lxc.close()
        mini.close()
        loader.remove_pin_root(root)


def compare(lab: SingleNode, base: str, other: str, a: argparse.Namespace) -> dict[str, Any]:
    """Connection rate to `base` (the backend pods directly, in turn) and `other` (a VIP over the
    same backends), interleaved in short rounds.

    The figure is the median of the per-round ratios other/base: each ratio compares two
    measurements taken seconds apart, so a shared machine's load drifting during the run cancels.
    """
    targets = [f"{base}:{SERVER_PORT}", f"{other}:80"]
    p = lab.exec_in("client", [sys.executable, "-m", "bench.connrate", "--round-seconds", str(a.round_seconds),
                               "--rounds", str(a.rounds), *targets],
                    timeout=2 * a.rounds * (a.round_seconds + 5) + 60)  # fmt: skip
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for t, e in zip(targets, res["errors"], strict=True):
        if e:
            print(f"  ({e} failed connections to {t})", file=sys.stderr)
    ratios = sorted(r[1] / r[0] for r in res["rates"] if r[0] > 0)
    return {
        "base_per_second": statistics.median(r[0] for r in res["rates"]),
        "per_second": statistics.median(r[1] for r in res["rates"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "errors": res["errors"],
    }


def fill_bpf_services(lab: SingleNode, n: int, backends: list[tuple[str, int]]) -> None:
    maps = Maps(lab.pin_root)
    for name in ("lb4_services", "lb4_backends", "lb4_reverse_nat", "lb_affinity_match"):
        with maps.m(name) as m:
            m.clear()
    for i in range(1, n + 1):
        maps.service(vip(i), 80, "tcp", backends, rev_nat=i, first_backend_id=i * 4)


def iptables_rules(n: int, backends: list[tuple[str, int]]) -> str:
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]"]
    body = []
    for i in range(1, n + 1):
        svc = f"KUBE-SVC-{i:012X}"
        lines.append(f":{svc} - [0:0]")
        body.append(f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m tcp --dport 80 -j {svc}")
        for j, (ip, port) in enumerate(backends):
            sep = f"KUBE-SEP-{i:08X}{j:04X}"
            lines.append(f":{sep} - [0:0]")
            left = len(backends) - j
            if left > 1:
                body.append(f"-A {svc} -m statistic --mode random --probability {1 / left:.11f} -j {sep}")
            else:
                body.append(f"-A {svc} -j {sep}")
            body.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{port}")
    return "\n".join([*lines, "-A PREROUTING -j KUBE-SERVICES", *body, "COMMIT", ""])


def detach_programs(lab: SingleNode) -> None:
    with netns.in_netns(lab.node_ns):
        for pod in lab.pods.values():
            loader.detach_tc(pod.lxc)
        loader.detach_tc("eth0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--json", default="")
    ap.add_argument("--per-packet-only", action="store_true", help="skip the connection-rate part")
    a = ap.parse_args(argv)
    report: dict[str, Any] = {"per_packet_ns": per_packet(a.repeat)}
    pp = report["per_packet_ns"]
    print("per-packet cost (BPF_PROG_TEST_RUN, ns/packet):")
    for k, v in pp.items():
        print(f"  {k:34s} {v:7.0f}  ({v / pp['minimal_parse_one_lookup']:.2f}x minimal)")
    if a.per_packet_only:
        return 0

    lab = SingleNode.up(pin_root="/sys/fs/bpf/pyc-bench-lab")
    try:
        backends = [(p.ip, SERVER_PORT) for p in lab.pods.values() if p.name != "client"]
        direct = ",".join(ip for ip, _ in backends)  # the same backends the VIPs spread over
        cmp: dict[str, dict[str, Any]] = {}
        for n in (1000, 10000):
            t0 = time.monotonic()
            fill_bpf_services(lab, n, backends)
            print(f"  ({n} services written in {time.monotonic() - t0:.1f} s)", file=sys.stderr)
            cmp[f"bpf_vip_{n}_services"] = compare(lab, direct, vip(n // 2), a)
        detach_programs(lab)
        for n in (1000, 10000):
            with tempfile.NamedTemporaryFile("w", suffix=".rules") as f:
                f.write(iptables_rules(n, backends))
                f.flush()
                t0 = time.monotonic()
                subprocess.run(
                    ["ip", "netns", "exec", lab.node_ns, "iptables-legacy-restore", f.name], check=True
                )
                report[f"iptables_restore_seconds_{n}"] = time.monotonic() - t0
            cmp[f"iptables_vip_{n}_services"] = compare(lab, direct, vip(n // 2), a)
        subprocess.run(
            ["ip", "netns", "exec", lab.node_ns, "iptables-legacy", "-t", "nat", "-F"], check=False
        )
    finally:
        lab.down()
    report["connection_rate"] = cmp
    print(f"connection rate (new TCP connections/s, one client; {a.rounds} interleaved rounds of "
          f"{a.round_seconds:g} s; ratio = median of per-round VIP/direct ratios [min-max]):")  # fmt: skip
    for k, c in cmp.items():
        base = "pod -> pod through the programs" if k.startswith("bpf") else "pod -> pod, no programs"
        print(f"  {k:28s} {c['per_second']:8.0f}/s vs {c['base_per_second']:8.0f}/s ({base}): "
              f"{c['ratio_median']:.3f}x [{c['ratio_min']:.2f}-{c['ratio_max']:.2f}]")  # fmt: skip
    for n in (1000, 10000):
        b, i = cmp[f"bpf_vip_{n}_services"], cmp[f"iptables_vip_{n}_services"]
        print(f"  BPF VIP vs iptables VIP at {n} services: {b['per_second'] / i['per_second']:.2f}x;"
              f" iptables-restore took {report[f'iptables_restore_seconds_{n}']:.2f} s")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
