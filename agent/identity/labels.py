"""Security-relevant labels: what a security identity is made of.

A label is a string ``source:key=value`` (``source:key`` when the value is empty). Sources:

- ``k8s``: pod labels (``k8s:app=web``), the pod's namespace (``k8s:io.kubernetes.pod.namespace=ns``)
  and the namespace's labels (``k8s:io.cilium.k8s.namespace.labels.team=a``);
- ``reserved``: the fixed identities (``reserved:host``, ``reserved:world`` ...);
- ``cidr``: node-local identities of NetworkPolicy ipBlock prefixes (``cidr:10.0.0.0/8``).

A label set is a frozenset of such strings; its sorted form is the identity allocator's key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from pycilium.bpf.maps.defines import d

Labels = frozenset[str]

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"

POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by Kubernetes

# Pod labels that change per rollout or per pod: keeping them would give every ReplicaSet (or
# every pod) an identity of its own. Selectors on them never match a peer (as in Cilium).
EXCLUDED_POD_LABEL_KEYS: frozenset[str] = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "controller-uid",
        "job-name",
        "batch.kubernetes.io/controller-uid",
        "batch.kubernetes.io/job-name",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
    }
)
_RESERVED_KEY_PREFIXES = (POD_NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX)

# Reserved identities (numbers from bpf/lib/map_layouts.h).
ID_UNKNOWN = d("ID_UNKNOWN")
ID_HOST = d("ID_HOST")
ID_WORLD = d("ID_WORLD")
ID_UNMANAGED = d("ID_UNMANAGED")
ID_HEALTH = d("ID_HEALTH")
ID_INIT = d("ID_INIT")
ID_REMOTE_NODE = d("ID_REMOTE_NODE")
ID_KUBE_APISERVER = d("ID_KUBE_APISERVER")

RESERVED_NAMES: dict[int, str] = {
    ID_HOST: "host",
    ID_WORLD: "world",
    ID_UNMANAGED: "unmanaged",
    ID_HEALTH: "health",
    ID_INIT: "init",
    ID_REMOTE_NODE: "remote-node",
    ID_KUBE_APISERVER: "kube-apiserver",
}
RESERVED_LABELS: dict[int, Labels] = {
    i: frozenset({f"{SOURCE_RESERVED}:{n}"}) for i, n in RESERVED_NAMES.items()
}
# kube-apiserver also carries the remote-node label (as in Cilium).
RESERVED_LABELS[ID_KUBE_APISERVER] = frozenset({"reserved:kube-apiserver", "reserved:remote-node"})

# Cluster-wide identities allocated through the API server, and node-local (CIDR) ones.
MIN_GLOBAL_ID = 256
MAX_GLOBAL_ID = 65535
LOCAL_ID_FLAG = 1 << 24
MAX_LOCAL_ID = (1 << 24) - 1  # local identities are LOCAL_ID_FLAG | n, 1 <= n <= MAX_LOCAL_ID


def is_global_id(identity: int) -> bool:
    return MIN_GLOBAL_ID <= identity <= MAX_GLOBAL_ID


def is_local_id(identity: int) -> bool:
    return identity & ~MAX_LOCAL_ID == LOCAL_ID_FLAG and identity != LOCAL_ID_FLAG


def make_label(source: str, key: str, value: str = "") -> str:
    return f"{source}:{key}={value}" if value else f"{source}:{key}"


def split_label(label: str) -> tuple[str, str, str]:
    """``k8s:app=web`` -> (``k8s``, ``app``, ``web``); ``reserved:host`` -> (``reserved``, ``host``, ``"")."""
    source, _, rest = label.partition(":")
    key, _, value = rest.partition("=")
    return source, key, value


def labels_key(labels: Iterable[str]) -> str:
    """The allocator key of a label set: its labels sorted, joined with ``;``."""
    return ";".join(sorted(labels))


def labels_to_map(labels: Iterable[str]) -> dict[str, str]:
    """The ``security-labels`` form of a label set: ``{"k8s:app": "web", "reserved:host": ""}``."""
    out: dict[str, str] = {}
    for label in labels:
        source, key, value = split_label(label)
        out[f"{source}:{key}"] = value
    return out


def labels_from_map(m: Mapping[str, object]) -> Labels:
    out = set()
    for k, v in m.items():
        source, _, key = str(k).partition(":")
        out.add(make_label(source, key, "" if v is None else str(v)))
    return frozenset(out)


def format_labels(labels: Iterable[str]) -> list[str]:
    """Labels sorted for display (``pycilium identity list``, ``bpf policy get``)."""
    return sorted(labels)


def pod_identity_labels(
    pod_labels: Mapping[str, str] | None,
    namespace: str,
    namespace_labels: Mapping[str, str] | None = None,
    excluded: frozenset[str] = EXCLUDED_POD_LABEL_KEYS,
) -> Labels:
    """The security-relevant label set of a pod: its labels, its namespace and the namespace's labels."""
    out = {make_label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace)}
    for k, v in (pod_labels or {}).items():
        if k in excluded or k.startswith(_RESERVED_KEY_PREFIXES):
            continue
        out.add(make_label(SOURCE_K8S, k, str(v)))
    ns_labels = dict(namespace_labels or {})
    ns_labels.setdefault(NAMESPACE_NAME_LABEL, namespace)
    for k, v in ns_labels.items():
        out.add(make_label(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + k, str(v)))
    return frozenset(out)


def cidr_labels(prefix: str | ipaddress.IPv4Network) -> Labels:
    net = ipaddress.IPv4Network(prefix, strict=False)
    return frozenset({make_label(SOURCE_CIDR, str(net)), make_label(SOURCE_RESERVED, "world")})


@dataclass(frozen=True)
class IdentityView:
    """A label set split into what selectors look at."""

    namespace: str | None = None  # pod identities only
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    cidr: ipaddress.IPv4Network | None = None
    reserved: frozenset[str] = frozenset()

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


@lru_cache(maxsize=65536)
def view(labels: Labels) -> IdentityView:
    namespace: str | None = None
    pod: dict[str, str] = {}
    ns: dict[str, str] = {}
    cidr: ipaddress.IPv4Network | None = None
    reserved: set[str] = set()
    for label in labels:
        source, key, value = split_label(label)
        if source == SOURCE_K8S:
            if key == POD_NAMESPACE_LABEL:
                namespace = value
            elif key.startswith(NAMESPACE_LABELS_PREFIX):
                ns[key[len(NAMESPACE_LABELS_PREFIX) :]] = value
            else:
                pod[key] = value
        elif source == SOURCE_RESERVED:
            reserved.add(key)
        elif source == SOURCE_CIDR:
            try:
                cidr = ipaddress.IPv4Network(key, strict=False)
            except ValueError:
                pass
    return IdentityView(namespace, pod, ns, cidr, frozenset(reserved))
