"""Small accessors over rendered Kubernetes objects."""

from __future__ import annotations

import posixpath
from typing import Any

Obj = dict[str, Any]


def find_all(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o.get("kind") == kind]


def find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    matches = [o for o in find_all(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def daemonset(objects: list[Obj]) -> Obj:
    return find(objects, "DaemonSet", "pycilium")


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = daemonset(objects)["spec"]["template"]["spec"]
    return spec


def agent_container(objects: list[Obj]) -> Obj:
    containers = pod_spec(objects)["containers"]
    (agent,) = [c for c in containers if c["name"] == "pycilium-agent"]
    return agent


def init_containers(objects: list[Obj]) -> dict[str, Obj]:
    return {c["name"]: c for c in pod_spec(objects).get("initContainers", [])}


def volumes(objects: list[Obj]) -> dict[str, Obj]:
    return {v["name"]: v for v in pod_spec(objects)["volumes"]}


def config_data(objects: list[Obj]) -> dict[str, str]:
    data: dict[str, str] = find(objects, "ConfigMap", "pycilium-config")["data"]
    return data


def covering_mount(container: Obj, path: str) -> Obj | None:
    """The volume mount through which ``path`` inside the container is reached (longest prefix)."""
    path = posixpath.normpath(path)
    best: Obj | None = None
    for m in container.get("volumeMounts", []):
        mp = posixpath.normpath(m["mountPath"])
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best["mountPath"])
        ):
            best = m
    return best


def host_path_of(objects: list[Obj], container: Obj, path: str) -> str | None:
    """Host path that ``path`` inside the container maps to, if it is under a hostPath mount."""
    mount = covering_mount(container, path)
    if mount is None:
        return None
    vol = volumes(objects)[mount["name"]]
    if "hostPath" not in vol:
        return None
    rel = posixpath.relpath(posixpath.normpath(path), posixpath.normpath(mount["mountPath"]))
    host: str = vol["hostPath"]["path"]
    return host if rel == "." else posixpath.join(host, rel)


def merge_values(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over the chart's defaults (maps merge, the rest replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
