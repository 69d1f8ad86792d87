"""Where cluster-wide identities live: PyCiliumIdentity custom resources (or memory, for tests).

A PyCiliumIdentity is cluster-scoped, named by the numeric identity, and carries the label set in
a top-level ``security-labels`` map (like Cilium's CiliumIdentity)::

    apiVersion: pycilium.io/v1
    kind: PyCiliumIdentity
    metadata: {name: "40213", labels: {io.kubernetes.pod.namespace: default}}
    security-labels: {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default", ...}

Creating an object whose name is taken fails with 409 AlreadyExists: the allocator uses that as
its lock. Deletion carries uid + resourceVersion preconditions so that a garbage collector never
deletes an identity that was re-created or changed since it looked.
"""

from __future__ import annotations

import copy
import itertools
import threading
import uuid
from collections.abc import Mapping
from typing import Any, Protocol, cast

from pycilium.agent.identity.labels import POD_NAMESPACE_LABEL, split_label

GROUP = "pycilium.io"
VERSION = "v1"
KIND = "PyCiliumIdentity"
PLURAL = "pyciliumidentities"
SECURITY_LABELS = "security-labels"

Obj = dict[str, Any]


class BackendError(RuntimeError):
    """The identity store could not be reached or refused the request."""


class AlreadyExistsError(BackendError):
    """An identity with this number exists already (the allocation lock is taken)."""


def identity_crd(version: str = VERSION) -> Obj:
    """The CustomResourceDefinition of PyCiliumIdentity (the Helm chart ships the same)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "plural": PLURAL,
                "singular": "pyciliumidentity",
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": ["pycid"],
                "categories": ["pycilium"],
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": [SECURITY_LABELS],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                SECURITY_LABELS: {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        }
                    },
                    "additionalPrinterColumns": [
                        {
                            "name": "Namespace",
                            "type": "string",
                            "jsonPath": ".metadata.labels.io\\.kubernetes\\.pod\\.namespace",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def identity_object(identity: int, security_labels: Mapping[str, str], version: str = VERSION) -> Obj:
    meta: Obj = {"name": str(identity)}
    for k, v in security_labels.items():
        source, key, _ = split_label(k)
        if source == "k8s" and key == POD_NAMESPACE_LABEL and v:
            meta["labels"] = {POD_NAMESPACE_LABEL: v}
    return {
        "apiVersion": f"{GROUP}/{version}",
        "kind": KIND,
        "metadata": meta,
        SECURITY_LABELS: dict(security_labels),
    }


class IdentityBackend(Protocol):
    """Storage of PyCiliumIdentity objects (raw dicts)."""

    def create(self, identity: int, security_labels: Mapping[str, str]) -> Obj:
        """Create the object; raises AlreadyExistsError when the number is taken."""
        ...

    def get(self, identity: int) -> Obj | None: ...

    def list(self) -> list[Obj]: ...

    def delete(self, identity: int, uid: str, resource_version: str) -> bool:
        """Delete if uid and resourceVersion still match; False when gone or changed meanwhile."""
        ...


class KubernetesIdentityBackend:
    """PyCiliumIdentity objects through the official client's CustomObjectsApi."""

    def __init__(self, api_client: Any, version: str = VERSION, request_timeout: float = 10.0):
        from kubernetes import client

        self._client = client
        self.api = client.CustomObjectsApi(api_client)
        self.version = version
        self.timeout = request_timeout

    def _err(self, what: str, e: Exception) -> BackendError:
        status = getattr(e, "status", None)
        reason = getattr(e, "reason", None) or str(e)
        return BackendError(f"{what}: {status or ''} {reason}".strip())

    def create(self, identity: int, security_labels: Mapping[str, str]) -> Obj:
        body = identity_object(identity, security_labels, self.version)
        try:
            return cast(
                Obj,
                self.api.create_cluster_custom_object(
                    GROUP, self.version, PLURAL, body, _request_timeout=self.timeout
                ),
            )
        except self._client.ApiException as e:
            if e.status == 409:
                raise AlreadyExistsError(f"identity {identity} exists") from None
            raise self._err(f"creating identity {identity}", e) from None
        except Exception as e:  # connection refused, timeouts (urllib3 errors)
            raise self._err(f"creating identity {identity}", e) from None

    def get(self, identity: int) -> Obj | None:
        try:
            return cast(
                Obj,
                self.api.get_cluster_custom_object(
                    GROUP, self.version, PLURAL, str(identity), _request_timeout=self.timeout
                ),
            )
        except self._client.ApiException as e:
            if e.status == 404:
                return None
            raise self._err(f"reading identity {identity}", e) from None
        except Exception as e:
            raise self._err(f"reading identity {identity}", e) from None

    def list(self) -> list[Obj]:
        items: list[Obj] = []
        cont: str | None = None
        try:
            while True:
                kw: dict[str, Any] = {"limit": 500, "_request_timeout": self.timeout}
                if cont:
                    kw["_continue"] = cont
                page = cast(Obj, self.api.list_cluster_custom_object(GROUP, self.version, PLURAL, **kw))
                items.extend(page.get("items") or [])
                cont = (page.get("metadata") or {}).get("continue")
                if not cont:
                    return items
        except self._client.ApiException as e:
            raise self._err("listing identities", e) from None
        except Exception as e:
            raise self._err("listing identities", e) from None

    def delete(self, identity: int, uid: str, resource_version: str) -> bool:
        c = self._client
        body = c.V1DeleteOptions(preconditions=c.V1Preconditions(uid=uid, resource_version=resource_version))
        try:
            self.api.delete_cluster_custom_object(
                GROUP, self.version, PLURAL, str(identity), body=body, _request_timeout=self.timeout
            )
            return True
        except c.ApiException as e:
            if e.status in (404, 409):
                return False
            raise self._err(f"deleting identity {identity}", e) from None
        except Exception as e:
            raise self._err(f"deleting identity {identity}", e) from None


class MemoryIdentityBackend:
    """An in-process identity store with the API server's semantics (shared by several allocators
    in tests to play several agents)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objs: dict[int, Obj] = {}
        self._rv = itertools.count(1)
        self.calls: list[tuple[str, int]] = []

    def create(self, identity: int, security_labels: Mapping[str, str]) -> Obj:
        with self._lock:
            self.calls.append(("create", identity))
            if identity in self._objs:
                raise AlreadyExistsError(f"identity {identity} exists")
            obj = identity_object(identity, security_labels)
            obj["metadata"]["uid"] = str(uuid.uuid4())
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            self._objs[identity] = obj
            return copy.deepcopy(obj)

    def get(self, identity: int) -> Obj | None:
        with self._lock:
            self.calls.append(("get", identity))
            o = self._objs.get(identity)
            return copy.deepcopy(o) if o else None

    def list(self) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for _, o in sorted(self._objs.items())]

    def delete(self, identity: int, uid: str, resource_version: str) -> bool:
        with self._lock:
            self.calls.append(("delete", identity))
            o = self._objs.get(identity)
            if (
                o is None
                or o["metadata"]["uid"] != uid
                or o["metadata"]["resourceVersion"] != resource_version
            ):
                return False
            del self._objs[identity]
            return True

    def touch(self, identity: int) -> None:
        """Bump the resourceVersion (tests: a concurrent writer)."""
        with self._lock:
            self._objs[identity]["metadata"]["resourceVersion"] = str(next(self._rv))
