"""Manifests for `pycilium lab apply/delete`: multi-document YAML in, API writes out.

Kinds: Namespace, Pod, Deployment, Service, NetworkPolicy (and anything else the server serves,
found through discovery). `apply` creates what is missing and updates what exists *in place*:

- Pod: its spec cannot change; labels and annotations are replaced as given (a pod is never
  recreated: a changed spec is reported, not applied);
- Service: replaced as given, keeping the allocated clusterIP(s) and nodePorts unless the manifest
  sets them;
- everything else: replaced as given (status is the server's and is kept).

Also the pod-spec helpers shared by the kubelet and the EndpointSlice controller.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pycilium.lab.cluster.kube import NAMESPACE, Kube, Obj, Resource

KEEP_META = ("uid", "creationTimestamp", "resourceVersion", "generation")


class ManifestError(ValueError):
    pass


# ---- parsing ---------------------------------------------------------------------------------------


def parse(text: str, source: str = "<manifest>") -> list[Obj]:
    """The objects of a multi-document YAML text (Lists expanded, empty documents skipped)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ManifestError(f"{source}: not valid YAML: {e}") from None
    out: list[Obj] = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: document {i} is not a mapping")
        if doc.get("kind") == "List" or (str(doc.get("kind", "")).endswith("List") and "items" in doc):
            items = doc.get("items") or []
            out.extend(_check(it, f"{source}: document {i}, item {j}") for j, it in enumerate(items, 1))
        else:
            out.append(_check(doc, f"{source}: document {i}"))
    return out


def _check(obj: Any, where: str) -> Obj:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: not a mapping")
    for key in ("apiVersion", "kind"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ManifestError(f"{where}: missing {key}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ManifestError(f"{where} ({obj['kind']}): missing metadata.name")
    for key in ("labels", "annotations"):
        val = meta.get(key)
        if val is not None and not (isinstance(val, dict) and all(isinstance(v, str) for v in val.values())):
            raise ManifestError(f"{where} ({obj['kind']} {meta['name']}): metadata.{key} must map to strings")
    if obj["kind"] == "Pod":
        containers = (obj.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            raise ManifestError(f"{where} (Pod {meta['name']}): spec.containers is required")
        try:
            container_ports(obj)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where} (Pod {meta['name']}): {e}") from None
    if obj["kind"] == "Deployment":
        spec = obj.get("spec") or {}
        if not isinstance((spec.get("template") or {}).get("spec"), dict):
            raise ManifestError(f"{where} (Deployment {meta['name']}): spec.template.spec is required")
    return obj


def load(path: str) -> list[Obj]:
    """Parse a file ('-' for stdin)."""
    if path == "-":
        import sys

        return parse(sys.stdin.read(), "<stdin>")
    p = Path(path)
    if p.is_dir():
        objs: list[Obj] = []
        for f in sorted(p.iterdir()):
            if f.suffix in (".yaml", ".yml", ".json"):
                objs.extend(parse(f.read_text(), str(f)))
        return objs
    try:
        return parse(p.read_text(), path)
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from None


# ---- pod spec helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str  # TCP | UDP | SCTP
    name: str = ""


def container_ports(pod: Obj) -> list[ContainerPort]:
    """Every declared containerPort of every container (protocol defaults to TCP)."""
    out: list[ContainerPort] = []
    spec = pod.get("spec") or {}
    for c in spec.get("containers") or []:
        for p in (c or {}).get("ports") or []:
            port = p.get("containerPort")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"containerPort must be a port number, got {port!r}")
            proto = str(p.get("protocol") or "TCP").upper()
            if proto not in ("TCP", "UDP", "SCTP"):
                raise ValueError(f"unknown protocol {proto!r}")
            out.append(ContainerPort(port, proto, str(p.get("name") or "")))
    return out


def resolve_target_port(pod: Obj, target: int | str | None, port: int, protocol: str) -> int | None:
    """A Service port's targetPort on one pod: a number as is, a name through the pod's containerPorts
    (None when the pod has no such port); absent means the Service port itself."""
    if target is None or target == "":
        return port
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    for cp in container_ports(pod):
        if cp.name == target and cp.protocol == protocol:
            return cp.port
    return None


def pod_ready(pod: Obj) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def match_labels(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    """A Service-style equality selector (empty/None selects nothing)."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def match_label_selector(sel: Obj | None, labels: dict[str, str] | None) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions); an empty selector matches everything."""
    labels = labels or {}
    sel = sel or {}
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in sel.get("matchExpressions") or []:
        key, op, vals = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and key in labels and labels[key] in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def short_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


# ---- apply / delete ----------------------------------------------------------------------------------


def _order(objs: Iterable[Obj]) -> list[Obj]:
    """Namespaces first, then the rest in file order."""
    objs = list(objs)
    return [o for o in objs if o["kind"] == "Namespace"] + [o for o in objs if o["kind"] != "Namespace"]


def namespace_of(obj: Obj, res: Resource) -> str | None:
    if not res.namespaced:
        return None
    return str((obj.get("metadata") or {}).get("namespace") or "default")


def describe(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = f"{ns}/{meta.get('name')}" if ns and obj.get("kind") != "Namespace" else meta.get("name")
    return f"{str(obj.get('kind')).lower()}/{name}"


def updated(existing: Obj, desired: Obj) -> tuple[Obj, list[str]]:
    """The object to PUT over `existing` for `desired`, and warnings about what cannot change."""
    warnings: list[str] = []
    kind = desired["kind"]
    if kind == "Pod":
        body = copy.deepcopy(existing)
        meta = body.setdefault("metadata", {})
        dmeta = desired.get("metadata") or {}
        for key in ("labels", "annotations"):
            if dmeta.get(key):
                meta[key] = dict(dmeta[key])
            else:
                meta.pop(key, None)
        dspec, espec = desired.get("spec") or {}, existing.get("spec") or {}
        same_ports = sorted(map(repr, container_ports(desired))) == sorted(
            map(repr, container_ports(existing))
        )
        if not same_ports or (dspec.get("nodeName") and dspec.get("nodeName") != espec.get("nodeName")):
            warnings.append(
                f"{describe(desired)}: the spec of an existing pod is kept (delete it to change it)"
            )
        return body, warnings
    body = copy.deepcopy(desired)
    meta = body.setdefault("metadata", {})
    emeta = existing.get("metadata") or {}
    for key in KEEP_META:
        if key in emeta:
            meta[key] = emeta[key]
    for key in ("finalizers", "ownerReferences"):
        if key not in meta and key in emeta:
            meta[key] = emeta[key]
    if kind == "Service":
        spec = body.setdefault("spec", {})
        espec = existing.get("spec") or {}
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if not spec.get(key) and espec.get(key):
                spec[key] = espec[key]
        if not spec.get("healthCheckNodePort") and espec.get("healthCheckNodePort"):
            spec["healthCheckNodePort"] = espec["healthCheckNodePort"]
        old_ports = espec.get("ports") or []
        for p in spec.get("ports") or []:
            if p.get("nodePort"):
                continue
            for op in old_ports:
                same = (op.get("port"), op.get("protocol") or "TCP") == (
                    p.get("port"),
                    p.get("protocol") or "TCP",
                )
                if same and op.get("nodePort"):
                    p["nodePort"] = op["nodePort"]
    return body, warnings


def _content(obj: Obj) -> Obj:
    """What a user changes: everything but status and the server's bookkeeping."""
    out = {k: v for k, v in obj.items() if k != "status"}
    meta = {
        k: v
        for k, v in (obj.get("metadata") or {}).items()
        if k not in ("resourceVersion", "generation", "managedFields")
    }
    out["metadata"] = meta
    return out


@dataclass
class Outcome:
    obj: Obj
    action: str  # created | configured | unchanged | deleted | not found
    warnings: list[str]

    def __str__(self) -> str:
        return f"{describe(self.obj)} {self.action}"


def apply(kube: Kube, objs: Iterable[Obj]) -> list[Outcome]:
    out: list[Outcome] = []
    for obj in _order(objs):
        res = kube.resource(obj["apiVersion"], obj["kind"])
        ns = namespace_of(obj, res)
        body = copy.deepcopy(obj)
        if ns is not None:
            body["metadata"]["namespace"] = ns
        name = body["metadata"]["name"]
        existing = kube.get(res, name, ns)
        if existing is None:
            created = kube.create(res, body, ns)
            out.append(Outcome(created or body, "created", []))
            continue
        new, warnings = updated(existing, body)
        result = kube.replace(res, new, ns)
        out.append(
            Outcome(result, "configured" if _content(existing) != _content(result) else "unchanged", warnings)
        )
    return out


def delete(kube: Kube, objs: Iterable[Obj]) -> list[Outcome]:
    out: list[Outcome] = []
    for obj in reversed(_order(objs)):
        res = kube.resource(obj["apiVersion"], obj["kind"])
        ns = namespace_of(obj, res)
        gone = kube.delete(res, obj["metadata"]["name"], ns)
        body = copy.deepcopy(obj)
        if ns is not None:
            body["metadata"]["namespace"] = ns
        out.append(Outcome(body, "deleted" if gone else "not found", []))
    return out


def ensure_namespace(kube: Kube, name: str) -> None:
    if kube.get(NAMESPACE, name) is None:
        kube.create(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
