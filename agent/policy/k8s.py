"""Kubernetes NetworkPolicy (networking.k8s.io/v1) objects parsed into rules.

Semantics (as in the Kubernetes API reference):

- ``podSelector`` chooses the policy's pods in its namespace (``{}``: all of them).
- ``policyTypes`` defaults to ``[Ingress]`` plus ``Egress`` when the ``egress`` list is non-empty.
  A type in ``policyTypes`` makes the selected pods default-deny in that direction; its rule list
  (absent or ``[]``: nothing) lists what is allowed. Rules of a direction not in ``policyTypes``
  are ignored.
- In a rule, absent or empty ``from``/``to`` means every peer, absent or empty ``ports`` every port;
  ``[{}]`` therefore allows everything.
- A peer is ``podSelector`` (pods of the policy's namespace), ``namespaceSelector`` (all pods of the
  matching namespaces), both (the matching pods of the matching namespaces), or ``ipBlock``
  {cidr, except} alone.
- A port has ``protocol`` (TCP default, UDP; SCTP is not supported by this datapath), ``port``
  (number, or a container port name) and ``endPort`` (numeric ports only: the range port..endPort).

Invalid parts are reported and fail closed: an invalid peer or port is dropped, and a rule whose
peers (or ports) were all invalid allows nothing; the policy still selects its pods, so they stay
default-deny in its directions. A policy whose podSelector is invalid is skipped entirely.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from pycilium.agent.policy.selectors import (
    CIDRSelector,
    EndpointSelector,
    LabelSelector,
    PolicyError,
    Selector,
)

PROTOCOLS = {"TCP": 6, "UDP": 17}
PROTO_NAMES = {6: "TCP", 17: "UDP", 0: "ANY"}
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

Obj = dict[str, Any]


@dataclass(frozen=True)
class PortRule:
    protocol: int  # IPPROTO_TCP / IPPROTO_UDP
    port: int | None = None  # None: every port of the protocol
    end_port: int | None = None
    name: str | None = None  # named port, resolved against container ports

    @property
    def protocol_name(self) -> str:
        return PROTO_NAMES.get(self.protocol, str(self.protocol))


@dataclass(frozen=True)
class PeerRule:
    """One ingress/egress rule: peers (None = any) x ports (None = any)."""

    peers: tuple[Selector, ...] | None = None
    ports: tuple[PortRule, ...] | None = None
    # A list was given but every element was invalid: the rule allows nothing.
    void: bool = False

    @property
    def has_named_ports(self) -> bool:
        return any(p.name for p in self.ports or ())


@dataclass(frozen=True)
class ParsedPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    ingress: tuple[PeerRule, ...] | None  # None: the policy does not affect ingress
    egress: tuple[PeerRule, ...] | None
    uid: str = ""
    errors: tuple[str, ...] = field(default=(), compare=False)
    kind: str = "NetworkPolicy"  # or PyCiliumNetworkPolicy (agent/policy/pycilium_crd.py)

    @property
    def key(self) -> str:
        return policy_key(self.kind, self.namespace, self.name)

    def rules(self) -> list[PeerRule]:
        return list(self.ingress or ()) + list(self.egress or ())

    def selectors(self) -> set[Selector]:
        return {s for r in self.rules() for s in (r.peers or ())}

    def cidr_prefixes(self) -> set[ipaddress.IPv4Network]:
        return {p for s in self.selectors() if isinstance(s, CIDRSelector) for p in s.prefixes()}

    def selects(self, namespace: str, labels: dict[str, str] | Any) -> bool:
        return namespace == self.namespace and self.pod_selector.matches(labels)


def policy_key(kind: str, namespace: str, name: str) -> str:
    """How a policy is named in logs, status and `pycilium` output: ``ns/name`` for a NetworkPolicy,
    ``pcnp:ns/name`` for a PyCiliumNetworkPolicy (the two kinds may share names)."""
    return f"{namespace}/{name}" if kind == "NetworkPolicy" else f"pcnp:{namespace}/{name}"


def _port(obj: Any, f: str) -> PortRule:
    if not isinstance(obj, dict):
        raise PolicyError(f, "must be an object")
    proto_name = obj.get("protocol") or "TCP"
    if proto_name == "SCTP":
        raise PolicyError(f"{f}.protocol", "SCTP is not supported by the pycilium datapath")
    if proto_name not in PROTOCOLS:
        raise PolicyError(f"{f}.protocol", f"unknown protocol {proto_name!r} (want TCP or UDP)")
    proto = PROTOCOLS[proto_name]
    port = obj.get("port")
    end = obj.get("endPort")
    if port is None:
        if end is not None:
            raise PolicyError(f"{f}.endPort", "requires port")
        return PortRule(proto)
    if isinstance(port, bool):
        raise PolicyError(f"{f}.port", f"invalid port {port!r}")
    if isinstance(port, str):
        if not _PORT_NAME.match(port) or len(port) > 15:
            raise PolicyError(f"{f}.port", f"invalid port name {port!r}")
        if end is not None:
            raise PolicyError(f"{f}.endPort", "not allowed with a named port")
        return PortRule(proto, name=port)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise PolicyError(f"{f}.port", f"invalid port {port!r}")
    if end is None:
        return PortRule(proto, port)
    if isinstance(end, bool) or not isinstance(end, int) or not port <= end <= 65535:
        raise PolicyError(f"{f}.endPort", f"invalid endPort {end!r} (must be {port}..65535)")
    return PortRule(proto, port, end)


def _peer(obj: Any, f: str, namespace: str) -> Selector | None:
    """A peer as a selector; None for peers this IPv4 datapath can never see (IPv6 blocks)."""
    if not isinstance(obj, dict):
        raise PolicyError(f, "must be an object")
    ipb = obj.get("ipBlock")
    pod_sel = obj.get("podSelector")
    ns_sel = obj.get("namespaceSelector")
    if ipb is not None:
        if pod_sel is not None or ns_sel is not None:
            raise PolicyError(f, "ipBlock cannot be combined with podSelector or namespaceSelector")
        if not isinstance(ipb, dict):
            raise PolicyError(f"{f}.ipBlock", "must be an object")
        raw = ipb.get("cidr")
        if not raw:
            raise PolicyError(f"{f}.ipBlock.cidr", "required")
        try:
            net = ipaddress.ip_network(str(raw), strict=False)
        except ValueError:
            raise PolicyError(f"{f}.ipBlock.cidr", f"invalid CIDR {raw!r}") from None
        excepts: list[ipaddress.IPv4Network] = []
        for j, e in enumerate(ipb.get("except") or []):
            try:
                en = ipaddress.ip_network(str(e), strict=False)
            except ValueError:
                raise PolicyError(f"{f}.ipBlock.except[{j}]", f"invalid CIDR {e!r}") from None
            if en.version != net.version or not en.subnet_of(net):  # type: ignore[arg-type]
                raise PolicyError(f"{f}.ipBlock.except[{j}]", f"{e} is not inside {raw}")
            if isinstance(en, ipaddress.IPv4Network):
                excepts.append(en)
        if not isinstance(net, ipaddress.IPv4Network):
            return None
        return CIDRSelector(net, tuple(sorted(set(excepts))))
    if pod_sel is None and ns_sel is None:
        raise PolicyError(f, "needs podSelector, namespaceSelector or ipBlock")
    pods = LabelSelector.parse(pod_sel, f"{f}.podSelector")
    if ns_sel is None:
        return EndpointSelector(namespace, None, pods)
    return EndpointSelector(None, LabelSelector.parse(ns_sel, f"{f}.namespaceSelector"), pods)


def _rule(obj: Any, f: str, peers_field: str, namespace: str, errors: list[str]) -> PeerRule:
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        errors.append(f"{f}: must be an object")
        return PeerRule(void=True)
    void = False
    peers: tuple[Selector, ...] | None = None
    raw_peers = obj.get(peers_field)
    if raw_peers:
        if not isinstance(raw_peers, list):
            errors.append(f"{f}.{peers_field}: must be a list")
            return PeerRule(void=True)
        got: list[Selector] = []
        for i, p in enumerate(raw_peers):
            try:
                sel = _peer(p, f"{f}.{peers_field}[{i}]", namespace)
            except PolicyError as e:
                errors.append(str(e))
                continue
            if sel is not None:
                got.append(sel)
        peers = tuple(dict.fromkeys(got))
        void = not peers
    ports: tuple[PortRule, ...] | None = None
    raw_ports = obj.get("ports")
    if raw_ports:
        if not isinstance(raw_ports, list):
            errors.append(f"{f}.ports: must be a list")
            return PeerRule(void=True)
        pgot: list[PortRule] = []
        for i, p in enumerate(raw_ports):
            try:
                pgot.append(_port(p, f"{f}.ports[{i}]"))
            except PolicyError as e:
                errors.append(str(e))
        ports = tuple(dict.fromkeys(pgot))
        void = void or not ports
    if void:
        return PeerRule(void=True)
    return PeerRule(peers, ports)


def policy_head(obj: Obj) -> tuple[str, str, str, Obj | None]:
    """(namespace, name, uid, spec or None when it is missing) of a policy object of either kind."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""), str(meta.get("uid") or ""),
            spec if isinstance(spec, dict) else None)  # fmt: skip


def parse_network_policy(obj: Obj) -> tuple[ParsedPolicy | None, list[str]]:
    """Parse a NetworkPolicy dict. Returns (policy or None if unusable, error messages); every message
    names the offending field (``spec.ingress[0].from[1].ipBlock.cidr: invalid CIDR ...``)."""
    errors: list[str] = []
    ns, name, uid, spec = policy_head(obj)
    if spec is None:
        return None, ["spec: required"]
    try:
        pod_selector = LabelSelector.parse(spec.get("podSelector") or {}, "spec.podSelector")
    except PolicyError as e:
        return None, [str(e)]
    ingress_raw = spec.get("ingress")
    egress_raw = spec.get("egress")
    types_raw = spec.get("policyTypes")
    if types_raw:
        types: set[str] = set()
        for i, t in enumerate(types_raw if isinstance(types_raw, list) else [types_raw]):
            if t in ("Ingress", "Egress"):
                types.add(t)
            else:
                errors.append(f"spec.policyTypes[{i}]: unknown policy type {t!r}")
    else:
        types = {"Ingress"}
        if egress_raw:  # a non-empty egress list
            types.add("Egress")

    def rules(raw: Any, direction: str, peers_field: str) -> tuple[PeerRule, ...] | None:
        if direction.capitalize() not in types:
            return None
        if raw is None:
            return ()
        if not isinstance(raw, list):
            errors.append(f"spec.{direction}: must be a list")
            return ()
        out = [_rule(r, f"spec.{direction}[{i}]", peers_field, ns, errors) for i, r in enumerate(raw)]
        return tuple(r for r in out if not r.void)

    ingress = rules(ingress_raw, "ingress", "from")
    egress = rules(egress_raw, "egress", "to")
    return (
        ParsedPolicy(ns, name, pod_selector, ingress, egress, uid, tuple(errors)),
        errors,
    )
