"""The resource types the server knows: built-in ones and those registered by CustomResourceDefinitions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

# Subresources besides status, served by subresources.py: name -> (group, version, kind, verbs)
# of what they take and return ("" group and version: the parent's own, as discovery leaves them out).
SUBRESOURCES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "scale": ("autoscaling", "v1", "Scale", ("get", "patch", "update")),
    "binding": ("", "", "Binding", ("create",)),
}


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    has_status: bool = False  # a /status subresource exists (main writes then keep .status)
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = tuple(ALL_VERBS)
    printer_columns: tuple[tuple[str, str, int], ...] = ()  # CRD additionalPrinterColumns (name, path, prio)
    subresources: tuple[str, ...] = ()  # keys of SUBRESOURCES this type serves

    @property
    def key(self) -> str:
        """Storage key: one object set per group/plural, whatever version it is read through."""
        return f"{self.group}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        """`pods`, `endpointslices.discovery.k8s.io`: how fault injection and messages name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery_entries(self) -> list[Obj]:
        entry: Obj = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        out = [entry]
        if self.has_status:
            out.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        for sub in self.subresources:
            group, version, kind, verbs = SUBRESOURCES[sub]
            e: Obj = {"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced}
            if group or version:
                e.update(group=group, version=version)
            out.append({**e, "kind": kind, "verbs": list(verbs)})
        return out


def _rt(
    group: str,
    version: str,
    plural: str,
    kind: str,
    namespaced: bool,
    short: tuple[str, ...] = (),
    status: bool = False,
    categories: tuple[str, ...] = (),
    subresources: tuple[str, ...] = (),
    verbs: tuple[str, ...] = tuple(ALL_VERBS),
) -> ResourceType:
    return ResourceType(
        group=group,
        version=version,
        plural=plural,
        kind=kind,
        namespaced=namespaced,
        singular=kind.lower(),
        short_names=short,
        has_status=status,
        categories=categories,
        subresources=subresources,
        verbs=verbs,
    )


BUILTIN: list[ResourceType] = [
    _rt("", "v1", "namespaces", "Namespace", False, ("ns",), status=True),
    _rt("", "v1", "nodes", "Node", False, ("no",), status=True),
    _rt("", "v1", "pods", "Pod", True, ("po",), status=True, categories=("all",), subresources=("binding",)),
    _rt("", "v1", "bindings", "Binding", True, verbs=("create",)),
    _rt("", "v1", "services", "Service", True, ("svc",), status=True, categories=("all",)),
    _rt("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    _rt("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _rt("", "v1", "secrets", "Secret", True),
    _rt("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    _rt("", "v1", "events", "Event", True, ("ev",)),
    _rt("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    _rt("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
    _rt(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        ("deploy",),
        status=True,
        categories=("all",),
        subresources=("scale",),
    ),
    _rt("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), status=True, categories=("all",)),
    _rt("coordination.k8s.io", "v1", "leases", "Lease", True),
    _rt(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        ("crd", "crds"),
        status=True,
    ),
]

CRD_KEY = "apiextensions.k8s.io/customresourcedefinitions"

_VERSION_RE = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes version ordering: GA > beta > alpha, higher numbers first, then the rest by name."""
    m = _VERSION_RE.match(version)
    if not m:
        return (3, 0, 0, version)
    major = int(m.group(1))
    stage = {None: 0, "beta": 1, "alpha": 2}[m.group(2)]
    minor = int(m.group(3) or 0)
    return (stage, -major, -minor, version)


@dataclass
class Registry:
    """Lookup of resource types by (group, version, plural) and by storage key."""

    by_gvr: dict[tuple[str, str, str], ResourceType] = field(default_factory=dict)
    crd_owned: dict[str, list[ResourceType]] = field(default_factory=dict)  # CRD name -> its types

    @classmethod
    def with_builtins(cls) -> Registry:
        reg = cls()
        for rt in BUILTIN:
            reg.add(rt)
        return reg

    def add(self, rt: ResourceType) -> None:
        self.by_gvr[(rt.group, rt.version, rt.plural)] = rt

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.by_gvr.get((group, version, plural))

    def any_version(self, key: str) -> ResourceType | None:
        """The preferred-version type for a storage key (`group/plural`)."""
        found = [rt for rt in self.by_gvr.values() if rt.key == key]
        if not found:
            return None
        return min(found, key=lambda rt: version_priority(rt.version))

    def find(self, name: str) -> ResourceType | None:
        """Resolve `pods`, `endpointslices` or `endpointslices.discovery.k8s.io` (fault injection names)."""
        plural, _, group = name.partition(".")
        found = self.any_version(f"{group}/{plural}")
        if found is None and not group:  # a bare plural of a non-core group, if unambiguous
            keys = {rt.key for rt in self.by_gvr.values() if rt.plural == plural}
            if len(keys) == 1:
                found = self.any_version(keys.pop())
        return found

    def groups(self) -> dict[str, list[str]]:
        """group -> served versions, preferred first (core group under "")."""
        out: dict[str, set[str]] = {}
        for g, v, _ in self.by_gvr:
            out.setdefault(g, set()).add(v)
        return {g: sorted(vs, key=version_priority) for g, vs in sorted(out.items())}

    def resources(self, group: str, version: str) -> list[ResourceType]:
        return sorted(
            (rt for (g, v, _), rt in self.by_gvr.items() if g == group and v == version),
            key=lambda rt: rt.plural,
        )

    def register_crd(self, crd: Obj) -> list[ResourceType]:
        """(Re-)register the types a CRD serves; returns them."""
        name = crd["metadata"]["name"]
        self.unregister_crd(name)
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        types: list[ResourceType] = []
        for ver in spec.get("versions", []):
            if not ver.get("served", True):
                continue
            rt = ResourceType(
                group=spec["group"],
                version=ver["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                has_status="status" in (ver.get("subresources") or {}),
                categories=tuple(names.get("categories") or ()),
                printer_columns=tuple(
                    (c["name"], c.get("jsonPath", ""), int(c.get("priority", 0)))
                    for c in ver.get("additionalPrinterColumns") or []
                    if c.get("name")
                ),
            )
            self.add(rt)
            types.append(rt)
        self.crd_owned[name] = types
        return types

    def unregister_crd(self, name: str) -> list[ResourceType]:
        types = self.crd_owned.pop(name, [])
        for rt in types:
            self.by_gvr.pop((rt.group, rt.version, rt.plural), None)
        return types
