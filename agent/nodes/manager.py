"""The node manager: Node objects -> routes to other nodes' pod CIDRs and the node ipcache entries.

For every other node: `<podCIDR> via <InternalIP> proto pycilium` (native routing), or
`<podCIDR> via TUNNEL_GATEWAY dev pyc_vxlan onlink proto pycilium` (tunnel routing, see tunnel.py). In the ipcache:
every IPv4 address of this node /32 -> reserved:host, of other nodes /32 -> reserved:remote-node
(flag IPCACHE_F_REMOTE_NODE), and 0.0.0.0/0 -> reserved:world. This node's spec.podCIDR(s) are handed
to `on_pod_cidrs` (IPAM), and the names of nodes whose addresses changed to `on_nodes_changed` (the
service manager puts backend node IPs into the datapath).

Restart rules as everywhere in the agent: what is found (our routes by protocol number, our ipcache
entries by their reserved identities) is kept and only replaced; stale routes and entries are
deleted once every source has synced. A periodic resync re-applies the desired state, repairing a
route someone deleted and retrying one whose gateway was not reachable yet.

Threads: handlers only record the change and wake the worker thread, which does all netlink and map
writes (pyroute2's sync API must not run inside an asyncio loop).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pycilium.agent.k8s.reflector import Handlers, HasSynced
from pycilium.bpf.maps import PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IPCACHE, IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.util import be32_to_ip, ip_to_be32

from .routes import RTPROT_PYCILIUM, RouteProgrammer, valid_cidr
from .tunnel import TUNNEL_GATEWAY

log = logging.getLogger("pycilium.nodes")

Obj = dict[str, Any]

ID_HOST = d("ID_HOST")
ID_WORLD = d("ID_WORLD")
ID_REMOTE_NODE = d("ID_REMOTE_NODE")
IPCACHE_F_REMOTE_NODE = d("IPCACHE_F_REMOTE_NODE")
IPCACHE_STATIC_PREFIX = d("IPCACHE_STATIC_PREFIX")
WORLD = "0.0.0.0/0"

IpcEntry = tuple[int, str, int]  # (identity, tunnel endpoint ("" = none), flags)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    internal_ip: str | None  # the address routes go through
    addresses: tuple[str, ...]  # every IPv4 InternalIP/ExternalIP
    pod_cidrs: tuple[str, ...]


def parse_node(obj: Obj, warn: Callable[[str], None] | None = None) -> NodeInfo | None:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        return None
    warn = warn or (lambda _m: None)
    internal: str | None = None
    external: str | None = None
    addrs: list[str] = []
    for i, a in enumerate((obj.get("status") or {}).get("addresses") or []):
        if not isinstance(a, dict):
            continue
        kind, ip = a.get("type"), a.get("address")
        if kind not in ("InternalIP", "ExternalIP") or not isinstance(ip, str) or ":" in ip:
            continue
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            warn(f"status.addresses[{i}].address: not an IP address: {ip!r}")
            continue
        if ip not in addrs:
            addrs.append(ip)
        if kind == "InternalIP" and internal is None:
            internal = ip
        if kind == "ExternalIP" and external is None:
            external = ip
    spec = obj.get("spec") or {}
    raw = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    cidrs: list[str] = []
    for i, c in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(c, str) or ":" in c:
            continue
        v = valid_cidr(c)
        if v is None:
            warn(f"spec.podCIDRs[{i}]: not a CIDR: {c!r}")
        elif v not in cidrs:
            cidrs.append(v)
    return NodeInfo(name, internal or external, tuple(addrs), tuple(cidrs))


def _ipc_key(prefix: str) -> IpcacheKey:
    net = ipaddress.IPv4Network(prefix)
    return IpcacheKey(
        prefixlen=IPCACHE_STATIC_PREFIX + net.prefixlen, addr=ip_to_be32(str(net.network_address))
    )


def _ipc_value(e: IpcEntry) -> RemoteEndpointInfo:
    return RemoteEndpointInfo(sec_identity=e[0], tunnel_endpoint=ip_to_be32(e[1]) if e[1] else 0, flags=e[2])


class NodeManager:
    def __init__(
        self,
        *,
        node_name: str,
        bpf_root: str | None,
        routing_mode: str = "native",
        tunnel_ifindex: int | None = None,
        route_proto: int = RTPROT_PYCILIUM,
        netns: str | None = None,
        on_pod_cidrs: Callable[[list[str]], None] | None = None,
        on_nodes_changed: Callable[[set[str]], None] | None = None,
        resync_interval: float = 60.0,
    ) -> None:
        self.node_name = node_name
        self.bpf_root = bpf_root
        self.routing_mode = routing_mode
        self.routes = RouteProgrammer(proto=route_proto, netns=netns)
        self.routes.oif = tunnel_ifindex if routing_mode == "tunnel" else None
        self.on_pod_cidrs = on_pod_cidrs
        self.on_nodes_changed = on_nodes_changed
        self.resync_interval = resync_interval
        self.synced = threading.Event()  # first reconcile after every source synced
        self.route_errors: dict[str, str] = {}
        self.installed_routes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self._gen_in = 0
        self._gen_done = -1
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sources: list[HasSynced] = []
        self._ipcache: PinnedMap[IpcacheKey, RemoteEndpointInfo] | None = None
        self._ipc_written: dict[str, IpcEntry] = {}  # prefix -> entry we own (as written)
        self._own_cidrs: tuple[str, ...] = ()
        self._addr_sig: dict[str, tuple[str | None, tuple[str, ...]]] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Iterable[HasSynced] = ()) -> None:
        if self._thread is not None:
            return
        self._sources = list(sources)
        if self.bpf_root is not None:
            self._ipcache = PinnedMap(IPCACHE, self.bpf_root)
            self._adopt_ipcache()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="node-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; routes and ipcache entries stay (the datapath keeps forwarding)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._ipcache is not None:
            self._ipcache.close()
            self._ipcache = None

    def flush(self, timeout: float = 10.0) -> bool:
        with self._lock:
            target = self._gen_in
        with self._cond:
            return self._cond.wait_for(lambda: self.synced.is_set() and self._gen_done >= target, timeout)

    # --- handlers and queries -----------------------------------------------------------------

    def handlers(self) -> Handlers:
        return Handlers(
            on_add=self.on_node, on_update=lambda _o, n: self.on_node(n), on_delete=self.on_node_deleted
        )

    def on_node(self, obj: Obj) -> None:
        name = (obj.get("metadata") or {}).get("name") or ""
        info = parse_node(obj, lambda m: log.warning("Node %s: %s", name, m))
        if info is None:
            return
        with self._lock:
            if self._nodes.get(info.name) == info:
                return
            self._nodes[info.name] = info
            self._gen_in += 1
        if info.name == self.node_name:
            self._own_changed(info.pod_cidrs)
        self._wake.set()

    def on_node_deleted(self, obj: Obj) -> None:
        name = (obj.get("metadata") or {}).get("name") or ""
        with self._lock:
            if self._nodes.pop(name, None) is None:
                return
            self._gen_in += 1
        self._wake.set()

    def _own_changed(self, cidrs: tuple[str, ...]) -> None:
        if cidrs == self._own_cidrs:
            return
        self._own_cidrs = cidrs
        log.info("this node's pod CIDRs: %s", ", ".join(cidrs) or "none")
        if self.on_pod_cidrs is not None:
            try:
                self.on_pod_cidrs(list(cidrs))
            except Exception:
                log.exception("on_pod_cidrs callback failed")

    @property
    def own_pod_cidrs(self) -> list[str]:
        return list(self._own_cidrs)

    @property
    def own_node(self) -> NodeInfo | None:
        with self._lock:
            return self._nodes.get(self.node_name)

    def node_ip_of(self, name: str) -> str | None:
        with self._lock:
            n = self._nodes.get(name)
        return n.internal_ip if n is not None else None

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda n: n.name)

    # --- desired state ------------------------------------------------------------------------

    def desired_routes(self) -> dict[str, str]:
        tunnel = self.routing_mode == "tunnel"
        if tunnel and self.routes.oif is None:
            return {}  # tunnel mode without its device (yet): nothing can be routed
        own = set(self._own_cidrs)
        out: dict[str, str] = {}
        for n in self.nodes():
            if n.name == self.node_name or not n.internal_ip:
                continue
            for c in n.pod_cidrs:
                if c in own:
                    log.warning("Node %s: pod CIDR %s overlaps this node's; no route", n.name, c)
                    continue
                out[c] = TUNNEL_GATEWAY if tunnel else n.internal_ip
        return out

    def desired_ipcache(self) -> dict[str, IpcEntry]:
        out: dict[str, IpcEntry] = {WORLD: (ID_WORLD, "", 0)}
        nodes = self.nodes()
        for n in nodes:  # this node wins over a remote node claiming the same address
            own = n.name == self.node_name
            for ip in n.addresses:
                key = f"{ip}/32"
                if own:
                    out[key] = (ID_HOST, "", 0)
                elif key not in out:
                    out[key] = (ID_REMOTE_NODE, "", IPCACHE_F_REMOTE_NODE)
        for n in nodes:
            if n.name == self.node_name:
                for ip in n.addresses:
                    out[f"{ip}/32"] = (ID_HOST, "", 0)
        return out

    # --- worker -------------------------------------------------------------------------------

    def _adopt_ipcache(self) -> None:
        """Entries a previous run wrote: node addresses (host/remote-node /32) and the world prefix."""
        assert self._ipcache is not None
        for k, v in self._ipcache.items():
            plen = k.prefixlen - IPCACHE_STATIC_PREFIX
            prefix = f"{be32_to_ip(k.addr)}/{plen}"
            ident = v.sec_identity
            if (plen == 32 and ident in (ID_HOST, ID_REMOTE_NODE)) or (plen == 0 and ident == ID_WORLD):
                tun = be32_to_ip(v.tunnel_endpoint) if v.tunnel_endpoint else ""
                self._ipc_written[prefix] = (ident, tun, v.flags)

    def _run(self) -> None:
        last_gen, last_synced, next_resync = -1, False, 0.0
        while not self._stop.is_set():
            all_synced = all(s.synced.is_set() for s in self._sources)
            with self._lock:
                gen = self._gen_in
            now = time.monotonic()
            due = now >= next_resync
            if gen != last_gen or all_synced != last_synced or due:
                try:
                    self._reconcile(delete_stale=all_synced)
                    if due and all_synced:
                        repaired = self.verify_ipcache()
                        if repaired:
                            log.warning("nodes: repaired %d ipcache entries", repaired)
                except Exception:
                    log.exception("node reconcile failed")
                last_gen, last_synced = gen, all_synced
                next_resync = now + self.resync_interval
                if all_synced and not self.synced.is_set():
                    self.synced.set()
                    log.info("nodes: synced (%d nodes)", len(self._nodes))
                with self._cond:
                    self._gen_done = max(self._gen_done, gen)
                    self._cond.notify_all()
                self._notify_address_changes()
            self._wake.wait(max(0.0, next_resync - time.monotonic()) if all_synced else 0.05)
            self._wake.clear()

    def resync(self) -> None:
        """Re-apply everything now (also done every resync_interval)."""
        with self._lock:
            self._gen_in += 1
        self._wake.set()

    def _reconcile(self, *, delete_stale: bool) -> None:
        installed, failed = self.routes.apply(self.desired_routes(), delete_stale=delete_stale)
        self.installed_routes = installed
        for dst, err in failed.items():
            if self.route_errors.get(dst) != err:
                log.warning("route %s: %s (retried on the next resync)", dst, err)
        self.route_errors = failed
        if self._ipcache is None:
            return
        want = self.desired_ipcache()
        for prefix, e in want.items():
            if self._ipc_written.get(prefix) == e:
                continue
            self._ipcache.update(_ipc_key(prefix), _ipc_value(e))
            self._ipc_written[prefix] = e
        if delete_stale:
            for prefix in [p for p in self._ipc_written if p not in want]:
                self._ipcache.delete(_ipc_key(prefix))
                del self._ipc_written[prefix]

    def verify_ipcache(self) -> int:
        """Re-write every owned entry that differs in the map (drift); returns the repairs."""
        if self._ipcache is None:
            return 0
        n = 0
        for prefix, e in self._ipc_written.items():
            got = self._ipcache.lookup(_ipc_key(prefix))
            want = _ipc_value(e)
            if got is None or bytes(got) != bytes(want):
                self._ipcache.update(_ipc_key(prefix), want)
                n += 1
        return n

    def _notify_address_changes(self) -> None:
        sig = {n.name: (n.internal_ip, n.addresses) for n in self.nodes()}
        if sig == self._addr_sig:
            return
        changed = {k for k in sig.keys() | self._addr_sig.keys() if sig.get(k) != self._addr_sig.get(k)}
        self._addr_sig = sig
        if self.on_nodes_changed is not None:
            try:
                self.on_nodes_changed(changed)
            except Exception:
                log.exception("on_nodes_changed callback failed")
