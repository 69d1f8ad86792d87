"""The CustomResourceDefinitions the agent owns, and their installer.

The agent creates or updates these at start (Helm installs deploy/helm/pycilium/crds/ only on first
install and never upgrades them), so a new agent version brings its schema along. The definitions
here and the chart's files must describe the same resources; a test compares them.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from kubernetes import client as k8s_client

from .client import APIError, request_json
from .resources import CRD_GROUP, CRD_VERSION, CRDS, PYCILIUM_IDENTITIES, PYCILIUM_NETWORK_POLICIES, Resource

log = logging.getLogger("pycilium.k8s.crds")

Obj = dict[str, Any]

_AGE_COLUMN = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]

_SELECTOR: Obj = {
    "description": "Label selector of endpoints (an empty selector selects all).",
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_CIDR: Obj = {"type": "string", "pattern": r"^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$"}
_CIDR_SET: Obj = {
    "type": "object",
    "required": ["cidr"],
    "properties": {"cidr": _CIDR, "except": {"type": "array", "items": _CIDR}},
}
_TO_PORTS: Obj = {
    "description": "Ports the rule is limited to (all ports when absent).",
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "ports": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {
                        "port": {
                            "description": "Port number or named container port.",
                            "type": "string",
                            "maxLength": 15,
                        },
                        "endPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "protocol": {"type": "string", "enum": ["TCP", "UDP", "ANY"], "default": "ANY"},
                    },
                },
            }
        },
    },
}


def _crd(res: Resource, singular: str, short: str, schema: Obj) -> Obj:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{res.plural}.{res.group}",
            "labels": {"app.kubernetes.io/part-of": "pycilium"},
        },
        "spec": {
            "group": res.group,
            "scope": "Namespaced" if res.namespaced else "Cluster",
            "names": {
                "kind": res.kind,
                "listKind": f"{res.kind}List",
                "plural": res.plural,
                "singular": singular,
                "shortNames": [short],
                "categories": ["pycilium"],
            },
            "versions": [
                {
                    "name": res.version,
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": copy.deepcopy(_AGE_COLUMN),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


IDENTITY_CRD = _crd(
    PYCILIUM_IDENTITIES,
    "pyciliumidentity",
    "pcid",
    {
        "description": (
            "A security identity: a cluster-wide number for one set of security-relevant labels "
            "(pod labels plus namespace). The object's name is the number; agents allocate one by "
            "creating it (an AlreadyExists conflict means another node allocated it first) and delete "
            "it when no endpoint in the cluster uses it any more."
        ),
        "type": "object",
        "required": ["security-labels"],
        "x-kubernetes-validations": [
            {
                "rule": "self.metadata.name.matches('^[1-9][0-9]{0,9}$')",
                "message": "the name of a PyCiliumIdentity is its numeric identity",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "security-labels": {
                "description": (
                    "The labels this identity stands for, as source:key=value pairs "
                    '(e.g. "k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default").'
                ),
                "type": "object",
                "additionalProperties": {"type": "string"},
            },
        },
    },
)

NETWORK_POLICY_CRD = _crd(
    PYCILIUM_NETWORK_POLICIES,
    "pyciliumnetworkpolicy",
    "pcnp",
    {
        "description": (
            "Identity-based network policy for the endpoints of one namespace selected by "
            "endpointSelector. Rules allow traffic; an endpoint selected by any policy denies "
            "whatever no rule allows in that direction."
        ),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["endpointSelector"],
                "properties": {
                    "description": {"type": "string", "maxLength": 1024},
                    "endpointSelector": _SELECTOR,
                    "ingress": {
                        "description": "Allowed incoming traffic.",
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "fromEndpoints": {
                                    "description": (
                                        "Peers by labels (namespace via k8s:io.kubernetes.pod.namespace)."
                                    ),
                                    "type": "array",
                                    "items": _SELECTOR,
                                },
                                "fromCIDR": {"type": "array", "items": _CIDR},
                                "fromCIDRSet": {"type": "array", "items": _CIDR_SET},
                                "toPorts": _TO_PORTS,
                            },
                        },
                    },
                    "egress": {
                        "description": "Allowed outgoing traffic.",
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "toEndpoints": {"type": "array", "items": _SELECTOR},
                                "toCIDR": {"type": "array", "items": _CIDR},
                                "toCIDRSet": {"type": "array", "items": _CIDR_SET},
                                "toPorts": _TO_PORTS,
                            },
                        },
                    },
                },
            },
        },
    },
)

AGENT_CRDS: tuple[Obj, ...] = (IDENTITY_CRD, NETWORK_POLICY_CRD)
assert all(c["spec"]["group"] == CRD_GROUP for c in AGENT_CRDS)
assert all(c["spec"]["versions"][0]["name"] == CRD_VERSION for c in AGENT_CRDS)


def _needs_update(current: Obj, wanted: Obj) -> bool:
    cur_labels = (current.get("metadata") or {}).get("labels") or {}
    want_labels = wanted["metadata"].get("labels") or {}
    if any(cur_labels.get(k) != v for k, v in want_labels.items()):
        return True
    cur_spec = current.get("spec") or {}
    for k, v in wanted["spec"].items():
        if k == "versions":
            continue
        if cur_spec.get(k) != v and not (k == "names" and _names_cover(cur_spec.get(k) or {}, v)):
            return True
    cur_versions = {v.get("name"): v for v in cur_spec.get("versions") or []}
    for v in wanted["spec"]["versions"]:
        cv = cur_versions.get(v["name"])
        if cv is None or any(cv.get(k) != val for k, val in v.items()):
            return True
    return False


def _names_cover(current: Obj, wanted: Obj) -> bool:
    return all(current.get(k) == v for k, v in wanted.items())


def install_crds(
    api: k8s_client.ApiClient,
    crds: tuple[Obj, ...] = AGENT_CRDS,
    *,
    wait_established: float = 30.0,
) -> list[str]:
    """Create or update each CRD, then wait until it is Established; returns the names changed."""
    changed: list[str] = []
    for wanted in crds:
        name = wanted["metadata"]["name"]
        for _attempt in range(5):
            try:
                request_json(api, "POST", CRDS.path(), body=wanted)
                log.info("created CRD %s", name)
                changed.append(name)
                break
            except APIError as e:
                if e.status != 409:
                    raise
            current = request_json(api, "GET", CRDS.path(name=name))
            if not _needs_update(current, wanted):
                break
            body = copy.deepcopy(wanted)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            labels = dict((current.get("metadata") or {}).get("labels") or {})
            labels.update(body["metadata"].get("labels") or {})
            body["metadata"]["labels"] = labels
            # Keep versions we do not know (served by a newer agent, or stored objects' versions).
            ours = {v["name"] for v in body["spec"]["versions"]}
            for v in (current.get("spec") or {}).get("versions") or []:
                if v.get("name") not in ours:
                    body["spec"]["versions"].append({**v, "storage": False})
            try:
                request_json(api, "PUT", CRDS.path(name=name), body=body)
            except APIError as e:
                if e.status == 409:  # raced with another writer: read again
                    continue
                raise
            log.info("updated CRD %s", name)
            changed.append(name)
            break
        else:
            raise RuntimeError(f"could not create or update CRD {name}: too many conflicts")
    deadline = time.monotonic() + wait_established
    for wanted in crds:
        name = wanted["metadata"]["name"]
        while True:
            cur = request_json(api, "GET", CRDS.path(name=name))
            conds = (cur.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {wait_established}s")
            time.sleep(0.1)
    return changed
