"""CNI ADD/DEL latency of pycilium-cni (plugin + agent) next to Debian's ptp + host-local, in one run.

USAGE: python -m bench.cni_latency [--pods 100] [--concurrency 10] [--state-base DIR] [--json FILE]   (root)

Both plugins are executed the way a container runtime executes them (CNI_* environment variables,
the network configuration on stdin) for the same pod network namespaces: first one at a time, then
`--concurrency` at once. pycilium-cni talks to the agent's CNI API and endpoint manager, run
in-process here; ptp delegates to host-local. Everything happens inside network namespaces the
benchmark creates (a "node" and one per pod) and removes again; the host's own network is not
touched. Prints p50/p99/mean per operation, the CPU time per operation (user + system of the
benchmark process, which hosts pycilium's agent side, plus the plugin processes; the kernel's own
work on behalf of both counts too) and the pycilium/ptp ratios. Not a test.

Both plugins keep their state (pycilium's ipam.json and endpoint files, host-local's dataDir) under
--state-base; every pycilium state change is fsync'ed, so a tmpfs base (/dev/shm: like the default
/var/run/pycilium on a real node) shows the cost without the disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pycilium.agent.cniapi import CNIServer, conflist, install_cni_binary
from pycilium.agent.config import AgentConfig
from pycilium.agent.endpoint import EndpointManager
from pycilium.agent.ipam import HostScopeIPAM
from pycilium.bpf.loader import open_pinned_maps, remove_pin_root
from pycilium.lab.netns import Topology, in_netns

REFERENCE_DIR = "/usr/lib/cni"
CNI_VERSION = "1.0.0"  # the highest version both plugins speak


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


class Plugin:
    def __init__(self, label: str, binary: str, netconf: dict[str, Any], cni_path: str):
        self.label, self.binary, self.netconf, self.cni_path = label, binary, netconf, cni_path
        self._stdin = json.dumps(netconf).encode()

    def run(self, command: str, cid: str, netns: str) -> float:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/{netns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": self.cni_path,
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={netns}"}  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.run([self.binary], env=env, input=self._stdin, capture_output=True, timeout=120)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(
                f"{self.label} {command} {netns} failed: {p.stdout.decode()} {p.stderr.decode()}"
            )
        return dt

    def version_latency(self, n: int = 30) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run([self.binary], env={"CNI_COMMAND": "VERSION"}, input=b"{}", capture_output=True)
            ts.append(time.perf_counter() - t0)
        return percentile(ts, 0.5)


def cpu_seconds() -> float:
    """CPU (user + system) of this process (the in-process agent, the runner) and its plugin processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(plugin: Plugin, pods: list[str], concurrency: int, tag: str) -> dict[str, list[float]]:
    cids = {pod: f"{tag}{uuid.uuid4().hex}" for pod in pods}
    out: dict[str, list[float]] = {}
    for op in ("ADD", "DEL"):
        fn: Callable[[str], float] = lambda pod, op=op: plugin.run(op, cids[pod], pod)  # noqa: E731
        t0, c0 = time.perf_counter(), cpu_seconds()
        if concurrency <= 1:
            lat = [fn(pod) for pod in pods]
        else:
            with ThreadPoolExecutor(concurrency) as ex:
                lat = list(ex.map(fn, pods))
        out[op] = lat
        out[op + "_wall"] = [time.perf_counter() - t0]
        out[op + "_cpu"] = [(cpu_seconds() - c0) / len(pods)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: sudo .venv/bin/python -m bench.cni_latency --pods 100")  # fmt: skip
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--state-base", default=None, help="directory for both plugins' state (default: $TMPDIR)")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (creates network namespaces)", file=sys.stderr)
        return 2
    if not os.access(f"{REFERENCE_DIR}/ptp", os.X_OK):
        print(f"{REFERENCE_DIR}/ptp missing: apt-get install containernetworking-plugins", file=sys.stderr)
        return 2

    tag = uuid.uuid4().hex[:6]
    tmp = Path(tempfile.mkdtemp(prefix="pyc-cnibench-", dir=args.state_base))
    pin_root = f"/sys/fs/bpf/pyc-bench-{tag}"
    topo = Topology()
    server: CNIServer | None = None
    results: dict[str, Any] = {}
    try:
        node = topo.add_netns(f"pcbnode{tag}")
        pods = [topo.add_netns(f"pcb{tag}p{i}") for i in range(args.pods)]
        for fd in open_pinned_maps(pin_root, {}).values():
            os.close(fd)
        cfg = AgentConfig(state_dir=str(tmp / "state"), cni_socket_path=str(tmp / "run" / "cni.sock"),
                          cni_bin_dir=str(tmp / "bin"), cni_log_file=str(tmp / "cni.log"), bpf_root=pin_root,
                          pod_cidr="10.88.0.0/22", mtu=1500)  # fmt: skip
        net = conflist(cfg)
        pyc = Plugin("pycilium-cni", str(install_cni_binary(cfg)),
                     dict(net["plugins"][0], cniVersion=CNI_VERSION, name=net["name"]), "/opt/cni/bin")  # fmt: skip
        ptp = Plugin("ptp+host-local", f"{REFERENCE_DIR}/ptp", {
            "cniVersion": CNI_VERSION, "name": "benchptp", "type": "ptp", "ipMasq": False, "mtu": 1500,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.89.0.0/22"}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(tmp / "host-local")},
        }, REFERENCE_DIR)  # fmt: skip
        with in_netns(node):  # the agent's threads and every plugin process live in the node netns
            ipam = HostScopeIPAM(tmp / "state" / "ipam.json", cfg.pod_cidr)
            server = CNIServer.from_config(cfg, EndpointManager.from_config(cfg, ipam))
            server.start()
            for pl in (pyc, ptp):  # warm-up (page cache, first netlink sockets)
                cid = f"warm{tag}"
                pl.run("ADD", cid, pods[0])
                pl.run("DEL", cid, pods[0])
            results["version_p50_ms"] = {pl.label: pl.version_latency() * 1000 for pl in (pyc, ptp)}
            for mode, conc in (("sequential", 1), (f"{args.concurrency} at once", args.concurrency)):
                for pl in (pyc, ptp):
                    results.setdefault(mode, {})[pl.label] = measure(pl, pods, conc, tag)
    finally:
        if server is not None:
            server.stop()
        topo.close()
        remove_pin_root(pin_root)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"CNI latency: {args.pods} pods, one node netns, state under {args.state_base or tempfile.gettempdir()}, "
          "milliseconds (lower is better)")  # fmt: skip
    print(f"plugin start (VERSION) p50: pycilium-cni {results['version_p50_ms']['pycilium-cni']:.1f}, "
          f"ptp {results['version_p50_ms']['ptp+host-local']:.1f}")  # fmt: skip
    print(
        f"{'mode':<14} {'plugin':<16} {'op':<4} {'p50':>7} {'p99':>7} {'mean':>7} {'pods/s':>7} {'cpu/op':>7}"
    )
    for mode in [m for m in results if m != "version_p50_ms"]:
        for label, r in results[mode].items():
            for op in ("ADD", "DEL"):
                lat = [x * 1000 for x in r[op]]
                rate = len(lat) / r[op + "_wall"][0]
                print(f"{mode:<14} {label:<16} {op:<4} {percentile(lat, 0.5):7.1f} {percentile(lat, 0.99):7.1f} "
                      f"{statistics.fmean(lat):7.1f} {rate:7.1f} {r[op + '_cpu'][0] * 1000:7.1f}")  # fmt: skip
    print("ratio pycilium-cni / ptp+host-local (below 1: pycilium faster)")
    for mode in [m for m in results if m != "version_p50_ms"]:
        a, b = results[mode]["pycilium-cni"], results[mode]["ptp+host-local"]
        for op in ("ADD", "DEL"):
            p50 = percentile(a[op], 0.5) / percentile(b[op], 0.5)
            p99 = percentile(a[op], 0.99) / percentile(b[op], 0.99)
            print(f"  {mode:<14} {op:<4} p50 {p50:5.2f}x  p99 {p99:5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
