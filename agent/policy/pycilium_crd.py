"""PyCiliumNetworkPolicy (pycilium.io/v1) objects parsed into the same rules as NetworkPolicies.

The CRD follows CiliumNetworkPolicy's allow rules for L3/L4:

- ``endpointSelector`` chooses the policy's pods in its namespace (``{}``: all of them).
- ``ingress`` / ``egress`` present (also ``[]``) makes the selected pods default-deny in that
  direction; each rule allows what it names. Absent: the direction is not affected.
- A rule's peers are ``fromEndpoints``/``toEndpoints`` (label selectors), ``fromCIDR``/``toCIDR`` and
  ``fromCIDRSet``/``toCIDRSet`` (``{cidr, except}``), all ORed; a rule without any allows every peer.
  ``toPorts`` limits the rule to ports (``port`` a number or a container port name, ``endPort``,
  ``protocol`` TCP, UDP or ANY = both; port ``0`` = every port); absent: every port.
- An endpoint selector matches pods of the policy's namespace, unless it names the namespace with
  ``io.kubernetes.pod.namespace`` (exactly one value), or selects namespaces by their labels with
  ``io.cilium.k8s.namespace.labels.<key>`` requirements. Keys may carry Cilium's ``k8s:`` source
  prefix, which is ignored. ``{}`` matches every pod of the policy's namespace.

Invalid parts are reported with the field they are in and fail closed, as for NetworkPolicies.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pycilium.agent.policy.k8s import (
    _PORT_NAME,
    PROTOCOLS,
    Obj,
    ParsedPolicy,
    PeerRule,
    PortRule,
    policy_head,
)
from pycilium.agent.policy.selectors import (
    CIDRSelector,
    EndpointSelector,
    LabelSelector,
    PolicyError,
    Requirement,
    Selector,
)

KIND = "PyCiliumNetworkPolicy"
NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SOURCE_PREFIXES = ("k8s:", "any:")


def _strip_source(key: str) -> str:
    for p in SOURCE_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _endpoint_selector(obj: Any, f: str, namespace: str) -> EndpointSelector:
    raw = LabelSelector.parse(obj, f)
    pods: list[Requirement] = []
    ns_labels: list[Requirement] = []
    fixed_ns: str | None = None
    for r in raw.requirements:
        key = _strip_source(r.key)
        if key == NAMESPACE_KEY:
            if r.operator != "In" or len(r.values) != 1:
                raise PolicyError(
                    f, f"{r.key}: only one namespace can be named (use namespace labels for more)"
                )
            fixed_ns = r.values[0]
        elif key.startswith(NAMESPACE_LABELS_PREFIX) and len(key) > len(NAMESPACE_LABELS_PREFIX):
            ns_labels.append(Requirement(key[len(NAMESPACE_LABELS_PREFIX) :], r.operator, r.values))
        else:
            pods.append(Requirement(key, r.operator, r.values))
    pod_sel = LabelSelector(tuple(sorted(pods)))
    if ns_labels:
        if fixed_ns is not None:
            raise PolicyError(f, f"{NAMESPACE_KEY} and namespace labels cannot be combined")
        return EndpointSelector(None, LabelSelector(tuple(sorted(ns_labels))), pod_sel)
    return EndpointSelector(fixed_ns if fixed_ns is not None else namespace, None, pod_sel)


def _cidr(raw: Any, f: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(str(raw), strict=False)
    except ValueError:
        raise PolicyError(f, f"invalid CIDR {raw!r}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise PolicyError(f, f"{raw}: IPv6 is not supported by the pycilium datapath")
    return net


def _cidr_set(obj: Any, f: str) -> CIDRSelector:
    if not isinstance(obj, dict) or "cidr" not in obj:
        raise PolicyError(f, "must be an object with cidr")
    net = _cidr(obj["cidr"], f"{f}.cidr")
    excepts = []
    for j, e in enumerate(obj.get("except") or []):
        en = _cidr(e, f"{f}.except[{j}]")
        if not en.subnet_of(net):
            raise PolicyError(f"{f}.except[{j}]", f"{e} is not inside {obj['cidr']}")
        excepts.append(en)
    return CIDRSelector(net, tuple(sorted(set(excepts))))


def _ports(obj: Any, f: str) -> list[PortRule]:
    if not isinstance(obj, dict):
        raise PolicyError(f, "must be an object")
    proto_name = str(obj.get("protocol") or "ANY").upper()
    if proto_name == "ANY":
        protos = [PROTOCOLS["TCP"], PROTOCOLS["UDP"]]
    elif proto_name in PROTOCOLS:
        protos = [PROTOCOLS[proto_name]]
    else:
        raise PolicyError(f"{f}.protocol", f"unknown protocol {obj.get('protocol')!r} (want TCP, UDP or ANY)")
    port, end = obj.get("port"), obj.get("endPort")
    if isinstance(port, bool) or port is None:
        raise PolicyError(f"{f}.port", "required")
    text = str(port)
    if text.isdigit():
        num = int(text)
        if num == 0:
            if end is not None:
                raise PolicyError(f"{f}.endPort", "not allowed with port 0 (every port)")
            return [PortRule(p) for p in protos]
        if not 1 <= num <= 65535:
            raise PolicyError(f"{f}.port", f"invalid port {port!r}")
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or not num <= end <= 65535):
            raise PolicyError(f"{f}.endPort", f"invalid endPort {end!r} (must be {num}..65535)")
        return [PortRule(p, num, end) for p in protos]
    if not _PORT_NAME.match(text) or len(text) > 15:
        raise PolicyError(f"{f}.port", f"invalid port name {port!r}")
    if end is not None:
        raise PolicyError(f"{f}.endPort", "not allowed with a named port")
    return [PortRule(p, name=text) for p in protos]


def _rule(obj: Any, f: str, egress: bool, namespace: str, errors: list[str]) -> PeerRule:
    if not isinstance(obj, dict):
        errors.append(f"{f}: must be an object")
        return PeerRule(void=True)
    side = "to" if egress else "from"
    peer_fields = (f"{side}Endpoints", f"{side}CIDR", f"{side}CIDRSet")
    given = [k for k in peer_fields if obj.get(k) is not None]
    peers: list[Selector] = []
    bad_peers = 0
    for k in given:
        items = obj[k]
        if not isinstance(items, list):
            errors.append(f"{f}.{k}: must be a list")
            bad_peers += 1
            continue
        for i, item in enumerate(items):
            try:
                if k.endswith("Endpoints"):
                    peers.append(_endpoint_selector(item, f"{f}.{k}[{i}]", namespace))
                elif k.endswith("CIDRSet"):
                    peers.append(_cidr_set(item, f"{f}.{k}[{i}]"))
                else:
                    peers.append(CIDRSelector(_cidr(item, f"{f}.{k}[{i}]")))
            except PolicyError as e:
                errors.append(str(e))
                bad_peers += 1
    if given and not peers:
        return PeerRule(void=True)  # peers were named but none is usable: allow nothing
    ports: list[PortRule] | None = None
    raw_ports = obj.get("toPorts")
    if raw_ports is not None:
        ports = []
        if not isinstance(raw_ports, list):
            errors.append(f"{f}.toPorts: must be a list")
            return PeerRule(void=True)
        for i, pr in enumerate(raw_ports):
            plist = pr.get("ports") if isinstance(pr, dict) else None
            if not isinstance(plist, list) or not plist:
                errors.append(f"{f}.toPorts[{i}].ports: must be a non-empty list")
                continue
            for j, po in enumerate(plist):
                try:
                    ports.extend(_ports(po, f"{f}.toPorts[{i}].ports[{j}]"))
                except PolicyError as e:
                    errors.append(str(e))
        if not ports:
            return PeerRule(void=True)
    return PeerRule(tuple(dict.fromkeys(peers)) if given else None,
                    tuple(dict.fromkeys(ports)) if ports is not None else None)  # fmt: skip


def parse_pycilium_network_policy(obj: Obj) -> tuple[ParsedPolicy | None, list[str]]:
    """Parse a PyCiliumNetworkPolicy dict: (policy or None if unusable, error messages naming fields)."""
    errors: list[str] = []
    ns, name, uid, spec = policy_head(obj)
    if spec is None:
        return None, ["spec: required"]
    if "endpointSelector" not in spec:
        return None, ["spec.endpointSelector: required"]
    try:
        sel = _endpoint_selector(spec.get("endpointSelector") or {}, "spec.endpointSelector", ns)
    except PolicyError as e:
        return None, [str(e)]
    if sel.namespace != ns:
        return None, ["spec.endpointSelector: selects pods of its own namespace only"]

    def rules(direction: str) -> tuple[PeerRule, ...] | None:
        raw = spec.get(direction)
        if raw is None:
            return None
        if not isinstance(raw, list):
            errors.append(f"spec.{direction}: must be a list")
            return ()
        out = [
            _rule(r, f"spec.{direction}[{i}]", direction == "egress", ns, errors) for i, r in enumerate(raw)
        ]
        return tuple(r for r in out if not r.void)

    ingress, egress = rules("ingress"), rules("egress")
    policy = ParsedPolicy(ns, name, sel.pods, ingress, egress, uid, tuple(errors), kind=KIND)
    return policy, errors
