"""Service sync benchmark: the agent's BPF load-balancer control plane against iptables kube-proxy.

1. Cold full sync, in process: 10,000 ClusterIP services x 3 backends handed to the service
   manager, then one full sync into freshly pinned maps. Reported: handler (parse) time, plan time,
   time spent in map writes (the BPF_MAP_UPDATE_BATCH calls), and a no-op restart resync.
2. End to end, agent in a child process against the embedded API server holding the same 10,000
   Services and EndpointSlices: time from start to the first full sync written (list + sync), the
   agent's RSS, and the API event -> datapath latency of endpoint churn (an EndpointSlice PUT until
   the manager has written the change; p50/p99 over N updates).
3. Baseline in the same run: the equivalent kube-proxy iptables rule set (KUBE-SERVICES ->
   KUBE-SVC-* -> KUBE-SEP-* with statistic random DNAT) loaded with `iptables-restore` in a private
   netns: a full restore (what kube-proxy does on a full sync) and a --noflush restore of one
   service's chains (its best-case partial sync), with nf_tables and legacy backends.

Results are printed with ratios to the baseline; absolute numbers depend on the machine.
Run as root: `python -m bench.service_sync [--services 10000] [--churn 300] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

Obj = dict[str, Any]
NS = "bench"


# --- object generation ------------------------------------------------------------------------------


def vip(i: int) -> str:
    return f"10.96.{(i >> 8) & 0xFF}.{i & 0xFF}" if i < 60000 else f"10.97.{(i >> 8) & 0xFF}.{i & 0xFF}"


def backend_ip(i: int, j: int) -> str:
    n = i * 3 + j
    return f"10.{128 + ((n >> 16) & 0x3F)}.{(n >> 8) & 0xFF}.{n & 0xFF}"


def service_obj(i: int, with_ip: bool = True) -> Obj:
    spec: Obj = {
        "type": "ClusterIP",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    if with_ip:
        spec["clusterIP"] = vip(i)
        spec["clusterIPs"] = [vip(i)]
    return {"metadata": {"name": f"svc-{i}", "namespace": NS, "resourceVersion": "1"}, "spec": spec}


def slice_obj(i: int, gen: int = 0) -> Obj:
    eps = [{"addresses": [backend_ip(i, j)], "conditions": {"ready": True}, "nodeName": f"node-{j}"}
           for j in range(3)]  # fmt: skip
    if gen:  # churn: the third backend is replaced by a new pod every generation
        eps[2]["addresses"] = [f"10.{200 + (gen >> 16) % 50}.{(gen >> 8) & 0xFF}.{gen & 0xFF}"]
    return {
        "metadata": {
            "name": f"svc-{i}-abcde",
            "namespace": NS,
            "resourceVersion": str(gen + 1),
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def make_maps(root: str) -> None:
    from pycilium.bpf import loader

    loader.remove_pin_root(root)
    sizes = loader.sizes_from_config(None)
    sizes.update({"CT_MAP_SIZE_TCP": 65536, "CT_MAP_SIZE_ANY": 65536, "NAT_MAP_SIZE": 65536,
                  "LB_MAP_SIZE": 131072})  # fmt: skip
    for fd in loader.open_pinned_maps(root, sizes).values():
        os.close(fd)


# --- 1. cold full sync in process ---------------------------------------------------------------------


def cold_sync(n: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry
    from pycilium.agent.services import LBMaps, ServiceManager
    from pycilium.bpf import loader

    class TimedMaps(LBMaps):
        write_s = 0.0
        entries = 0

        def update(self, name: str, keys: Any, values: Any) -> None:
            t = time.perf_counter()
            super().update(name, keys, values)
            self.write_s += time.perf_counter() - t
            self.entries += len(keys)

        def delete(self, name: str, keys: Any) -> int:
            t = time.perf_counter()
            r = super().delete(name, keys)
            self.write_s += time.perf_counter() - t
            return r

    root = f"/sys/fs/bpf/pyc-bench-svc-{uuid.uuid4().hex[:6]}"
    make_maps(root)
    out: dict[str, float] = {}
    try:
        services = [service_obj(i) for i in range(n)]
        slices = [slice_obj(i) for i in range(n)]
        maps = TimedMaps(root)
        mgr = ServiceManager(node_name="node-0", bpf_root=root, maps=maps, registry=CollectorRegistry())
        mgr.restore()
        t = time.perf_counter()
        for s in services:
            mgr.on_service(s)
        for sl in slices:
            mgr.on_endpoint_slice(sl)
        out["handlers_s"] = time.perf_counter() - t
        t = time.perf_counter()
        mgr.sync_once(full=True)
        out["full_sync_s"] = time.perf_counter() - t
        out["map_write_s"] = maps.write_s
        out["map_entries"] = maps.entries
        # one endpoint change, incremental
        maps.write_s = 0.0
        lat = []
        for k in range(200):
            sl = slice_obj(k, gen=1)
            t = time.perf_counter()
            mgr.on_endpoint_slice(sl)
            mgr.sync_once()
            lat.append(time.perf_counter() - t)
        out["incremental_one_slice_p50_s"] = statistics.median(lat)
        out["incremental_map_write_per_update_s"] = maps.write_s / 200
        t = time.perf_counter()
        out["audit_repairs"] = mgr.audit()
        out["audit_s"] = time.perf_counter() - t
        maps.close()
        # restart: restore from the maps and a full resync that changes nothing
        maps2 = TimedMaps(root)
        mgr2 = ServiceManager(node_name="node-0", bpf_root=root, maps=maps2, registry=CollectorRegistry())
        t = time.perf_counter()
        mgr2.restore()
        out["restart_restore_s"] = time.perf_counter() - t
        for s in services:
            mgr2.on_service(s)
        for sl in slices:  # the first 200 services are back at generation 0: only they change
            mgr2.on_endpoint_slice(sl)
        t = time.perf_counter()
        mgr2.sync_once(full=True)
        out["restart_full_sync_s"] = time.perf_counter() - t
        out["restart_entries_written"] = maps2.entries
        maps2.close()
    finally:
        loader.remove_pin_root(root)
    return out


# --- 2. end to end: API server + agent child process ---------------------------------------------------


def load_api_server(srv: Any, n: int) -> None:
    server = srv.server
    rt_svc = server.registry.find("services")
    rt_eps = server.registry.find("endpointslices")

    def create(i0: int, i1: int) -> None:
        for i in range(i0, i1):
            body = service_obj(i, with_ip=False)
            del body["metadata"]["resourceVersion"]
            server.api.create(rt_svc, NS, body)
            sl = slice_obj(i)
            del sl["metadata"]["resourceVersion"]
            server.api.create(rt_eps, NS, sl)

    srv.call(lambda: server.api.ensure_namespace(NS))
    for i0 in range(0, n, 1000):
        srv.call(lambda i0=i0: create(i0, min(n, i0 + 1000)), timeout=120)


def agent_child(url: str, n: int, churn: int) -> None:
    """Runs in the child process: reflectors + service manager, then churn; prints one JSON line."""
    import logging

    from prometheus_client import CollectorRegistry
    from pycilium.agent.k8s import (
        ENDPOINTSLICE_SELECTOR,
        ENDPOINTSLICES,
        SERVICE_SELECTOR,
        SERVICES,
        Reflector,
        new_api_client,
        request_json,
    )
    from pycilium.agent.services import ServiceManager, compact_endpoint_slice, compact_service
    from pycilium.bpf import loader

    logging.basicConfig(level=logging.WARNING)
    root = f"/sys/fs/bpf/pyc-bench-e2e-{uuid.uuid4().hex[:6]}"
    make_maps(root)
    out: dict[str, Any] = {"rss_start_mb": rss_mb()}
    try:
        api = new_api_client(k8s_service_host=url)
        mgr = ServiceManager(
            node_name="node-0", bpf_root=root, registry=CollectorRegistry(), audit_interval=3600
        )
        applied: dict[tuple[str, str], threading.Event] = {}
        lock = threading.Lock()

        def on_applied(keys: set[tuple[str, str]]) -> None:
            with lock:
                for k in keys:
                    ev = applied.get(k)
                    if ev is not None:
                        ev.set()

        mgr.on_applied.append(on_applied)
        svc = Reflector(api, SERVICES, label_selector=SERVICE_SELECTOR, transform=compact_service,
                        store_objects=False, handlers=[mgr.service_handlers()])  # fmt: skip
        eps = Reflector(api, ENDPOINTSLICES, label_selector=ENDPOINTSLICE_SELECTOR, transform=compact_endpoint_slice,
                        store_objects=False, handlers=[mgr.endpointslice_handlers()])  # fmt: skip
        t = time.perf_counter()
        mgr.start(sources=[svc, eps])
        svc.start()
        eps.start()
        if not mgr.flush(300):
            raise RuntimeError("initial sync did not finish")
        out["start_to_synced_s"] = time.perf_counter() - t
        out["frontends"] = mgr.status()["frontends"]
        out["backends"] = mgr.status()["backends"]
        out["rss_synced_mb"] = rss_mb()
        lats: list[float] = []
        for k in range(churn):
            i = (k * 7919) % n
            body = slice_obj(i, gen=k + 1)
            del body["metadata"]["resourceVersion"]
            ev = threading.Event()
            key = (NS, f"svc-{i}")
            with lock:
                applied[key] = ev
            t0 = time.perf_counter()
            request_json(api, "PUT", ENDPOINTSLICES.path(NS, body["metadata"]["name"]), body=body)
            if not ev.wait(10):
                raise RuntimeError(f"update of {key} not applied")
            lats.append(time.perf_counter() - t0)
            with lock:
                del applied[key]
        out["churn_p50_s"] = statistics.median(lats)
        out["churn_p99_s"] = pct(lats, 99)
        out["churn_max_s"] = max(lats)
        out["rss_end_mb"] = rss_mb()
        out["audit_repairs"] = mgr.audit()
        svc.stop()
        eps.stop()
        mgr.stop()
    finally:
        loader.remove_pin_root(root)
    print(json.dumps(out), flush=True)


def end_to_end(n: int, churn: int) -> dict[str, Any]:
    from pycilium.lab.apiserver import APIServerThread

    with APIServerThread(history_size=5000, bookmark_interval=60) as srv:
        t = time.perf_counter()
        load_api_server(srv, n)
        load_s = time.perf_counter() - t
        p = subprocess.run([sys.executable, "-m", "bench.service_sync", "--agent-child", srv.url, "--services", str(n),
                            "--churn", str(churn)], capture_output=True, text=True, timeout=900)  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"agent child failed:\n{p.stderr[-3000:]}")
        res: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
        res["api_server_load_s"] = load_s
        return res


# --- 3. iptables kube-proxy baseline -------------------------------------------------------------------


def _chain(prefix: str, s: str) -> str:
    h = hashlib.sha256(s.encode()).digest()
    return prefix + base64.b32encode(h).decode()[:16]


def kube_proxy_rules(n: int, only: int | None = None) -> str:
    """The nat table kube-proxy's iptables mode writes for n ClusterIP services with 3 endpoints.

    With `only`, a --noflush partial restore of one service's chains (plus KUBE-SERVICES' entry
    is untouched): what a best-case partial sync writes for one endpoint change.
    """
    lines = ["*nat"]
    ids = range(n) if only is None else [only]
    if only is None:
        lines += [":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    chains: list[str] = []
    rules: list[str] = []
    for i in ids:
        svc_chain = _chain("KUBE-SVC-", f"{NS}/svc-{i}:http")
        chains.append(f":{svc_chain} - [0:0]")
        if only is None:
            rules.append(f'-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m comment --comment "{NS}/svc-{i}:http cluster IP" '
                         f"-m tcp --dport 80 -j {svc_chain}")  # fmt: skip
        eps = [backend_ip(i, j) for j in range(3)]
        for j, ip in enumerate(eps):
            sep = _chain("KUBE-SEP-", f"{NS}/svc-{i}:http:{ip}")
            chains.append(f":{sep} - [0:0]")
            left = len(eps) - j
            prob = f" -m statistic --mode random --probability {1 / left:.10f}" if left > 1 else ""
            rules.append(
                f'-A {svc_chain} -m comment --comment "{NS}/svc-{i}:http -> {ip}:8080"{prob} -j {sep}'
            )
            rules.append(f'-A {sep} -s {ip}/32 -m comment --comment "{NS}/svc-{i}:http" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p tcp -m comment --comment "{NS}/svc-{i}:http" -m tcp -j DNAT '
                         f"--to-destination {ip}:8080")  # fmt: skip
    if only is None:
        rules.append("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000")
        rules.append("-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE --random-fully")
    return "\n".join([*lines, *chains, *rules, "COMMIT", ""])


def iptables_baseline(n: int) -> dict[str, float]:
    from pycilium.lab import netns

    out: dict[str, float] = {}
    with netns.topology() as topo:
        ns = topo.add_netns(netns.unique("pycsb"))
        full = kube_proxy_rules(n)
        partial = kube_proxy_rules(n, only=n // 2)
        for tool in ("iptables-restore", "iptables-legacy-restore"):
            if shutil.which(tool) is None:
                continue
            tag = "nft" if tool == "iptables-restore" else "legacy"
            with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as f:
                f.write(full)
            try:
                t = time.perf_counter()
                subprocess.run(["ip", "netns", "exec", ns, tool, f.name], check=True, capture_output=True)
                out[f"{tag}_full_restore_s"] = time.perf_counter() - t
                # a second full restore over the loaded table: a kube-proxy full resync
                t = time.perf_counter()
                subprocess.run(["ip", "netns", "exec", ns, tool, f.name], check=True, capture_output=True)
                out[f"{tag}_full_resync_s"] = time.perf_counter() - t
                with open(f.name, "w") as g:
                    g.write(partial)
                lat = []
                for _ in range(5):
                    t = time.perf_counter()
                    subprocess.run(["ip", "netns", "exec", ns, tool, "--noflush", f.name], check=True,
                                   capture_output=True)  # fmt: skip
                    lat.append(time.perf_counter() - t)
                out[f"{tag}_partial_restore_s"] = statistics.median(lat)
            finally:
                os.unlink(f.name)
                flush = tool.replace("-restore", "")
                subprocess.run(
                    ["ip", "netns", "exec", ns, flush, "-t", "nat", "-F"], check=False, capture_output=True
                )
                subprocess.run(
                    ["ip", "netns", "exec", ns, flush, "-t", "nat", "-X"], check=False, capture_output=True
                )
    return out


# --- main ---------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.service_sync", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--churn", type=int, default=300, help="EndpointSlice updates for the latency run")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--agent-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.agent_child:
        agent_child(a.agent_child, a.services, a.churn)
        return 0
    if os.geteuid() != 0:
        print("needs root (BPF maps, network namespaces)", file=sys.stderr)
        return 2
    n = a.services
    report: dict[str, Any] = {"services": n, "backends_per_service": 3}
    print(f"service sync benchmark: {n} ClusterIP services x 3 backends")
    cold = cold_sync(n)
    report["cold"] = cold
    print(f"  cold full sync (in process): handlers {_fmt(cold['handlers_s'])}, plan+write {_fmt(cold['full_sync_s'])},"
          f" of which map writes {_fmt(cold['map_write_s'])} for {int(cold['map_entries'])} entries")  # fmt: skip
    print(f"  one EndpointSlice change (in process): {cold['incremental_one_slice_p50_s'] * 1e6:.0f} us p50, map writes"
          f" {cold['incremental_map_write_per_update_s'] * 1e6:.0f} us; audit of all maps {_fmt(cold['audit_s'])}")  # fmt: skip
    print(f"  restart: restore {_fmt(cold['restart_restore_s'])}, full resync {_fmt(cold['restart_full_sync_s'])}"
          f" writing {int(cold['restart_entries_written'])} entries (200 services changed while down)")  # fmt: skip
    ipt = iptables_baseline(n)
    report["iptables"] = ipt
    for tag in ("nft", "legacy"):
        if f"{tag}_full_restore_s" in ipt:
            print(f"  iptables-restore ({tag}): full {_fmt(ipt[f'{tag}_full_restore_s'])}, full resync"
                  f" {_fmt(ipt[f'{tag}_full_resync_s'])}, one service --noflush {_fmt(ipt[f'{tag}_partial_restore_s'])}")  # fmt: skip
    if not a.skip_e2e:
        e2e = end_to_end(n, a.churn)
        report["e2e"] = e2e
        print(f"  end to end: API server -> synced maps in {_fmt(e2e['start_to_synced_s'])}"
              f" ({e2e['frontends']} frontends, {e2e['backends']} backends)")  # fmt: skip
        print(f"  endpoint churn, API event -> datapath: p50 {_fmt(e2e['churn_p50_s'])}, p99 {_fmt(e2e['churn_p99_s'])}"
              f" (max {_fmt(e2e['churn_max_s'])}, {a.churn} updates)")  # fmt: skip
        print(f"  agent RSS: {e2e['rss_start_mb']:.0f} MB at start, {e2e['rss_synced_mb']:.0f} MB synced,"
              f" {e2e['rss_end_mb']:.0f} MB after churn (budget 150 MB)")  # fmt: skip
    ratios: dict[str, float] = {}
    base_full = ipt.get("nft_full_restore_s")
    if base_full:
        ratios["cold_map_writes_vs_iptables_full"] = cold["map_write_s"] / base_full
        ratios["cold_full_sync_vs_iptables_full"] = cold["full_sync_s"] / base_full
        if "e2e" in report:
            ratios["churn_p50_vs_iptables_full_resync"] = (
                report["e2e"]["churn_p50_s"] / ipt["nft_full_resync_s"]
            )
            ratios["churn_p99_vs_iptables_full_resync"] = (
                report["e2e"]["churn_p99_s"] / ipt["nft_full_resync_s"]
            )
            ratios["churn_p50_vs_iptables_partial"] = (
                report["e2e"]["churn_p50_s"] / ipt["nft_partial_restore_s"]
            )
        ratios["incremental_vs_iptables_partial"] = (
            cold["incremental_one_slice_p50_s"] / ipt["nft_partial_restore_s"]
        )
    report["ratios"] = ratios
    if ratios:
        print("  ratios (ours / iptables nft; < 1 is faster):")
        for k, v in ratios.items():
            print(f"    {k}: {v:.4f}  ({1 / v:.0f}x faster)" if v < 1 else f"    {k}: {v:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
