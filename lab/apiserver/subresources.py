"""Subresources that are views or actions rather than parts of the stored object.

- `deployments/scale` (GET, PUT, PATCH): the Deployment seen as an autoscaling/v1 `Scale`:
  `spec.replicas` from the Deployment (1 when unset), `status.replicas` from its status and
  `status.selector` its label selector in query-string form. PUT and PATCH (any patch type, applied
  to the Scale) change only the Deployment's `spec.replicas`; its generation increments as for any
  spec change. A `metadata.resourceVersion` in the body must be the Deployment's (409 otherwise).
- `pods/binding` (POST) and the `bindings` collection (POST, the Binding's `metadata.name` names
  the Pod): assign a Pod to a node as the scheduler does. Sets `spec.nodeName`, adds the Binding's
  annotations to the Pod and a `PodScheduled=True` condition. 409 Conflict when the Pod is already
  assigned, is being deleted, or its uid differs from a uid the Binding carries. The answer is a
  `Status` with `status: Success` and code 201, as kube-apiserver gives.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from .errors import APIError, bad_request, conflict, invalid, not_found
from .patch import apply_patch
from .resources import ResourceType
from .semantics import now

if TYPE_CHECKING:
    from .rest import API

Obj = dict[str, Any]

SCALE_GROUP, SCALE_VERSION, SCALE_KIND = "autoscaling", "v1", "Scale"
BINDING_KIND = "Binding"


# --- scale ------------------------------------------------------------------------------------


def selector_string(selector: Any) -> str:
    """A metav1.LabelSelector rendered as a label-selector query string (requirements sorted by key)."""
    if not isinstance(selector, dict):
        return ""
    reqs: list[tuple[str, str]] = []
    for k, v in (selector.get("matchLabels") or {}).items():
        reqs.append((str(k), f"{k}={v}"))
    for e in selector.get("matchExpressions") or []:
        key, op = str(e.get("key", "")), e.get("operator")
        values = ",".join(sorted(str(v) for v in e.get("values") or []))
        if op == "In":
            reqs.append((key, f"{key} in ({values})"))
        elif op == "NotIn":
            reqs.append((key, f"{key} notin ({values})"))
        elif op == "Exists":
            reqs.append((key, key))
        elif op == "DoesNotExist":
            reqs.append((key, f"!{key}"))
    return ",".join(text for _, text in sorted(reqs, key=lambda r: r[0]))


def scale_of(obj: Obj) -> Obj:
    """The autoscaling/v1 Scale view of a Deployment."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    smeta = {
        k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta
    }
    return {
        "kind": SCALE_KIND,
        "apiVersion": f"{SCALE_GROUP}/{SCALE_VERSION}",
        "metadata": smeta,
        "spec": {"replicas": int(spec.get("replicas", 1))},
        "status": {
            "replicas": int(status.get("replicas") or 0),
            "selector": selector_string(spec.get("selector")),
        },
    }


def get_scale(api: API, rt: ResourceType, ns: str, name: str) -> Obj:
    return scale_of(api.get(rt, ns, name))


def update_scale(api: API, rt: ResourceType, ns: str, name: str, body: Any, *, dry_run: bool = False) -> Obj:
    """PUT .../scale: set the Deployment's spec.replicas from a Scale."""
    if not isinstance(body, dict):
        raise bad_request("the body of the request was in an unknown format")
    if body.get("kind") not in (None, "", SCALE_KIND):
        raise bad_request(f"the kind of the object ({body.get('kind')}) does not match {SCALE_KIND}")
    meta = body.get("metadata") or {}
    if meta.get("name") not in (None, "", name):
        raise bad_request(
            f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
        )
    if meta.get("namespace") not in (None, "", ns):
        raise bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )
    replicas = (body.get("spec") or {}).get("replicas", 0)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise invalid(
            SCALE_KIND,
            SCALE_GROUP,
            name,
            "spec.replicas",
            replicas,
            "must be greater than or equal to 0",
        )
    old = api.get(rt, ns, name)
    rv = meta.get("resourceVersion")
    if rv not in (None, "") and rv != old["metadata"]["resourceVersion"]:
        raise conflict(rt.plural, rt.group, name)
    new = copy.deepcopy(old)
    new.setdefault("spec", {})["replicas"] = replicas
    return scale_of(api.update(rt, ns, name, new, dry_run=dry_run))


def patch_scale(
    api: API, rt: ResourceType, ns: str, name: str, kind: str, body: Any, *, dry_run: bool = False
) -> Obj:
    """PATCH .../scale: the patch applies to the Scale, whose spec.replicas then goes to the Deployment."""
    current = get_scale(api, rt, ns, name)
    patched = apply_patch(kind, copy.deepcopy(current), body)
    if not isinstance(patched, dict):
        raise APIError(422, "Invalid", "the patch produced something that is not an object")
    return update_scale(api, rt, ns, name, patched, dry_run=dry_run)


# --- binding ----------------------------------------------------------------------------------


def _success(code: int) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}


def bind(api: API, pods: ResourceType, ns: str, name: str | None, body: Any, *, dry_run: bool = False) -> Obj:
    """POST pods/NAME/binding (name given) or bindings (name from the Binding): assign the Pod."""
    if not isinstance(body, dict):
        raise bad_request("the body of the request was in an unknown format")
    if body.get("kind") not in (None, "", BINDING_KIND):
        raise bad_request(f"the kind of the object ({body.get('kind')}) does not match {BINDING_KIND}")
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        raise bad_request("metadata must be an object")
    bname = meta.get("name") or name
    if not bname:
        raise invalid(BINDING_KIND, "", "", "metadata.name", None, "Required value: name is required")
    if name is not None and bname != name:
        raise bad_request(f"name in URL does not match name in Binding object ({bname} != {name})")
    if meta.get("namespace") not in (None, "", ns):
        raise bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )
    target = body.get("target") or {}
    node = target.get("name") if isinstance(target, dict) else None
    if not node:
        raise invalid(BINDING_KIND, "", bname, "target.name", None, "Required value")
    if target.get("kind") not in (None, "", "Node"):
        raise invalid(BINDING_KIND, "", bname, "target.kind", target.get("kind"), "must be empty or 'Node'")
    pod = api.store.get(pods.key, ns, bname)
    if pod is None:
        raise not_found(pods.plural, pods.group, bname)
    pmeta = pod["metadata"]

    def refuse(why: str) -> APIError:
        return conflict("pods/binding", "", bname, why)

    if meta.get("uid") and meta["uid"] != pmeta.get("uid"):
        raise refuse(
            f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: {pmeta.get('uid')}"
        )
    if pmeta.get("deletionTimestamp"):
        raise refuse(f"pod {bname} is being deleted, cannot be assigned to a host")
    assigned = (pod.get("spec") or {}).get("nodeName")
    if assigned:
        raise refuse(f"pod {bname} is already assigned to node {assigned!r}")
    new = copy.deepcopy(pod)
    new.setdefault("spec", {})["nodeName"] = node
    if meta.get("annotations"):
        new["metadata"].setdefault("annotations", {}).update(meta["annotations"])
    status = new.setdefault("status", {})
    conds = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
    conds.append(
        {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now()}
    )
    status["conditions"] = conds
    # one write of spec and status together, as the binding registry does (not two through the REST verbs)
    new["metadata"]["generation"] = int(pmeta.get("generation", 1)) + 1
    if not dry_run:
        api.store.put(pods.key, new)
    return _success(201)
