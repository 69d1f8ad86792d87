"""Discovery documents: /api, /api/v1, /apis, /apis/<group>, /apis/<group>/<version>, /version.

Only the legacy (unaggregated) format is served: clients asking for aggregated discovery
(`application/json;g=apidiscovery.k8s.io;...`) get plain JSON and fall back, as kubectl does.
"""

from __future__ import annotations

from typing import Any

from .resources import Registry

Obj = dict[str, Any]

KUBE_VERSION = ("1", "32")


def version_info() -> Obj:
    major, minor = KUBE_VERSION
    return {
        "major": major,
        "minor": minor,
        "gitVersion": f"v{major}.{minor}.0-pycilium-lab",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-01-01T00:00:00Z",
        "goVersion": "go1.22.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _pb_string(field: int, value: str) -> bytes:
    data = value.encode()
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


# An OpenAPI v2 document with no definitions, in the protobuf encoding kubectl asks for
# (`openapi_v2.Document{swagger: "2.0", info: {title, version}}`). kubectl refuses to create or apply
# when /openapi/v2 is missing ("failed to download openapi"); with an empty schema it skips client-side
# validation and computes apply patches from its built-in types (or JSON merge patches for CRs).
_INFO = _pb_string(1, "pycilium lab API server") + _pb_string(2, "v1.32.0")
OPENAPI_V2_PROTOBUF = _pb_string(1, "2.0") + bytes([2 << 3 | 2, len(_INFO)]) + _INFO
OPENAPI_V2_JSON: Obj = {
    "swagger": "2.0",
    "info": {"title": "pycilium lab API server", "version": "v1.32.0"},
    "paths": {},
    "definitions": {},
}


def api_versions(server_address: str) -> Obj:
    return {
        "kind": "APIVersions",
        "apiVersion": "v1",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> Obj:
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list(reg: Registry) -> Obj:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(g, vs) for g, vs in reg.groups().items() if g],
    }


def api_group(reg: Registry, group: str) -> Obj | None:
    versions = reg.groups().get(group)
    if not group or not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, versions)}


def api_resource_list(reg: Registry, group: str, version: str) -> Obj | None:
    types = reg.resources(group, version)
    if not types:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [e for rt in types for e in rt.discovery_entries()],
    }
