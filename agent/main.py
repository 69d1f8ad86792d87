"""pycilium-agent: one per node; turns the Kubernetes API into datapath state.

Start-up order (each step only after the previous one, so no packet ever meets a half-built node
and nothing is deleted before the state it depends on is known):

 1. Configuration (config dir, PYCILIUM_* env, --set KEY=VALUE), logging.
 2. Kubernetes client; the agent's CRDs; this node's Node object: PodCIDR and InternalIP.
 3. Datapath: compile bpf_lxc / bpf_host / bpf_xdp for this node (maps are reopened, never
    recreated, so conntrack, NAT and services survive a restart), attach the host programs to the
    external devices with tc `replace` (the old programs serve until the instant the new ones do).
 4. IPAM and endpoints restored from disk; pod veths re-attached to the new programs.
 5. CNI API socket (ADD is refused with "try again later" until step 7 is done).
 6. Reflectors (Nodes, Namespaces, Pods, Services, EndpointSlices, NetworkPolicies, identities)
    feeding the node, service and policy managers; each waits for its sources' first full list
    before it writes, and deletes stale state only after its first full sync.
 7. Ready: /healthz answers 200, the CNI configuration is written (write-cni-conf-when-ready),
    conntrack GC and the gRPC API run.

SIGTERM/SIGINT stop the control plane only: programs stay attached and maps pinned, so traffic keeps
flowing until the next agent takes over.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pycilium.agent.config import AgentConfig, ConfigError, load_config

log = logging.getLogger("pycilium.agent")
VERSION = "0.1.0"


# ---- logging ---------------------------------------------------------------------------------------

_STD_ATTRS = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    """logfmt (`level=info subsys=... msg="..." key=value`) or JSON, with the record's extras."""

    def __init__(self, as_json: bool):
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "subsys": record.name.removeprefix("pycilium."),
            "msg": record.getMessage(),
        }
        fields.update(
            {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}
        )
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        out = []
        for k, v in fields.items():
            s = str(v)
            out.append(f'{k}="{s}"' if (" " in s or "=" in s or not s) else f"{k}={s}")
        return " ".join(out)


def setup_logging(config: AgentConfig) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Formatter(config.log_format == "json"))
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(config.log_level.upper())


# ---- node addressing -------------------------------------------------------------------------------


def _ipv4_addrs(ipr: Any, index: int) -> list[str]:
    return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2) if a["index"] == index]


def detect_devices(config: AgentConfig) -> tuple[list[str], str]:
    """External devices and the node IP: configured, else the default-route device and its address."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        devices = list(config.devices)
        if not devices:
            for r in ipr.get_default_routes(family=2):
                idx = r.get_attr("RTA_OIF")
                if idx:
                    devices.append(ipr.get_links(idx)[0].get_attr("IFLA_IFNAME"))
                    break
        if not devices:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if (
                    name != "lo"
                    and not name.startswith("lxc")
                    and link["flags"] & 1
                    and _ipv4_addrs(ipr, link["index"])
                ):
                    devices.append(name)
                    break
        if not devices:
            raise RuntimeError("no external device found: set `devices`")
        node_ip = config.node_ip
        if not node_ip:
            idx = ipr.link_lookup(ifname=devices[0])
            addrs = _ipv4_addrs(ipr, idx[0]) if idx else []
            if not addrs:
                raise RuntimeError(f"device {devices[0]} has no IPv4 address: set `node-ip`")
            node_ip = addrs[0]
    return devices, str(node_ip)


def netns_cookie() -> int:
    """The cookie of this process's network namespace (SO_NETNS_COOKIE)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")


def read_own_node(api: Any, node_name: str, stop: threading.Event, timeout: float = 300.0) -> dict[str, Any]:
    """This node's Node object; waits (with progress) until it exists and, if needed, has a PodCIDR."""
    from pycilium.agent.k8s.client import APIError, request_json
    from pycilium.agent.k8s.resources import NODES

    deadline = time.monotonic() + timeout
    delay = 0.5
    while not stop.is_set():
        try:
            obj = request_json(api, "GET", NODES.path(name=node_name))
            if isinstance(obj, dict):
                return obj
        except APIError as e:
            if e.status != 404:
                log.warning("reading Node failed", extra={"node": node_name, "error": str(e)})
        except Exception as e:  # connection refused etc.
            log.warning("API server not reachable", extra={"node": node_name, "error": str(e)})
        if time.monotonic() > deadline:
            raise RuntimeError(f"Node {node_name} not found in the API server after {timeout:.0f}s")
        log.info("waiting for this node's Node object", extra={"node": node_name})
        stop.wait(delay)
        delay = min(delay * 2, 5.0)
    raise RuntimeError("stopped")


# ---- the agent -------------------------------------------------------------------------------------


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.started = time.time()
        self.stop_event = threading.Event()
        self.ready_reason: str | None = "starting"
        self.devices: list[str] = []
        self.node_ip = ""
        self.tunnel_ifindex: int | None = None
        self.pod_cidr = ""
        self._closers: list[Callable[[], None]] = []
        self.components: dict[str, Any] = {}

    # -- readiness ---------------------------------------------------------------------------------
    def readiness(self) -> str | None:
        return self.ready_reason

    def _cni_readiness(self) -> str | None:
        return None if self.ready_reason is None else f"agent not ready: {self.ready_reason}"

    # -- start -------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        from pycilium.agent.k8s.client import new_api_client
        from pycilium.agent.k8s.crds import install_crds
        from pycilium.agent.metrics import DatapathCollector, HTTPEndpoints

        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        self.http = HTTPEndpoints(health_bind=cfg.health_bind, health_port=cfg.health_port,
                                  metrics_bind=cfg.prometheus_bind, metrics_port=cfg.prometheus_port,
                                  readiness=self.readiness, details=self._health_details)  # fmt: skip
        self.http.start()
        self._closers.append(self.http.stop)
        from prometheus_client import REGISTRY

        REGISTRY.register(DatapathCollector(cfg.bpf_root, evictions=self._ct_evictions))

        # 2. Kubernetes
        self.ready_reason = "connecting to the Kubernetes API"
        self.api = new_api_client(cfg)
        node = read_own_node(self.api, cfg.node_name, self.stop_event)
        for _ in range(60):
            try:
                install_crds(self.api)
                break
            except Exception as e:
                log.warning("installing CRDs failed; retrying", extra={"error": str(e)})
                self.stop_event.wait(2)
        self.devices, self.node_ip = detect_devices(cfg)
        self.pod_cidr = cfg.pod_cidr or node.get("spec", {}).get("podCIDR") or ""
        if not self.pod_cidr and cfg.ipam_mode == "kubernetes":
            raise RuntimeError(f"Node {cfg.node_name} has no spec.podCIDR and no pod-cidr is configured")
        log.info("node addressing", extra={"node": cfg.node_name, "node_ip": self.node_ip, "pod_cidr": self.pod_cidr,
                                           "devices": ",".join(self.devices)})  # fmt: skip

        # 3. datapath
        self.ready_reason = "loading the datapath"
        self._start_datapath()
        # 4. IPAM + endpoints
        self._start_endpoints()
        # 5. CNI API
        from pycilium.agent.cniapi.server import CNIServer

        self.cni = CNIServer.from_config(cfg, self.endpoints, readiness=self._cni_readiness)
        self.cni.start()
        self._closers.append(self.cni.stop)
        # 6. control plane
        self.ready_reason = "syncing with the Kubernetes API"
        self._start_control_plane()
        # 7. gRPC API, GC; readiness waits for the first syncs in the background
        from pycilium.agent.api.server import serve
        from pycilium.agent.datapath.ctgc import ConntrackGC
        from pycilium.agent.provider import Provider

        self.api_server = serve(Provider(self), cfg.socket_path)
        self._closers.append(self.api_server.stop)
        self.ctgc = ConntrackGC(cfg.bpf_root, cfg.conntrack_gc_interval, cfg.conntrack_gc_max_interval)
        self.ctgc.start()
        self._closers.append(self.ctgc.stop)
        threading.Thread(target=self._become_ready, name="readiness", daemon=True).start()

    def _start_datapath(self) -> None:
        from pycilium.bpf import loader
        from pycilium.bpf.node_defines import node_defines

        cfg = self.config
        defines = node_defines(cfg, node_ip=self.node_ip, pod_cidr=self.pod_cidr or None)
        t0 = time.monotonic()
        self.lxc = loader.compile_program("bpf_lxc", defines)
        self.host = loader.compile_program("bpf_host", defines)
        self.xdp = loader.compile_program("bpf_xdp", defines)
        for dev in self.devices:
            loader.attach_tc(dev, self.host.fd("from_netdev"), loader.TC_INGRESS, "from-netdev")
            loader.attach_tc(dev, self.host.fd("to_netdev"), loader.TC_EGRESS, "to-netdev")
            try:
                loader.attach_xdp(dev, self.xdp.fd("xdp_prefilter", loader.XDP))
            except loader.DatapathError as e:
                log.warning("XDP prefilter not attached", extra={"device": dev, "error": str(e)})
        from pycilium.agent.endpoint.netlink import set_sysctl_root

        set_sysctl_root(cfg.proc_sys_root)
        self._setup_tunnel(defines)
        if cfg.enable_socket_lb:
            self._attach_socket_lb(defines)
        self._sysctl("net/ipv4/ip_forward", "1")
        for dev in ("all", *self.devices):
            self._sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")
        log.info(
            "datapath loaded", extra={"seconds": round(time.monotonic() - t0, 2), "pin_root": cfg.bpf_root}
        )

    def _setup_tunnel(self, defines: Any) -> None:
        """Tunnel routing: the VXLAN device with bpf_overlay.c; native: no such device (removed when a
        previous run was in tunnel mode, which takes its routes with it)."""
        from pycilium.agent.nodes import tunnel
        from pycilium.bpf import loader

        cfg = self.config
        if cfg.routing_mode != "tunnel":
            tunnel.remove_device()
            return
        dev = tunnel.ensure_device(self.node_ip, tunnel.tunnel_mtu(cfg.mtu), port=cfg.tunnel_port)
        self.overlay = loader.compile_program("bpf_overlay", defines)
        loader.attach_tc(dev.name, self.overlay.fd("to_overlay"), loader.TC_EGRESS, "to-overlay")
        loader.attach_tc(dev.name, self.overlay.fd("from_overlay"), loader.TC_INGRESS, "from-overlay")
        self._sysctl(f"net/ipv4/conf/{dev.name}/rp_filter", "0")
        self.tunnel_ifindex = dev.ifindex
        log.info("tunnel device ready", extra={"device": dev.name, "mtu": dev.mtu, "port": cfg.tunnel_port,
                                               "mac": dev.mac})  # fmt: skip

    def _attach_socket_lb(self, defines: Any) -> None:
        """cgroup connect4/sendmsg4/recvmsg4 for this node's own sockets (bpf/bpf_sock.c)."""
        from dataclasses import replace

        from pycilium.bpf import cgroup, loader

        root = self.config.cgroup_root or cgroup.cgroup2_root()
        if not root:
            log.warning("no cgroup v2 mount: socket load-balancing for node processes is off")
            return
        values = dict(defines.values)
        values["NETNS_COOKIE"] = netns_cookie()
        self.sock = loader.compile_program("bpf_sock", replace(defines, values=values))
        owner = cgroup.node_map_ids(self.config.bpf_root)
        for fn, attach_type in cgroup.SOCK_HOOKS:
            cgroup.attach(root, self.sock.fd(fn, loader.CGROUP_SOCK_ADDR, attach_type), attach_type, owner)
        log.info("socket load-balancing attached", extra={"cgroup": root})

    @staticmethod
    def _sysctl(path: str, value: str) -> None:
        from pycilium.agent.endpoint.netlink import write_sysctl

        try:
            write_sysctl(path, value)
        except OSError as e:
            log.warning("cannot set sysctl", extra={"sysctl": path, "error": str(e)})

    def _start_endpoints(self) -> None:
        from pycilium.agent.endpoint.datapath import TcProgramAttacher
        from pycilium.agent.endpoint.manager import EndpointManager
        from pycilium.agent.ipam.hostscope import HostScopeIPAM

        cfg = self.config
        self.ipam = HostScopeIPAM(os.path.join(cfg.state_dir, "ipam.json"), self.pod_cidr or None)
        attacher = TcProgramAttacher(self.lxc.fd("from_container"), self.lxc.fd("to_container"))
        self.endpoints = EndpointManager.from_config(cfg, self.ipam, attacher,
                                                     identity_resolver=self._resolve_identity)  # fmt: skip
        restored = self.endpoints.restore()
        log.info("endpoints restored", extra={"endpoints": len(restored)})

    def _resolve_identity(self, namespace: str, name: str) -> int | None:
        cp = self.components.get("policy")
        return cp.resolve_identity(namespace, name) if cp is not None else None

    def _start_control_plane(self) -> None:
        from pycilium.agent.k8s import resources as R
        from pycilium.agent.k8s.reflector import Handlers, Reflector
        from pycilium.agent.nodes.manager import NodeManager
        from pycilium.agent.policy.controlplane import PolicyControlPlane
        from pycilium.agent.services.manager import ServiceManager

        cfg = self.config

        def refl(res: Any, **kw: Any) -> Reflector:
            r = Reflector(self.api, res, **kw)
            self._reflectors.append(r)
            return r

        self._reflectors: list[Reflector] = []
        nodes_r = refl(R.NODES)
        ns_r = refl(R.NAMESPACES)
        pods_r = refl(R.PODS)
        svc_r = refl(R.SERVICES, label_selector=R.SERVICE_SELECTOR, store_objects=False)
        eps_r = refl(R.ENDPOINTSLICES, label_selector=R.ENDPOINTSLICE_SELECTOR, store_objects=False)
        np_r = refl(R.NETWORKPOLICIES)
        pcnp_r = refl(R.PYCILIUM_NETWORK_POLICIES)
        id_r = refl(R.PYCILIUM_IDENTITIES)

        services = ServiceManager(node_name=cfg.node_name, bpf_root=cfg.bpf_root, state_dir=cfg.state_dir,
                                  lb_algorithm=cfg.lb_algorithm, maglev_table_size=cfg.maglev_table_size)  # fmt: skip
        nodes = NodeManager(node_name=cfg.node_name, bpf_root=cfg.bpf_root, routing_mode=cfg.routing_mode,
                            tunnel_ifindex=self.tunnel_ifindex, on_pod_cidrs=self._on_pod_cidrs, on_nodes_changed=services.nodes_changed)  # fmt: skip
        services.node_ip_of = nodes.node_ip_of
        policy = PolicyControlPlane.from_config(cfg, self.api, endpoint_manager=self.endpoints)
        self.components.update(services=services, nodes=nodes, policy=policy)

        nodes_r.add_handlers(nodes.handlers())
        svc_r.add_handlers(services.service_handlers())
        eps_r.add_handlers(services.endpointslice_handlers())

        def h(up: Callable[[dict[str, Any]], None], down: Callable[[dict[str, Any]], None]) -> Handlers:
            x = Handlers()
            x.on_add = up
            x.on_update = lambda _old, new: up(new)
            x.on_delete = down
            return x

        pods_r.add_handlers(h(policy.upsert_pod, policy.delete_pod))
        ns_r.add_handlers(h(policy.upsert_namespace, policy.delete_namespace))
        nodes_r.add_handlers(h(policy.upsert_node, policy.delete_node))
        np_r.add_handlers(h(policy.upsert_policy, policy.delete_policy))
        pcnp_r.add_handlers(h(policy.upsert_pycilium_policy, policy.delete_pycilium_policy))
        id_r.add_handlers(h(policy.upsert_identity, policy.delete_identity))
        self.endpoints.subscribe(
            lambda ep: policy.endpoint_added(ep.id, ep.ipv4, ep.pod_namespace, ep.pod_name),
            lambda ep: policy.endpoint_removed(ep.id),
        )
        nodes.start(sources=[nodes_r])
        services.start(sources=[svc_r, eps_r])
        for r in self._reflectors:
            r.start()
        self._closers += [r.stop for r in self._reflectors]
        self._closers += [services.stop, nodes.stop, policy.stop]

        def policy_sync() -> None:
            from pycilium.agent.k8s.reflector import wait_for_sync

            while not self.stop_event.is_set():
                if wait_for_sync([pods_r, ns_r, nodes_r, np_r, pcnp_r, id_r], timeout=1.0):
                    policy.mark_synced()
                    policy.start()
                    log.info("policy control plane synced")
                    return

        threading.Thread(target=policy_sync, name="policy-sync", daemon=True).start()

    def _on_pod_cidrs(self, cidrs: list[str]) -> None:
        v4 = [c for c in cidrs if ipaddress.ip_network(c, strict=False).version == 4]
        if v4 and not self.config.pod_cidr and v4[0] != self.ipam.pod_cidr:
            try:
                self.ipam.set_pod_cidr(v4[0])
            except Exception as e:
                log.error("PodCIDR change refused", extra={"cidr": v4[0], "error": str(e)})

    def _become_ready(self) -> None:
        from pycilium.agent.cniapi.install import install_cni_config

        waits = [("services", self.components["services"].synced), ("nodes", self.components["nodes"].synced)]
        for name, ev in waits:
            while not ev.wait(1.0):
                if self.stop_event.is_set():
                    return
                self.ready_reason = f"waiting for the first {name} sync"
        policy = self.components["policy"]
        while not policy.synced and not self.stop_event.is_set():
            self.ready_reason = "waiting for the first policy sync"
            self.stop_event.wait(0.2)
        if self.config.write_cni_conf_when_ready:
            path = install_cni_config(self.config)
            log.info("CNI configuration written", extra={"path": str(path)})
        self.ready_reason = None
        log.info("agent ready", extra={"node": self.config.node_name,
                                       "seconds": round(time.time() - self.started, 2)})  # fmt: skip

    def _ct_evictions(self) -> dict[str, int]:
        ctgc = getattr(self, "ctgc", None)
        return dict(ctgc.evictions) if ctgc is not None else {}

    def _health_details(self) -> dict[str, Any]:
        return {"node": self.config.node_name, "node_ip": self.node_ip, "pod_cidr": self.pod_cidr,
                "uptime_seconds": round(time.time() - self.started, 1)}  # fmt: skip

    # -- stop --------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the control plane; the datapath (attached programs, pinned maps) keeps running."""
        self.stop_event.set()
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                log.exception("error while stopping")
        self._closers.clear()
        for prog in ("lxc", "host", "xdp", "sock", "overlay"):
            p = getattr(self, prog, None)
            if p is not None:
                p.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pycilium-agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config-dir", help="directory with one file per setting (a mounted ConfigMap)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting by its config key, e.g. --set node-name=node1 (repeatable)")  # fmt: skip
    ap.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pycilium.bpf.bpffs import ensure_host_bpffs

    ensure_host_bpffs()  # before any thread starts; see bpf/bpffs.py
    args = parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"pycilium-agent: --set needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value
    try:
        from pycilium.agent.config import _coerce

        fields = {f.alias or n: f for n, f in AgentConfig.model_fields.items()}
        for k, v in list(overrides.items()):
            if k in fields:
                overrides[k] = _coerce(v, fields[k].annotation)
        config = load_config(args.config_dir, overrides)
    except ConfigError as e:
        print(f"pycilium-agent: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.model_dump_json(by_alias=True, indent=2))
        return 0
    setup_logging(config)
    agent = Agent(config)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except Exception as e:
        log.exception("agent failed to start", extra={"error": str(e)})
        agent.stop()
        return 1
    while not done.wait(1.0):
        pass
    agent.stop()
    log.info("stopped; datapath left running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
