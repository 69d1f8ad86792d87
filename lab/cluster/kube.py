"""A small JSON client for the lab's roles (CLI, controllers, kubelet) on top of the agent's
transport (pycilium.agent.k8s.client: the official client for auth/TLS, plain dicts for objects).

`Kube` knows the kinds the lab handles by name and looks others up through API discovery.
"""

from __future__ import annotations

import threading
from typing import Any

from kubernetes import client as k8s_client
from pycilium.agent.k8s.client import APIError, new_api_client, request_json
from pycilium.agent.k8s.resources import Resource

Obj = dict[str, Any]

__all__ = ["KINDS", "APIError", "Kube", "Obj", "Resource"]

KINDS: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r
    for r in (
        Resource("", "v1", "namespaces", "Namespace", namespaced=False),
        Resource("", "v1", "nodes", "Node", namespaced=False),
        Resource("", "v1", "pods", "Pod", namespaced=True),
        Resource("", "v1", "services", "Service", namespaced=True),
        Resource("", "v1", "configmaps", "ConfigMap", namespaced=True),
        Resource("", "v1", "secrets", "Secret", namespaced=True),
        Resource("", "v1", "serviceaccounts", "ServiceAccount", namespaced=True),
        Resource("", "v1", "endpoints", "Endpoints", namespaced=True),
        Resource("apps", "v1", "deployments", "Deployment", namespaced=True),
        Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True),
        Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", namespaced=True),
    )
}
POD = KINDS[("v1", "Pod")]
NODE = KINDS[("v1", "Node")]
NAMESPACE = KINDS[("v1", "Namespace")]
SERVICE = KINDS[("v1", "Service")]
DEPLOYMENT = KINDS[("apps/v1", "Deployment")]
ENDPOINTSLICE = KINDS[("discovery.k8s.io/v1", "EndpointSlice")]
NETWORKPOLICY = KINDS[("networking.k8s.io/v1", "NetworkPolicy")]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class Kube:
    """Plain-dict CRUD against one API server (thread-safe: the client pools its connections)."""

    def __init__(
        self,
        kubeconfig: str | None = None,
        *,
        api: k8s_client.ApiClient | None = None,
        user_agent: str = "pycilium-lab",
    ) -> None:
        self.api = api or new_api_client(kubeconfig=kubeconfig)
        self.api.user_agent = user_agent
        self._discovered: dict[tuple[str, str], Resource] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.api.close()

    # -- resources -------------------------------------------------------------------------------
    def resource(self, api_version: str, kind: str) -> Resource:
        """The Resource of a kind, from the table or from discovery; KeyError when unknown."""
        key = (api_version, kind)
        if key in KINDS:
            return KINDS[key]
        with self._lock:
            if key in self._discovered:
                return self._discovered[key]
        group, _, version = api_version.rpartition("/")
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        try:
            doc = request_json(self.api, "GET", path)
        except APIError as e:
            raise KeyError(f"unknown apiVersion {api_version!r} ({e.status} {e.reason})") from None
        for r in doc.get("resources") or []:
            if r.get("kind") == kind and "/" not in r.get("name", ""):
                res = Resource(group, version, r["name"], kind, bool(r.get("namespaced")))
                with self._lock:
                    self._discovered[key] = res
                return res
        raise KeyError(f"the server does not serve kind {kind!r} in {api_version!r}")

    # -- verbs -----------------------------------------------------------------------------------
    def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return request_json(self.api, "GET", res.path(namespace, name))
        except APIError as e:
            if e.status == 404:
                return None
            raise

    def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[Obj]:
        q: list[tuple[str, Any]] = []
        if label_selector:
            q.append(("labelSelector", label_selector))
        if field_selector:
            q.append(("fieldSelector", field_selector))
        items = request_json(self.api, "GET", res.path(namespace), query=q).get("items") or []
        for it in items:
            it.setdefault("kind", res.kind)
            it.setdefault("apiVersion", res.api_version)
        return list(items)

    def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        return request_json(self.api, "POST", res.path(namespace), body=obj)

    def replace(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        name = obj["metadata"]["name"]
        return request_json(self.api, "PUT", res.path(namespace, name), body=obj)

    def patch(
        self,
        res: Resource,
        name: str,
        body: Obj,
        namespace: str | None = None,
        *,
        status: bool = False,
        content_type: str = MERGE_PATCH,
    ) -> Obj:
        path = res.path(namespace, name) + ("/status" if status else "")
        return request_json(self.api, "PATCH", path, body=body, content_type=content_type)

    def replace_status(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        name = obj["metadata"]["name"]
        return request_json(self.api, "PUT", res.path(namespace, name) + "/status", body=obj)

    def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        grace_period: int | None = None,
        uid: str | None = None,
    ) -> bool:
        """Delete; False when it was already gone."""
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period is not None:
            body["gracePeriodSeconds"] = grace_period
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            request_json(self.api, "DELETE", res.path(namespace, name), body=body)
            return True
        except APIError as e:
            if e.status in (404, 409):  # gone, or a different object under that name now
                return False
            raise

    def request(self, method: str, path: str, **kw: Any) -> Obj:
        return request_json(self.api, method, path, **kw)
