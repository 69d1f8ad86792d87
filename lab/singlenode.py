"""A one-node datapath lab: a node namespace with pod namespaces and a world namespace, the real
BPF programs attached, and services written straight into the maps (no agent, no API server).

It is what `make lab` runs until the multi-node lab with agents is available, and the fixture of
the datapath traffic tests. `up` leaves everything running and records what it created in a state
file; `down` removes exactly that (namespaces, processes, pinned maps).

    python -m pycilium.lab.singlenode up | status | down
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pycilium.agent.config import AgentConfig
from pycilium.bpf import loader
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import EndpointInfo, EndpointKey
from pycilium.bpf.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.util import ip_to_be32, mac_bytes
from pycilium.bpf.node_defines import node_defines
from pycilium.lab import netns
from pycilium.lab.mapwriter import Maps

STATE_FILE = Path("/var/run/pycilium-lab/singlenode.json")
NODE_IP, WORLD_IP = "192.168.77.1", "192.168.77.100"
POD_CIDR, CLUSTER_CIDR = "10.210.1.0/24", "10.210.0.0/16"
DEFAULT_PODS = {"client": ("10.210.1.10", 1010), "be1": ("10.210.1.11", 2000), "be2": ("10.210.1.12", 2000),
                "be3": ("10.210.1.13", 2000)}  # fmt: skip
SERVER_PORT = 8080
DEMO_VIP = "10.96.7.7"


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    lxc: str
    ifindex: int
    lxc_id: int
    identity: int
    mac: str
    node_mac: str


@dataclass
class SingleNode:
    node_ns: str
    world_ns: str
    pin_root: str
    pods: dict[str, Pod] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)

    @property
    def maps(self) -> Maps:
        return Maps(self.pin_root)

    @property
    def ns(self) -> str:
        return self.node_ns

    # -- map helpers -------------------------------------------------------------------------------
    def write_endpoint(self, pod: Pod, flags: int = 0) -> None:
        info = EndpointInfo(ifindex=pod.ifindex, lxc_id=pod.lxc_id, flags=flags, sec_id=pod.identity)
        info.mac[:] = list(mac_bytes(pod.mac))
        info.node_mac[:] = list(mac_bytes(pod.node_mac))
        with PinnedMap(BY_NAME["endpoints"], self.pin_root) as m:
            m.update(EndpointKey(ip_to_be32(pod.ip)), info)

    def write_ipcache(self, cidr: str, identity: int) -> None:
        ip, _, plen = cidr.partition("/")
        with PinnedMap(BY_NAME["ipcache"], self.pin_root) as m:
            m.update(IpcacheKey(int(plen or 32), ip_to_be32(ip)), RemoteEndpointInfo(identity, 0))

    def exec_in(self, where: str, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        ns = {"node": self.node_ns, "world": self.world_ns}.get(where) or self.pods[where].ns
        return netns.run(cmd, netns=ns, check=False, timeout=timeout)

    def probe(self, frm: str, host: str, port: int, proto: str = "tcp", count: int = 1,
              timeout: float = 5.0) -> list[dict[str, str]]:  # fmt: skip
        p = self.exec_in(frm, [sys.executable, "-m", "pycilium.lab.probe", host, str(port), "--proto", proto,
                               "--count", str(count), "--timeout", str(timeout)])  # fmt: skip
        return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def up(cls, pin_root: str = "/sys/fs/bpf/pycilium-lab", pods: dict[str, tuple[str, int]] | None = None,
           trace: bool = False) -> SingleNode:  # fmt: skip
        """Create the namespaces, attach the programs, start the pod servers."""
        loader.remove_pin_root(pin_root)
        cfg = AgentConfig.model_validate({"cluster-pool-ipv4-cidr": CLUSTER_CIDR})
        defines = node_defines(cfg, pin_root=pin_root, node_ip=NODE_IP, pod_cidr=POD_CIDR, trace=trace)
        lxc = loader.compile_program("bpf_lxc", defines)
        host = loader.compile_program("bpf_host", defines)
        topo = netns.Topology()
        lab: SingleNode | None = None
        try:
            n = topo.add_netns(netns.unique("pycn"))
            w = topo.add_netns(netns.unique("pycw"))
            lab = cls(n, w, pin_root)
            topo.add_veth("eth0", "wld0", n, w)
            netns.ip("addr", "add", f"{NODE_IP}/24", "dev", "eth0", netns=n)
            netns.ip("addr", "add", f"{WORLD_IP}/24", "dev", "wld0", netns=w)
            netns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"], netns=n)
            for i, (name, (ip, ident)) in enumerate((pods or DEFAULT_PODS).items()):
                pns = topo.add_netns(netns.unique(f"pyc{name[:2]}"))
                host_if = f"lxc{name}"[:15]
                topo.add_veth(host_if, "eth0", n, pns)
                netns.run(["sysctl", "-qw", f"net.ipv4.conf.{host_if}.rp_filter=0"], netns=n)
                netns.ip("addr", "add", f"{ip}/32", "dev", "eth0", netns=pns)
                hmac = netns.mac(host_if, n)
                netns.ip("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link", netns=pns)
                netns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", netns=pns)
                netns.ip(
                    "neigh",
                    "add",
                    "169.254.1.1",
                    "lladdr",
                    hmac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                    netns=pns,
                )
                netns.ip("route", "add", f"{ip}/32", "dev", host_if, netns=n)
                pod = Pod(name, pns, ip, host_if, netns.ifindex(host_if, n), 100 + i, ident, netns.mac("eth0", pns),
                          hmac)  # fmt: skip
                lab.pods[name] = pod
                lab.write_endpoint(pod)
                lab.write_ipcache(f"{ip}/32", ident)
                with netns.in_netns(n):
                    loader.attach_tc(host_if, lxc.fd("from_container"), loader.TC_INGRESS, "from-container")
                    loader.attach_tc(host_if, lxc.fd("to_container"), loader.TC_EGRESS, "to-container")
                if name != "client":
                    lab._serve(pns, name)
            lab.write_ipcache(f"{NODE_IP}/32", d("ID_HOST"))
            with netns.in_netns(n):
                loader.attach_tc("eth0", host.fd("from_netdev"), loader.TC_INGRESS, "from-netdev")
                loader.attach_tc("eth0", host.fd("to_netdev"), loader.TC_EGRESS, "to-netdev")
            lab._serve(w, "world")
            for pod in lab.pods.values():
                if pod.name != "client":
                    _wait_listening(pod.ns, SERVER_PORT)
            _wait_listening(w, SERVER_PORT)
            return lab
        except BaseException:
            if lab is not None:
                lab.down()
            else:
                topo.close()
                loader.remove_pin_root(pin_root)
            raise
        finally:
            lxc.close()
            host.close()

    def _serve(self, ns: str, name: str) -> None:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pycilium.lab.podserver", "--name",
                              name, "--tcp", str(SERVER_PORT), "--udp", str(SERVER_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self.pids.append(p.pid)

    def down(self) -> None:
        """Remove everything `up` created; safe to call twice."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        topo = netns.Topology(namespaces=[self.node_ns, self.world_ns, *(p.ns for p in self.pods.values())])
        topo.namespaces = [ns for ns in topo.namespaces if netns.netns_exists(ns)]
        topo.close()
        loader.remove_pin_root(self.pin_root)

    def save(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> SingleNode | None:
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["pods"] = {k: Pod(**v) for k, v in raw["pods"].items()}
        return cls(**raw)


def _wait_listening(ns: str, port: int) -> None:
    for _ in range(100):
        if f":{port} " in netns.run(["ss", "-ltn"], netns=ns).stdout:
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} in {ns}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status"])
    a = ap.parse_args(argv)
    cur = SingleNode.load()
    if a.command == "up":
        if cur is not None:
            print(f"already up (node namespace {cur.node_ns}); `down` first", file=sys.stderr)
            return 0
        print("compiling datapath programs and creating namespaces ...", file=sys.stderr)
        lab = SingleNode.up()
        lab.save()
        backends = [(p.ip, SERVER_PORT) for p in lab.pods.values() if p.name != "client"]
        maps = Maps(lab.pin_root)
        maps.service(DEMO_VIP, 80, "tcp", backends, rev_nat=1)
        maps.service(DEMO_VIP, 53, "udp", backends, rev_nat=2)
        maps.service("0.0.0.0", 30080, "tcp", backends, rev_nat=3, flags=d("SVC_FLAG_NODEPORT"))
        client = lab.pods["client"].ns
        print(f"""one-node datapath lab is up (maps pinned under {lab.pin_root}).
  ClusterIP {DEMO_VIP}:80/TCP and :53/UDP -> be1, be2, be3 ({POD_CIDR}); NodePort {NODE_IP}:30080
  try:  ip netns exec {client} {sys.executable} -m pycilium.lab.probe {DEMO_VIP} 80 --count 6
        ip netns exec {lab.world_ns} {sys.executable} -m pycilium.lab.probe {NODE_IP} 30080
        ip netns exec {client} {sys.executable} -m pycilium.lab.probe {WORLD_IP} 8080   # masqueraded
  remove it: make lab-down""")
        return 0
    if a.command == "down":
        if cur is None:
            print("not up", file=sys.stderr)
            return 0
        cur.down()
        STATE_FILE.unlink(missing_ok=True)
        print("removed", file=sys.stderr)
        return 0
    if cur is None:
        print("not up", file=sys.stderr)
        return 1
    print(json.dumps(asdict(cur), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
