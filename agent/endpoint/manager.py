"""The endpoint manager: creates, checks, deletes and restores pod network endpoints.

ADD builds, in order (anything half-created is rolled back on failure):
  1. an address from IPAM for the owner ``<containerID>/<ifname>``, and an endpoint id (1..65535);
  2. a veth pair: host side ``lxc<hash>`` in the node netns, peer created directly inside the pod
     netns with the name CNI_IFNAME; MTU from the network config or the agent config;
  3. host side: forwarding on, rp_filter off, up, route ``<ip>/32 dev lxc<hash>``;
  4. pod side: ``<ip>/32``, up, ``default via 169.254.1.1 dev <ifname> onlink`` and a permanent
     neighbour entry 169.254.1.1 -> host veth MAC (the host veth answers for the gateway, so no
     proxy ARP is needed and everything the pod sends goes to the host veth);
  5. the endpoints map entry (pod IP -> host ifindex, endpoint id, pod MAC, host MAC, identity);
  6. the lxc datapath programs on the host veth (EndpointDatapath hook);
  7. the endpoint state file ``<state_dir>/endpoints/<containerID>.json`` (atomic write).

Other subsystems learn about endpoints through `subscribe()` and change an endpoint's identity and
policy flags through `update()`, which rewrites the endpoints map entry.

Every method that touches netlink is synchronous: call it from a worker thread (the CNI API server's
request threads, ``asyncio.to_thread``); called from a thread with a running asyncio loop it moves
itself to a helper thread (blocking that loop meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pycilium.agent.endpoint import netlink as nl
from pycilium.agent.endpoint.datapath import EndpointDatapath, NoopDatapath
from pycilium.agent.endpoint.model import (
    EP_F_HOST,
    GATEWAY_IP,
    ID_INIT,
    MAX_ENDPOINT_ID,
    MIN_ENDPOINT_ID,
    Endpoint,
    host_ifname,
)
from pycilium.agent.ipam import HostScopeIPAM, IPAMError, owner_key
from pycilium.bpf.maps.endpointmap import ENDPOINTS, EndpointInfo, EndpointKey
from pycilium.bpf.maps.pinned import PinnedMap
from pycilium.bpf.maps.util import be32_to_ip, ip_to_be32, mac_bytes, mac_str
from pycilium.cni import protocol as cniproto
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pycilium.endpoint")
T = TypeVar("T")
EndpointCallback = Callable[[Endpoint], None]
IdentityResolver = Callable[[str, str], "int | None"]


class EndpointError(Exception):
    """An endpoint operation failed; `cni_code` is the CNI error code the plugin reports."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.cni_code = code
        self.msg = msg
        self.details = details


# ---- the endpoints map ---------------------------------------------------------------------------


class EndpointMapWriter(Protocol):
    def write(self, ep: Endpoint) -> None: ...
    def delete(self, ip: str) -> bool: ...
    def lookup(self, ip: str) -> EndpointInfo | None: ...
    def entries(self) -> list[tuple[str, EndpointInfo]]: ...


class EndpointMap:
    """The pinned ``endpoints`` BPF map: pod IP -> EndpointInfo."""

    def __init__(self, bpf_root: str | os.PathLike[str]):
        self._map = PinnedMap(ENDPOINTS, bpf_root)

    @staticmethod
    def info_for(ep: Endpoint) -> EndpointInfo:
        info = EndpointInfo()
        info.ifindex = ep.host_ifindex
        info.lxc_id = ep.id
        info.flags = ep.flags
        info.mac[:] = list(mac_bytes(ep.pod_mac))
        info.node_mac[:] = list(mac_bytes(ep.host_mac))
        info.sec_id = ep.identity
        return info

    def write(self, ep: Endpoint) -> None:
        self._map.update(EndpointKey(ip_to_be32(ep.ipv4)), self.info_for(ep))

    def delete(self, ip: str) -> bool:
        return self._map.delete(EndpointKey(ip_to_be32(ip)))

    def lookup(self, ip: str) -> EndpointInfo | None:
        return self._map.lookup(EndpointKey(ip_to_be32(ip)))

    def entries(self) -> list[tuple[str, EndpointInfo]]:
        return [(be32_to_ip(k.ip), v) for k, v in self._map.items()]

    def close(self) -> None:
        self._map.close()


# ---- requests and reports ------------------------------------------------------------------------


@dataclass
class AddRequest:
    container_id: str
    ifname: str
    netns: str
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    mtu: int | None = None  # None: the agent's configured MTU

    @property
    def owner(self) -> str:
        return owner_key(self.container_id, self.ifname)


@dataclass
class GCReport:
    removed_endpoints: list[Endpoint] = field(default_factory=list)
    released_ips: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ---- the manager ---------------------------------------------------------------------------------


class EndpointManager:
    """Owns this node's pod endpoints: netlink state, endpoints map entries, state files."""

    def __init__(
        self,
        ipam: HostScopeIPAM,
        *,
        state_dir: str | os.PathLike[str],
        bpf_root: str | os.PathLike[str] | None = None,
        endpoints_map: EndpointMapWriter | None = None,
        datapath: EndpointDatapath | None = None,
        mtu: int = 1500,
        identity_resolver: IdentityResolver | None = None,
    ):
        if endpoints_map is None:
            if bpf_root is None:
                raise ValueError("EndpointManager needs bpf_root or endpoints_map")
            endpoints_map = EndpointMap(bpf_root)
        self.ipam = ipam
        self.endpoints_map = endpoints_map
        self.datapath: EndpointDatapath = datapath if datapath is not None else NoopDatapath()
        self.mtu = mtu
        self.identity_resolver = identity_resolver
        self.state_dir = Path(state_dir) / "endpoints"
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        self._by_id: dict[int, Endpoint] = {}
        self._by_owner: dict[str, int] = {}
        self._reserved_ids: set[int] = set()
        self._inflight: set[str] = set()
        self._last_id = MIN_ENDPOINT_ID - 1
        self._on_added: list[EndpointCallback] = []
        self._on_removed: list[EndpointCallback] = []

    @classmethod
    def from_config(
        cls,
        config: Any,
        ipam: HostScopeIPAM,
        datapath: EndpointDatapath | None = None,
        *,
        endpoints_map: EndpointMapWriter | None = None,
        identity_resolver: IdentityResolver | None = None,
    ) -> EndpointManager:
        """Build from an AgentConfig (state_dir, bpf_root, mtu)."""
        return cls(ipam, state_dir=config.state_dir, bpf_root=config.bpf_root, endpoints_map=endpoints_map,
                   datapath=datapath, mtu=config.pod_mtu, identity_resolver=identity_resolver)  # fmt: skip

    # ---- listeners -----------------------------------------------------------------------------
    def subscribe(
        self,
        on_added: EndpointCallback | None = None,
        on_removed: EndpointCallback | None = None,
        *,
        replay: bool = True,
    ) -> Callable[[], None]:
        """Call `on_added` / `on_removed` for every endpoint added / removed from now on.

        With `replay`, `on_added` is called at once for every current endpoint. Callbacks run in the
        thread doing the operation, get a copy of the endpoint and must not block; exceptions are
        logged. Returns a function that unsubscribes.
        """
        with self._lock:
            if on_added is not None:
                self._on_added.append(on_added)
            if on_removed is not None:
                self._on_removed.append(on_removed)
            current = [dataclasses.replace(e) for e in self._by_id.values()] if replay and on_added else []
        for ep in current:
            self._call(on_added, ep)  # type: ignore[arg-type]

        def unsubscribe() -> None:
            with self._lock:
                if on_added is not None and on_added in self._on_added:
                    self._on_added.remove(on_added)
                if on_removed is not None and on_removed in self._on_removed:
                    self._on_removed.remove(on_removed)

        return unsubscribe

    @staticmethod
    def _call(cb: EndpointCallback, ep: Endpoint) -> None:
        try:
            cb(ep)
        except Exception:
            log.exception("endpoint listener failed", extra={"endpoint": ep.id})

    def _notify(self, added: bool, ep: Endpoint) -> None:
        with self._lock:
            cbs = list(self._on_added if added else self._on_removed)
        for cb in cbs:
            self._call(cb, dataclasses.replace(ep))

    # ---- queries -------------------------------------------------------------------------------
    def list_endpoints(self) -> list[Endpoint]:
        with self._lock:
            return [dataclasses.replace(e) for _, e in sorted(self._by_id.items())]

    def get(self, endpoint_id: int) -> Endpoint | None:
        with self._lock:
            ep = self._by_id.get(endpoint_id)
            return dataclasses.replace(ep) if ep else None

    def get_by_container(self, container_id: str, ifname: str = "eth0") -> Endpoint | None:
        with self._lock:
            i = self._by_owner.get(owner_key(container_id, ifname))
            return self.get(i) if i is not None else None

    def get_by_ip(self, ip: str) -> Endpoint | None:
        with self._lock:
            for ep in self._by_id.values():
                if ep.ipv4 == ip:
                    return dataclasses.replace(ep)
        return None

    def get_by_pod(self, namespace: str, name: str) -> list[Endpoint]:
        with self._lock:
            return [dataclasses.replace(e) for e in self._by_id.values()
                    if e.pod_namespace == namespace and e.pod_name == name]  # fmt: skip

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    # ---- updates from other subsystems ---------------------------------------------------------
    def update(self, endpoint_id: int, *, identity: int | None = None, flags: int | None = None) -> Endpoint:
        """Set an endpoint's security identity and/or EP_F_* flags; rewrites its map entry."""
        with self._lock:
            ep = self._by_id.get(endpoint_id)
            if ep is None:
                raise KeyError(f"no endpoint {endpoint_id}")
            new = dataclasses.replace(ep)
            if identity is not None:
                new.identity = identity
            if flags is not None:
                if not 0 <= flags <= 0xFFFF:
                    raise ValueError(f"flags out of range: {flags:#x}")
                new.flags = flags
            if (new.identity, new.flags) == (ep.identity, ep.flags):
                return dataclasses.replace(ep)
            self.endpoints_map.write(new)
            self._persist(new)
            self._by_id[endpoint_id] = new
            return dataclasses.replace(new)

    def set_identity(self, endpoint_id: int, identity: int) -> Endpoint:
        return self.update(endpoint_id, identity=identity)

    def set_flags(self, endpoint_id: int, flags: int) -> Endpoint:
        return self.update(endpoint_id, flags=flags)

    # ---- persistence ---------------------------------------------------------------------------
    def _state_file(self, container_id: str, ifname: str) -> Path:
        return self.state_dir / cniproto.attachment_filename(container_id, ifname)

    def _persist(self, ep: Endpoint) -> None:
        cniproto.atomic_write_json(self._state_file(ep.container_id, ep.ifname), ep.to_dict(), pretty=True)

    def _unpersist(self, ep: Endpoint) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._state_file(ep.container_id, ep.ifname).unlink()

    # ---- ids -----------------------------------------------------------------------------------
    def _alloc_id(self) -> int:
        with self._lock:
            span = MAX_ENDPOINT_ID - MIN_ENDPOINT_ID + 1
            for i in range(span):
                cand = MIN_ENDPOINT_ID + (self._last_id + 1 - MIN_ENDPOINT_ID + i) % span
                if cand not in self._by_id and cand not in self._reserved_ids:
                    self._reserved_ids.add(cand)
                    self._last_id = cand
                    return cand
        raise EndpointError(cniproto.ERR_INTERNAL, "no free endpoint id (65535 endpoints on this node)")

    def _free_id(self, ep_id: int) -> None:
        with self._lock:
            self._reserved_ids.discard(ep_id)

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` here, or in a helper thread when this thread runs an asyncio loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["r"] = fn(*args, **kwargs)
            except BaseException as e:
                box["e"] = e

        t = threading.Thread(target=target, name="pycilium-endpoint")
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        return box["r"]  # type: ignore[no-any-return]

    def _begin(self, owner: str) -> None:
        with self._lock:
            if owner in self._inflight:
                raise EndpointError(cniproto.ERR_TRY_AGAIN_LATER,
                                    f"another operation on {owner} is in progress, try again later")  # fmt: skip
            self._inflight.add(owner)

    def _end(self, owner: str) -> None:
        with self._lock:
            self._inflight.discard(owner)

    # ---- ADD -----------------------------------------------------------------------------------
    def add(self, req: AddRequest) -> Endpoint:
        """Create the endpoint for a pod interface; raises EndpointError / IPAMError (with cni_code)."""
        return self._off_loop(self._add, req)

    def _add(self, req: AddRequest) -> Endpoint:
        owner = req.owner
        self._begin(owner)
        try:
            old = self.get_by_container(req.container_id, req.ifname)
            if old is not None:
                log.warning("ADD for an existing endpoint: replacing it",
                            extra={"endpoint": old.id, "container": req.container_id})  # fmt: skip
                self._teardown(old)
                self._notify(False, old)
            ep = self._create(req)
        finally:
            self._end(owner)
        log.info("endpoint created", extra={"endpoint": ep.id, "ip": ep.ipv4, "pod": ep.pod,
                                            "host_ifname": ep.host_ifname})  # fmt: skip
        self._notify(True, ep)
        return dataclasses.replace(ep)

    def _create(self, req: AddRequest) -> Endpoint:
        undo: list[tuple[str, Callable[[], object]]] = []
        pod = f"{req.pod_namespace}/{req.pod_name}" if req.pod_name else ""
        host = host_ifname(req.container_id, req.ifname)
        mtu = req.mtu or self.mtu
        try:
            ip = self.ipam.allocate(req.owner, pod)
            undo.append(("release IP", lambda: self.ipam.release(req.owner)))
            ep_id = self._alloc_id()
            undo.append(("free endpoint id", lambda: self._free_id(ep_id)))
            with nl.Rtnl() as rt:
                if nl.delete_link(rt, host):
                    log.warning("removed a stale host veth", extra={"host_ifname": host})
                nsfd = nl.open_netns(req.netns)
                try:
                    if not _is_netns(nsfd):
                        raise EndpointError(cniproto.ERR_NETNS, f"{req.netns} is not a network namespace")
                    link = self._create_veth(rt, host, req, nsfd, mtu)
                    undo.append(("delete veth", lambda: nl.delete_host_link(host)))
                    nl.setup_host_side(rt, link, ip)
                    with nl.Rtnl.inside(nsfd, req.netns) as pod_rt:
                        pod_mac = nl.setup_pod_side(
                            pod_rt, req.ifname, link.peer_index, ip, GATEWAY_IP, link.mac
                        )
                finally:
                    os.close(nsfd)
            identity = ID_INIT
            if self.identity_resolver is not None and req.pod_name:
                try:
                    identity = self.identity_resolver(req.pod_namespace, req.pod_name) or ID_INIT
                except Exception:
                    log.exception("identity resolver failed", extra={"pod": pod})
            ep = Endpoint(id=ep_id, container_id=req.container_id, ifname=req.ifname, netns=req.netns, ipv4=ip,
                          host_ifname=host, host_ifindex=link.index, host_mac=link.mac, pod_mac=pod_mac, mtu=mtu,
                          pod_namespace=req.pod_namespace, pod_name=req.pod_name, pod_uid=req.pod_uid,
                          identity=identity, flags=0, created=time.time())  # fmt: skip
            self.endpoints_map.write(ep)
            undo.append(("delete map entry", lambda: self.endpoints_map.delete(ip)))
            undo.append(("detach programs", lambda: self.datapath.detach(host)))  # also a partial attach
            self.datapath.attach(host)
            self._persist(ep)
            undo.append(("remove state file", lambda: self._unpersist(ep)))
            with self._lock:
                self._by_id[ep.id] = ep
                self._by_owner[req.owner] = ep.id
                self._reserved_ids.discard(ep.id)
            return ep
        except BaseException as e:
            for what, fn in reversed(undo):
                try:
                    fn()
                except Exception as ue:
                    log.error("rollback step failed", extra={"step": what, "error": str(ue)})
            log.warning("ADD failed, rolled back", extra={"container": req.container_id, "error": str(e),
                                                          "steps": [w for w, _ in undo]})  # fmt: skip
            raise self._translate(e, req) from e

    @staticmethod
    def _create_veth(rt: nl.Rtnl, host: str, req: AddRequest, nsfd: int, mtu: int) -> nl.LinkInfo:
        try:
            return nl.create_veth(rt, host, req.ifname, nsfd, mtu)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise EndpointError(cniproto.ERR_INTERFACE_EXISTS,
                                    f"interface {req.ifname} already exists in {req.netns}") from None  # fmt: skip
            raise

    @staticmethod
    def _translate(e: BaseException, req: AddRequest) -> BaseException:
        if isinstance(e, EndpointError | IPAMError) or not isinstance(e, Exception):
            return e
        if isinstance(e, nl.NetnsError):
            return EndpointError(cniproto.ERR_NETNS, str(e))
        if isinstance(e, NetlinkError):
            return EndpointError(cniproto.ERR_DATAPATH, f"netlink: {e}", f"container {req.container_id}")
        if isinstance(e, OSError):
            return EndpointError(cniproto.ERR_DATAPATH, f"{e}", f"container {req.container_id}")
        return EndpointError(cniproto.ERR_INTERNAL, f"{type(e).__name__}: {e}")

    # ---- DEL -----------------------------------------------------------------------------------
    def delete(self, container_id: str, ifname: str = "eth0") -> Endpoint | None:
        """Remove the endpoint (idempotent: unknown containers and vanished netns are fine)."""
        return self._off_loop(self._delete, container_id, ifname)

    def _delete(self, container_id: str, ifname: str) -> Endpoint | None:
        owner = owner_key(container_id, ifname)
        self._begin(owner)
        try:
            ep = self.get_by_container(container_id, ifname)
            if ep is None:
                self._cleanup_unknown(container_id, ifname)
                return None
            self._teardown(ep)
        finally:
            self._end(owner)
        log.info("endpoint deleted", extra={"endpoint": ep.id, "ip": ep.ipv4, "pod": ep.pod})
        self._notify(False, ep)
        return ep

    def _cleanup_unknown(self, container_id: str, ifname: str) -> None:
        """No state for this attachment: release whatever might be left of a crashed ADD."""
        ip = self.ipam.release(owner_key(container_id, ifname))
        if ip is not None:
            with contextlib.suppress(OSError):
                self.endpoints_map.delete(ip)
        nl.delete_host_link(host_ifname(container_id, ifname))

    def _teardown(self, ep: Endpoint) -> None:
        # unregister first: an update() racing with us must not rewrite the map entry we delete
        with self._lock:
            self._by_id.pop(ep.id, None)
            self._by_owner.pop(ep.owner, None)
        errors: list[str] = []
        try:
            self.datapath.detach(ep.host_ifname)
        except Exception as e:
            errors.append(f"detach: {e}")
        cur = self.endpoints_map.lookup(ep.ipv4)
        if cur is not None and cur.lxc_id == ep.id:
            self.endpoints_map.delete(ep.ipv4)
        with nl.Rtnl() as rt:
            link = nl.link_info(rt, ep.host_ifname)
            if link is not None and link.index == ep.host_ifindex:
                nl.delete_link_index(rt, link.index)
        self.ipam.release(ep.owner)
        self._unpersist(ep)
        if errors:
            log.warning("endpoint teardown: ignored errors", extra={"endpoint": ep.id, "errors": errors})

    # ---- CHECK ---------------------------------------------------------------------------------
    def check(
        self, container_id: str, ifname: str = "eth0", prev_result: dict[str, Any] | None = None
    ) -> None:
        """Verify the endpoint is as ADD left it; EndpointError(ERR_CHECK_FAILED) lists every problem."""
        self._off_loop(self._check, container_id, ifname, prev_result)

    def _check(self, container_id: str, ifname: str, prev_result: dict[str, Any] | None) -> None:
        ep = self.get_by_container(container_id, ifname)
        if ep is None:
            raise EndpointError(cniproto.ERR_UNKNOWN_CONTAINER,
                                f"no endpoint for container {container_id} interface {ifname}")  # fmt: skip
        problems: list[str] = []
        if prev_result:
            addrs = {
                str(i.get("address", "")).split("/")[0]
                for i in prev_result.get("ips", [])
                if isinstance(i, dict)
            }
            if addrs and ep.ipv4 not in addrs:
                problems.append(f"prevResult lists {sorted(addrs)}, the endpoint has {ep.ipv4}")
        if self.ipam.lookup(ep.owner) != ep.ipv4:
            problems.append(f"IPAM does not hold {ep.ipv4} for {ep.owner}")
        with nl.Rtnl() as rt:
            link = nl.link_info(rt, ep.host_ifname)
            if link is None:
                problems.append(f"host veth {ep.host_ifname} is missing")
            else:
                if link.index != ep.host_ifindex:
                    problems.append(
                        f"host veth {ep.host_ifname} has ifindex {link.index}, expected {ep.host_ifindex}"
                    )
                if not link.up:
                    problems.append(f"host veth {ep.host_ifname} is down")
                if not nl.host_route_ok(rt, link.index, ep.ipv4):
                    problems.append(f"no route {ep.ipv4}/32 dev {ep.host_ifname}")
        info = self.endpoints_map.lookup(ep.ipv4)
        if info is None:
            problems.append(f"endpoints map has no entry for {ep.ipv4}")
        else:
            want = EndpointMap.info_for(ep)
            if bytes(info) != bytes(want):
                problems.append(f"endpoints map entry for {ep.ipv4} differs (ifindex {info.ifindex}, "
                                f"lxc_id {info.lxc_id}, mac {mac_str(bytes(info.mac))})")  # fmt: skip
        attached = getattr(self.datapath, "attached", None)
        if callable(attached) and link is not None and not attached(ep.host_ifname):
            problems.append(f"datapath programs are not attached to {ep.host_ifname}")
        try:
            with nl.Rtnl.at(ep.netns) as pod_rt:
                view = nl.inspect_pod(pod_rt, ep.ifname)
        except nl.NetnsError as e:
            problems.append(str(e))
        else:
            problems.extend(self._check_pod(ep, view))
        if problems:
            raise EndpointError(cniproto.ERR_CHECK_FAILED,
                                f"endpoint {ep.id} ({ep.pod or container_id}) is not healthy: {problems[0]}",
                                "; ".join(problems))  # fmt: skip

    @staticmethod
    def _check_pod(ep: Endpoint, view: nl.PodView) -> list[str]:
        if view.link is None:
            return [f"interface {ep.ifname} is missing in {ep.netns}"]
        out = []
        if not view.link.up:
            out.append(f"interface {ep.ifname} is down")
        if view.link.mtu != ep.mtu:
            out.append(f"interface {ep.ifname} has MTU {view.link.mtu}, expected {ep.mtu}")
        if f"{ep.ipv4}/32" not in view.addresses:
            out.append(
                f"interface {ep.ifname} lacks {ep.ipv4}/32 (has {', '.join(view.addresses) or 'none'})"
            )
        if view.default_gw != GATEWAY_IP or view.default_oif != view.link.index:
            out.append(f"no default route via {GATEWAY_IP} dev {ep.ifname}")
        neigh = view.neighbours.get(GATEWAY_IP)
        if neigh is None or neigh[0].lower() != ep.host_mac.lower() or not neigh[1] & nl.NUD_PERMANENT:
            out.append(f"no permanent neighbour {GATEWAY_IP} lladdr {ep.host_mac}")
        return out

    # ---- GC ------------------------------------------------------------------------------------
    def gc(self, valid_attachments: Iterable[tuple[str, str]]) -> GCReport:
        """Remove endpoints and IPAM allocations whose (containerID, ifname) is not listed."""
        return self._off_loop(self._gc, valid_attachments)

    def _gc(self, valid_attachments: Iterable[tuple[str, str]]) -> GCReport:
        valid = {owner_key(c, i) for c, i in valid_attachments}
        report = GCReport()
        for ep in self.list_endpoints():
            if ep.owner in valid:
                continue
            try:
                if self.delete(ep.container_id, ep.ifname) is not None:
                    report.removed_endpoints.append(ep)
            except Exception as e:
                report.errors.append(f"{ep.owner}: {e}")
        with self._lock:
            keep = valid | set(self._inflight) | set(self._by_owner)
        for a in self.ipam.gc(keep):
            report.released_ips.append(a.ip)
            with contextlib.suppress(OSError):
                info = self.endpoints_map.lookup(a.ip)
                if info is not None and not info.flags & EP_F_HOST:
                    self.endpoints_map.delete(a.ip)
        if report.removed_endpoints or report.released_ips:
            log.info("CNI GC", extra={"removed": [e.owner for e in report.removed_endpoints],
                                      "released": report.released_ips})  # fmt: skip
        return report

    # ---- restore -------------------------------------------------------------------------------
    def restore(self, *, release_leaked: bool = True, prune_map: bool = True) -> list[Endpoint]:
        """Reload endpoints from the state files after an agent restart.

        For each: the host veth must still exist (else the pod went away while the agent was down:
        its address, map entry and file are cleaned up); its address is re-claimed in IPAM, its
        route and sysctls re-asserted, its map entry rewritten and the programs re-attached. With
        `release_leaked`, IPAM allocations without an endpoint (a crash in the middle of an ADD) are
        released; with `prune_map`, endpoints map entries of no endpoint are deleted (EP_F_HOST
        entries are kept). Listeners get `on_added` for every restored endpoint.
        """
        return self._off_loop(self._restore, release_leaked, prune_map)

    def _restore(self, release_leaked: bool, prune_map: bool) -> list[Endpoint]:
        restored: list[Endpoint] = []
        files = sorted(p for p in self.state_dir.glob("*.json") if not p.name.startswith("."))
        for tmp in self.state_dir.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        with nl.Rtnl() as rt:
            for path in files:
                try:
                    ep = Endpoint.from_dict(json.loads(path.read_text()))
                except (OSError, ValueError, TypeError) as e:
                    log.error(
                        "unreadable endpoint state file: skipped", extra={"file": str(path), "error": str(e)}
                    )
                    continue
                try:
                    if self._restore_one(rt, ep):
                        restored.append(ep)
                except Exception as e:
                    log.error("endpoint restore failed", extra={"endpoint": ep.id, "error": str(e)})
        if release_leaked:
            with self._lock:
                keep = set(self._by_owner) | set(self._inflight)
            for a in self.ipam.gc(keep):
                log.warning("released an address without endpoint", extra={"ip": a.ip, "owner": a.owner})
        if prune_map:
            with self._lock:
                live = {e.ipv4 for e in self._by_id.values()}
            for ip, info in self.endpoints_map.entries():
                if ip not in live and not info.flags & EP_F_HOST:
                    self.endpoints_map.delete(ip)
                    log.info("pruned a stale endpoints map entry", extra={"ip": ip, "lxc_id": info.lxc_id})
        for ep in restored:
            self._notify(True, ep)
        log.info("endpoints restored", extra={"count": len(restored)})
        return [dataclasses.replace(e) for e in restored]

    def _restore_one(self, rt: nl.Rtnl, ep: Endpoint) -> bool:
        link = nl.link_info(rt, ep.host_ifname)
        netns_gone = _netns_gone(ep.netns)
        if link is None or link.kind != "veth" or netns_gone:
            reason = "netns" if netns_gone else "veth"
            log.info(f"endpoint's {reason} is gone: cleaning up", extra={"endpoint": ep.id, "pod": ep.pod})
            if link is not None and link.kind == "veth":
                # the kernel tears a deleted netns down asynchronously: do not wait for it
                nl.delete_link_index(rt, link.index)
            if self.ipam.lookup(ep.owner) == ep.ipv4:
                self.ipam.release(ep.owner)
            cur = self.endpoints_map.lookup(ep.ipv4)
            if cur is not None and cur.lxc_id == ep.id:
                self.endpoints_map.delete(ep.ipv4)
            self._unpersist(ep)
            return False
        with self._lock:
            if ep.id in self._by_id or not MIN_ENDPOINT_ID <= ep.id <= MAX_ENDPOINT_ID:
                log.error("duplicate or invalid endpoint id in state: skipped", extra={"endpoint": ep.id})
                return False
        self.ipam.claim(ep.ipv4, ep.owner, ep.pod)
        if (link.index, link.mac) != (ep.host_ifindex, ep.host_mac):
            ep.host_ifindex, ep.host_mac = link.index, link.mac
            self._persist(ep)
        nl.setup_host_side(rt, link, ep.ipv4)
        self.endpoints_map.write(ep)
        try:
            self.datapath.attach(ep.host_ifname)
        except Exception as e:
            log.error("re-attaching datapath programs failed", extra={"endpoint": ep.id, "error": str(e)})
        with self._lock:
            self._by_id[ep.id] = ep
            self._by_owner[ep.owner] = ep.id
            self._last_id = max(self._last_id, ep.id)
        return True


def _netns_gone(path: str) -> bool:
    """True when the pod's netns path is missing while its directory is visible to the agent.

    A runtime's pinned netns (``/var/run/netns/cni-...``) disappears when the sandbox goes away.
    Paths whose directory the agent cannot see (``/proc/<pid>/ns/net`` of another PID namespace,
    a runtime directory not mounted into the agent's container) prove nothing and are not trusted.
    """
    if not path or path.startswith("/proc/"):
        return False
    p = Path(path)
    return p.parent.is_dir() and not p.exists()


def _is_netns(fd: int) -> bool:
    try:
        st = os.fstat(fd)
        ns = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return st.st_dev == ns.st_dev  # nsfs files live on the nsfs device
