"""A kubeconfig for the lab API server: plain HTTP, no authentication."""

from __future__ import annotations

import os
from typing import Any

import yaml


def kubeconfig_dict(
    server_url: str, *, name: str = "pycilium-lab", namespace: str = "default"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server_url}}],
        "users": [{"name": f"{name}-admin", "user": {}}],
        "contexts": [
            {"name": name, "context": {"cluster": name, "user": f"{name}-admin", "namespace": namespace}}
        ],
        "current-context": name,
        "preferences": {},
    }


def write_kubeconfig(
    path: str | os.PathLike[str], server_url: str, *, name: str = "pycilium-lab", namespace: str = "default"
) -> str:
    """Write a kubeconfig pointing at `server_url` to `path` (mode 0600); returns the path."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(kubeconfig_dict(server_url, name=name, namespace=namespace), f, sort_keys=False)
    return path
