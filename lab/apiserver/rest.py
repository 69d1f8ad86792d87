"""The generic REST semantics: get, list, create, update, patch, delete on any resource type.

Objects are plain dicts. Writers build a fresh dict and hand it to the store, which stamps the
resourceVersion. Conventions followed from kube-apiserver:

- create: name from generateName when absent; uid, creationTimestamp, generation 1; the namespace
  must exist; a taken name is 409 AlreadyExists. Status is taken from the body (the lab creates Nodes
  with their addresses in one call); a Pod without status.phase gets Pending.
- update/patch: a stale metadata.resourceVersion in the body is 409 Conflict; identity fields (uid,
  name, namespace, creationTimestamp) cannot change; resources with a status subresource keep
  .status on main writes, and /status writes change only .status; generation increments when
  anything outside metadata and status changes; a write that changes nothing is not stored (no new
  resourceVersion, no event).
- delete: objects with finalizers get metadata.deletionTimestamp and go away once an update empties
  the finalizers; otherwise deletion is immediate (also for Pods unless `graceful_pod_deletion`).
  Deleting a Namespace deletes everything in it at once (no Terminating phase).
- list: sorted by namespace/name; `limit` + `continue` page through the *current* state (no snapshot
  at the first page's resourceVersion, which the continue token still reports).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from . import semantics
from .allocators import ClusterIPAllocator, NodePortAllocator
from .errors import APIError, already_exists, bad_request, conflict, invalid, not_found
from .patch import apply_patch
from .resources import Registry, ResourceType
from .selectors import FieldSelector, LabelSelector
from .semantics import Txn, now
from .store import Store

Obj = dict[str, Any]

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_GEN_CHARS = "bcdfghjklmnpqrstvwxz2456789"
NS_KEY = "/namespaces"


class API:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        cluster_ips: ClusterIPAllocator,
        node_ports: NodePortAllocator,
        *,
        graceful_pod_deletion: bool = False,
    ) -> None:
        self.store = store
        self.registry = registry
        self.cluster_ips = cluster_ips
        self.node_ports = node_ports
        self.graceful_pod_deletion = graceful_pod_deletion

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def out(rt: ResourceType, obj: Obj) -> Obj:
        """The object as read through `rt`'s version (custom resources may be served in several)."""
        if obj.get("apiVersion") == rt.api_version and obj.get("kind") == rt.kind:
            return obj
        return {**obj, "apiVersion": rt.api_version, "kind": rt.kind}

    def _existing(self, rt: ResourceType, ns: str, name: str) -> Obj:
        obj = self.store.get(rt.key, ns if rt.namespaced else "", name)
        if obj is None:
            raise not_found(rt.plural, rt.group, name)
        return obj

    # --- reads --------------------------------------------------------------------------------

    def get(self, rt: ResourceType, ns: str, name: str) -> Obj:
        return self.out(rt, self._existing(rt, ns, name))

    def matching(
        self, rt: ResourceType, ns: str | None, labels: LabelSelector, fields: FieldSelector
    ) -> list[Obj]:
        if ns is None and rt.namespaced:
            ns = fields.value_of("metadata.namespace")
        objs = self.store.list_objects(rt.key, ns if rt.namespaced else None)
        name = fields.value_of("metadata.name")
        return [
            o
            for o in objs
            if (name is None or o["metadata"]["name"] == name)
            and labels.matches(o["metadata"].get("labels"))
            and fields.matches(o)
        ]

    def list_objects(
        self,
        rt: ResourceType,
        ns: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        limit: int = 0,
        cont: str | None = None,
    ) -> Obj:
        items = self.matching(rt, ns, labels, fields)
        rv = self.store.rv
        if cont:
            try:
                tok = json.loads(base64.urlsafe_b64decode(cont.encode()))
                rv, start = int(tok["rv"]), (tok["ns"], tok["name"])
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise bad_request("continue key is not valid") from None
            items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > start]
        meta: Obj = {"resourceVersion": str(rv)}
        if limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            tok = {"rv": rv, "ns": last.get("namespace", ""), "name": last["name"]}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(tok).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": [self.out(rt, o) for o in items],
        }

    # --- writes -------------------------------------------------------------------------------

    def create(self, rt: ResourceType, ns: str, body: Any, *, dry_run: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        if body.get("kind") not in (None, rt.kind):
            raise bad_request(f"the kind of the object ({body.get('kind')}) does not match {rt.kind}")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = ns
            if self.store.get(NS_KEY, "", ns) is None:
                raise not_found("namespaces", "", ns)
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            gen = meta.get("generateName")
            if not gen:
                raise invalid(
                    rt.kind,
                    rt.group,
                    "",
                    "metadata.name",
                    None,
                    "Required value: name or generateName is required",
                )
            while True:
                meta["name"] = gen + "".join(random.choices(_GEN_CHARS, k=5))
                if self.store.get(rt.key, meta.get("namespace", ""), meta["name"]) is None:
                    break
        name = meta["name"]
        if not isinstance(name, str) or len(name) > 253 or not NAME_RE.match(name):
            raise invalid(
                rt.kind,
                rt.group,
                str(name),
                "metadata.name",
                name,
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
                "'-' or '.', and must start and end with an alphanumeric character",
            )
        if self.store.get(rt.key, meta.get("namespace", ""), name) is not None:
            raise already_exists(rt.plural, rt.group, name)
        for f in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(f, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1
        txn = Txn()
        try:
            semantics.admit(self, rt, None, obj, txn)
        except BaseException:
            txn.rollback()
            raise
        if dry_run:
            txn.rollback()
            return self.out(rt, obj)
        self.store.put(rt.key, obj)
        txn.done()
        semantics.after_write(self, rt, obj)
        return self.out(rt, obj)

    def _check_identity(self, rt: ResourceType, ns: str, name: str, body: Obj) -> None:
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, "", name):
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        if rt.namespaced and meta.get("namespace") not in (None, "", ns):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )

    def update(
        self, rt: ResourceType, ns: str, name: str, body: Any, *, status: bool = False, dry_run: bool = False
    ) -> Obj:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        old = self._existing(rt, ns, name)
        self._check_identity(rt, ns, name, body)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv not in (None, "") and rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, rt.group, name)
        if status:
            new = copy.deepcopy(old)
            if body.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = copy.deepcopy(body["status"])
        else:
            new = copy.deepcopy(body)
            new.setdefault("metadata", {})
            if rt.has_status:
                self._keep_status(old, new)
        return self._write(rt, old, new, status=status, dry_run=dry_run)

    def patch(
        self,
        rt: ResourceType,
        ns: str,
        name: str,
        kind: str,
        body: Any,
        *,
        status: bool = False,
        dry_run: bool = False,
    ) -> Obj:
        old = self.store.get(rt.key, ns if rt.namespaced else "", name)
        if old is None:
            if kind == "apply" and not status:
                if isinstance(body, dict):
                    self._check_identity(rt, ns, name, body)
                    body = {**body, "metadata": {**(body.get("metadata") or {}), "name": name}}
                return self.create(rt, ns, body, dry_run=dry_run)
            raise not_found(rt.plural, rt.group, name)
        if kind == "apply" and isinstance(body, dict):
            self._check_identity(rt, ns, name, body)
        patched = apply_patch(kind, copy.deepcopy(old), body)
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise APIError(422, "Invalid", "the patch produced something that is not an object with metadata")
        rv = patched["metadata"].get("resourceVersion")
        if rv not in (None, "", old["metadata"]["resourceVersion"]):
            raise conflict(rt.plural, rt.group, name)
        if status:
            new = copy.deepcopy(old)
            if patched.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = patched["status"]
        else:
            new = patched
            if rt.has_status:
                self._keep_status(old, new)
        return self._write(rt, old, new, status=status, dry_run=dry_run)

    @staticmethod
    def _keep_status(old: Obj, new: Obj) -> None:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)

    def _write(self, rt: ResourceType, old: Obj, new: Obj, *, status: bool, dry_run: bool) -> Obj:
        meta, old_meta = new["metadata"], old["metadata"]
        new["apiVersion"], new["kind"] = old.get("apiVersion", rt.api_version), rt.kind
        for f in (
            "uid",
            "name",
            "namespace",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if f in old_meta:
                meta[f] = old_meta[f]
            else:
                meta.pop(f, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        meta.pop("managedFields", None)
        meta["generation"] = old_meta.get("generation", 1)
        if not status and _spec_of(new) != _spec_of(old):
            meta["generation"] += 1
        txn = Txn()
        try:
            if not status:
                semantics.admit(self, rt, old, new, txn)
        except BaseException:
            txn.rollback()
            raise
        if dry_run or new == old:
            txn.rollback()
            return self.out(rt, new if dry_run else old)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            txn.done()
            return self._remove(rt, old)
        self.store.put(rt.key, new)
        txn.done()
        semantics.after_write(self, rt, new)
        return self.out(rt, new)

    def delete(
        self, rt: ResourceType, ns: str, name: str, options: Obj | None = None, *, dry_run: bool = False
    ) -> tuple[Obj, bool]:
        """Delete (or start deleting) an object; returns (object, finished)."""
        options = options or {}
        old = self._existing(rt, ns, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != old["metadata"].get("uid"):
            why = f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {old['metadata'].get('uid')}"
            raise conflict(rt.plural, rt.group, name, why)
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
            why = (
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {old['metadata']['resourceVersion']}"
            )
            raise conflict(rt.plural, rt.group, name, why)
        grace = self._grace_period(rt, old, options)
        if not old["metadata"].get("finalizers") and not grace:
            return (self.out(rt, old) if dry_run else self._remove(rt, old)), True
        if dry_run:
            return self.out(rt, old), False
        new = copy.deepcopy(old)
        if not new["metadata"].get("deletionTimestamp"):
            when = datetime.now(UTC) + timedelta(seconds=grace)
            new["metadata"]["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        if new == old:
            return self.out(rt, old), False
        return self.out(rt, self.store.put(rt.key, new)), False

    def _grace_period(self, rt: ResourceType, pod: Obj, options: Obj) -> int:
        """Pods bound to a node get a grace period (kubelet deletes them with 0) when enabled."""
        if not (self.graceful_pod_deletion and rt.key == "/pods"):
            return 0
        if not (pod.get("spec") or {}).get("nodeName"):
            return 0
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return 0
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        return max(0, int(grace))

    def _remove(self, rt: ResourceType, old: Obj) -> Obj:
        meta = old["metadata"]
        gone = self.store.remove(rt.key, meta.get("namespace", ""), meta["name"])
        assert gone is not None
        semantics.after_delete(self, rt, gone)
        return self.out(rt, gone)

    def delete_collection(
        self,
        rt: ResourceType,
        ns: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        options: Obj | None = None,
        *,
        dry_run: bool = False,
    ) -> Obj:
        items = []
        for o in self.matching(rt, ns, labels, fields):
            m = o["metadata"]
            obj, _ = self.delete(rt, m.get("namespace", ""), m["name"], options, dry_run=dry_run)
            items.append(obj)
        return {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    def purge_namespace(self, ns: str) -> None:
        """Delete every namespaced object in `ns` (after the Namespace itself is gone)."""
        keys = {rt.key: rt for rt in self.registry.by_gvr.values() if rt.namespaced}
        for key, rt in sorted(keys.items()):
            for o in self.store.list_objects(key, ns):
                self._remove(rt, o)

    def ensure_namespace(self, name: str) -> None:
        if self.store.get(NS_KEY, "", name) is None:
            rt = self.registry.get("", "v1", "namespaces")
            assert rt is not None
            self.create(rt, "", {"metadata": {"name": name}})


def _spec_of(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
