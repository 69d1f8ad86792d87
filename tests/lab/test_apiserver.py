"""The lab's Kubernetes API server, driven by the official `kubernetes` client and by kubectl."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from pycilium.lab.apiserver import APIServerThread, write_kubeconfig

KUBECTL = shutil.which("kubectl") or "kubectl"  # installed by scripts/setup.sh


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[APIServerThread]:
    srv = APIServerThread(bookmark_interval=0.3, history_size=1000)
    srv.start()
    yield srv
    srv.stop()


def make_client(url: str, retries: int | None = 0) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = url
    cfg.retries = retries
    return client.ApiClient(cfg)


@pytest.fixture(scope="module")
def api(server: APIServerThread) -> Iterator[client.ApiClient]:
    c = make_client(server.url)
    yield c
    c.close()


@pytest.fixture
def v1(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def ns(v1: client.CoreV1Api) -> Iterator[str]:
    """A fresh namespace per test, deleted (with everything in it) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    v1.create_namespace({"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiException):
        v1.delete_namespace(name)


def status_of(e: ApiException) -> dict[str, Any]:
    body = json.loads(e.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == e.status
    return body


def pod(name: str, labels: dict[str, str] | None = None, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def http(
    url: str, method: str = "GET", body: Any = None, ctype: str = "application/json", timeout: float = 5
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def fault(url: str, **spec: Any) -> dict[str, Any]:
    code, body = http(f"{url}/_lab/faults", "POST", spec)
    assert code == 200, body
    return body


# --- CRUD and errors ----------------------------------------------------------------------------


def test_crud_metadata_and_errors(v1: client.CoreV1Api, ns: str) -> None:
    created = v1.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"a": "1"}})
    meta = created.metadata
    assert meta.uid and meta.creation_timestamp and meta.generation == 1 and meta.namespace == ns
    rv1 = int(meta.resource_version)

    got = v1.read_namespaced_config_map("cfg", ns)
    assert got.data == {"a": "1"} and got.metadata.resource_version == str(rv1)

    # update with the current resourceVersion succeeds and bumps it; a stale one is a 409 Conflict
    got.data = {"a": "2"}
    upd = v1.replace_namespaced_config_map("cfg", ns, got)
    assert int(upd.metadata.resource_version) > rv1 and upd.metadata.uid == meta.uid
    got.data = {"a": "3"}
    with pytest.raises(ApiException) as ei:
        v1.replace_namespaced_config_map("cfg", ns, got)
    st = status_of(ei.value)
    assert ei.value.status == 409 and st["reason"] == "Conflict"

    # a write that changes nothing does not create a new resourceVersion
    same = v1.patch_namespaced_config_map("cfg", ns, {"data": {"a": "2"}})
    assert same.metadata.resource_version == upd.metadata.resource_version

    # create conflict: 409 AlreadyExists (the agent's identity lock relies on it)
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}})
    st = status_of(ei.value)
    assert (ei.value.status, st["reason"]) == (409, "AlreadyExists")
    assert st["details"] == {"name": "cfg", "group": "", "kind": "configmaps"}

    # generateName
    gen = v1.create_namespaced_config_map(ns, {"metadata": {"generateName": "cfg-"}})
    assert gen.metadata.name.startswith("cfg-") and len(gen.metadata.name) == 9

    # 422 Invalid names the field
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map(ns, {"metadata": {"name": "Bad_Name"}})
    st = status_of(ei.value)
    assert (ei.value.status, st["reason"]) == (422, "Invalid")
    assert st["details"]["causes"][0]["field"] == "metadata.name"

    # creating in a namespace that does not exist is 404
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map("no-such-ns", {"metadata": {"name": "x"}})
    assert ei.value.status == 404

    v1.delete_namespaced_config_map("cfg", ns)
    with pytest.raises(ApiException) as ei:
        v1.read_namespaced_config_map("cfg", ns)
    st = status_of(ei.value)
    assert (ei.value.status, st["reason"]) == (404, "NotFound")
    assert st["message"] == 'configmaps "cfg" not found'


def test_patch_types_and_generation(api: client.ApiClient, ns: str) -> None:
    apps = client.AppsV1Api(api)
    dep = {
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
                        {"name": "b", "image": "b:1"},
                    ]
                },
            },
        },
    }
    d = apps.create_namespaced_deployment(ns, dep)
    assert d.metadata.generation == 1
    # strategic merge patch (the client's default for dicts): containers merge by name
    d = apps.patch_namespaced_deployment(
        "web", ns, {"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "b:2"}]}}}}
    )
    containers = d.spec.template.spec.containers
    assert [(c.name, c.image) for c in containers] == [("a", "a:1"), ("b", "b:2")]
    assert containers[0].env[0].value == "1" and d.metadata.generation == 2
    # metadata-only changes do not bump generation
    d = apps.patch_namespaced_deployment("web", ns, {"metadata": {"labels": {"extra": "y"}}})
    assert d.metadata.generation == 2 and d.metadata.labels == {"app": "web", "extra": "y"}
    # JSON patch; a failing `test` op is rejected
    body = [{"op": "replace", "path": "/spec/replicas", "value": 3}]
    d = apps.patch_namespaced_deployment("web", ns, body)
    assert d.spec.replicas == 3
    with pytest.raises(ApiException) as ei:
        apps.patch_namespaced_deployment("web", ns, [{"op": "test", "path": "/spec/replicas", "value": 1}])
    assert ei.value.status == 422
    # merge patch with a stale resourceVersion is a conflict
    code, st = http(
        f"{api.configuration.host}/apis/apps/v1/namespaces/{ns}/deployments/web",
        "PATCH",
        {"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 5}},
        ctype="application/merge-patch+json",
    )
    assert code == 409 and st["reason"] == "Conflict"


def test_status_subresource(v1: client.CoreV1Api, ns: str) -> None:
    p = v1.create_namespaced_pod(ns, pod("p", node="n1"))
    assert p.status.phase == "Pending"
    p = v1.patch_namespaced_pod_status(
        "p", ns, {"status": {"phase": "Running", "podIP": "10.0.1.5"}, "spec": {"nodeName": "other"}}
    )
    assert p.status.phase == "Running" and p.status.pod_ip == "10.0.1.5"
    assert p.spec.node_name == "n1" and p.metadata.generation == 1  # status writes touch only .status
    # main writes keep the status
    p.status.phase = "Failed"
    p.metadata.labels = {"x": "y"}
    p = v1.replace_namespaced_pod("p", ns, p)
    assert p.status.phase == "Running" and p.metadata.labels == {"x": "y"}
    p = v1.patch_namespaced_pod("p", ns, {"status": {"phase": "Succeeded"}})
    assert p.status.phase == "Running"
    # PUT /status replaces only the status
    p.status.pod_ip = "10.0.1.6"
    p.metadata.labels = {"ignored": "yes"}
    p = v1.replace_namespaced_pod_status("p", ns, p)
    assert p.status.pod_ip == "10.0.1.6" and p.metadata.labels == {"x": "y"}


def test_finalizers_namespace_cascade_and_deletecollection(v1: client.CoreV1Api, ns: str) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "held", "finalizers": ["lab/x"]}})
    v1.delete_namespaced_config_map("held", ns)
    held = v1.read_namespaced_config_map("held", ns)
    assert held.metadata.deletion_timestamp is not None
    v1.patch_namespaced_config_map("held", ns, [{"op": "remove", "path": "/metadata/finalizers"}])
    with pytest.raises(ApiException):
        v1.read_namespaced_config_map("held", ns)

    for i in range(4):
        v1.create_namespaced_config_map(ns, {"metadata": {"name": f"c{i}", "labels": {"del": str(i % 2)}}})
    v1.delete_collection_namespaced_config_map(ns, label_selector="del=1")
    assert sorted(c.metadata.name for c in v1.list_namespaced_config_map(ns).items) == ["c0", "c2"]

    other = f"{ns}-b"
    v1.create_namespace({"metadata": {"name": other}})
    assert v1.read_namespace(other).metadata.labels == {"kubernetes.io/metadata.name": other}
    v1.create_namespaced_config_map(other, {"metadata": {"name": "c"}})
    v1.delete_namespace(other)
    assert v1.list_namespaced_config_map(other).items == []


def test_leases_and_endpointslices(api: client.ApiClient, ns: str) -> None:
    coord = client.CoordinationV1Api(api)
    lease = coord.create_namespaced_lease(
        ns, {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}
    )
    lease.spec.holder_identity = "b"
    assert coord.replace_namespaced_lease("leader", ns, lease).spec.holder_identity == "b"
    disc = client.DiscoveryV1Api(api)
    eps = {
        "metadata": {"generateName": "web-", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
    made = disc.create_namespaced_endpoint_slice(ns, eps)
    got = disc.list_namespaced_endpoint_slice(ns, label_selector="kubernetes.io/service-name=web").items
    assert [s.metadata.name for s in got] == [made.metadata.name]
    assert got[0].endpoints[0].addresses == ["10.0.0.5"]


# --- subresources: deployments/scale, pods/binding, bindings --------------------------------------


def test_deployment_scale_subresource(api: client.ApiClient, ns: str) -> None:
    apps = client.AppsV1Api(api)
    selector = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["b", "a"]}],
    }
    template = {"metadata": {"labels": {"app": "web", "tier": "a"}}, "spec": {"containers": [{"name": "c"}]}}
    dep = apps.create_namespaced_deployment(
        ns, {"metadata": {"name": "web"}, "spec": {"replicas": 3, "selector": selector, "template": template}}
    )
    apps.patch_namespaced_deployment_status("web", ns, {"status": {"replicas": 2}})
    sc = apps.read_namespaced_deployment_scale("web", ns)
    assert (sc.kind, sc.api_version) == ("Scale", "autoscaling/v1")
    assert sc.metadata.name == "web" and sc.metadata.uid == dep.metadata.uid
    assert sc.spec.replicas == 3 and sc.status.replicas == 2
    assert sc.status.selector == "app=web,tier in (a,b)"

    # PATCH (a dict: strategic merge patch) changes spec.replicas and nothing else of the Deployment
    sc = apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 5}})
    assert sc.spec.replicas == 5
    d = apps.read_namespaced_deployment("web", ns)
    assert d.spec.replicas == 5 and d.metadata.generation == 2 and d.status.replicas == 2
    assert d.spec.template.metadata.labels == {"app": "web", "tier": "a"}
    assert sc.metadata.resource_version == d.metadata.resource_version
    # JSON patch on the Scale
    sc = apps.patch_namespaced_deployment_scale(
        "web", ns, [{"op": "replace", "path": "/spec/replicas", "value": 0}]
    )
    assert sc.spec.replicas == 0 and apps.read_namespaced_deployment("web", ns).spec.replicas == 0

    # PUT with the current resourceVersion; a stale one is a Conflict and changes nothing
    sc.spec.replicas = 4
    fresh = apps.replace_namespaced_deployment_scale("web", ns, sc)
    assert fresh.spec.replicas == 4 and fresh.metadata.resource_version != sc.metadata.resource_version
    sc.spec.replicas = 7
    with pytest.raises(ApiException) as ei:
        apps.replace_namespaced_deployment_scale("web", ns, sc)
    assert ei.value.status == 409 and status_of(ei.value)["reason"] == "Conflict"
    # negative replicas are invalid; a missing Deployment is 404
    url = f"{api.configuration.host}/apis/apps/v1/namespaces/{ns}/deployments"
    code, st = http(f"{url}/web/scale", "PUT", {"spec": {"replicas": -1}})
    assert code == 422 and st["reason"] == "Invalid" and "spec.replicas" in st["message"]
    assert apps.read_namespaced_deployment("web", ns).spec.replicas == 4
    with pytest.raises(ApiException) as ei:
        apps.read_namespaced_deployment_scale("nope", ns)
    assert ei.value.status == 404
    # dryRun changes nothing; a subresource cannot be deleted or watched
    code, st = http(
        f"{url}/web/scale?dryRun=All", "PATCH", {"spec": {"replicas": 9}}, "application/merge-patch+json"
    )
    assert code == 200 and st["spec"]["replicas"] == 9
    assert apps.read_namespaced_deployment_scale("web", ns).spec.replicas == 4
    assert http(f"{url}/web/scale", "DELETE")[0] == 405
    assert (
        http(f"{api.configuration.host}/apis/apps/v1/watch/namespaces/{ns}/deployments/web/scale")[0] == 404
    )

    # without spec.replicas the Deployment counts as 1 replica
    apps.create_namespaced_deployment(
        ns, {"metadata": {"name": "one"}, "spec": {"selector": selector, "template": template}}
    )
    assert apps.read_namespaced_deployment_scale("one", ns).spec.replicas == 1
    # a watch on Deployments sees the scale change as a MODIFIED event
    rv = apps.list_namespaced_deployment(ns).metadata.resource_version
    apps.patch_namespaced_deployment_scale("one", ns, {"spec": {"replicas": 2}})
    w = watch.Watch()
    seen = [(ev["type"], ev["object"].metadata.name, ev["object"].spec.replicas)
            for ev in w.stream(apps.list_namespaced_deployment, ns, resource_version=rv, timeout_seconds=1)]  # fmt: skip
    assert seen == [("MODIFIED", "one", 2)]


def test_scale_and_binding_are_in_discovery(api: client.ApiClient) -> None:
    apps = {r.name: r for r in client.AppsV1Api(api).get_api_resources().resources}
    scale = apps["deployments/scale"]
    assert (scale.group, scale.version, scale.kind) == ("autoscaling", "v1", "Scale")
    assert sorted(scale.verbs) == ["get", "patch", "update"] and scale.namespaced
    core = {r.name: r for r in client.CoreV1Api(api).get_api_resources().resources}
    assert core["pods/binding"].kind == "Binding" and core["pods/binding"].verbs == ["create"]
    assert core["bindings"].kind == "Binding" and core["bindings"].verbs == ["create"]
    assert "daemonsets/scale" not in apps and "services/binding" not in core


def test_pod_binding_assigns_a_node_once(v1: client.CoreV1Api, ns: str) -> None:
    def binding(name: str, node: str, **meta: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, **meta},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}  # fmt: skip

    for name in ("a", "b", "c"):
        v1.create_namespaced_pod(ns, pod(name))
    rv = v1.list_namespaced_pod(ns).metadata.resource_version
    uid = v1.read_namespaced_pod("a", ns).metadata.uid
    # the answer is a Status, which the client cannot read as a V1Binding: take it raw
    r = v1.create_namespaced_pod_binding(
        "a", ns, binding("a", "node1", uid=uid, annotations={"lab/why": "test"}), _preload_content=False
    )
    st = json.loads(r.data)
    assert r.status == 201 and (st["kind"], st["status"], st["code"]) == ("Status", "Success", 201)
    p = v1.read_namespaced_pod("a", ns)
    assert p.spec.node_name == "node1" and p.metadata.annotations == {"lab/why": "test"}
    assert [(c.type, c.status) for c in p.status.conditions] == [("PodScheduled", "True")]
    assert p.status.phase == "Pending"

    # a bound pod cannot be bound again, not even to the same node
    for node in ("node2", "node1"):
        with pytest.raises(ApiException) as ei:
            v1.create_namespaced_pod_binding("a", ns, binding("a", node), _preload_content=False)
        st = status_of(ei.value)
        assert ei.value.status == 409 and st["reason"] == "Conflict" and "already assigned" in st["message"]
    assert v1.read_namespaced_pod("a", ns).spec.node_name == "node1"

    # the bindings collection names the pod in the Binding
    r = v1.create_namespaced_binding(ns, binding("b", "node2"), _preload_content=False)
    assert r.status == 201 and v1.read_namespaced_pod("b", ns).spec.node_name == "node2"

    url = f"{v1.api_client.configuration.host}/api/v1/namespaces/{ns}"
    bad = [
        ("pods/c/binding", binding("other", "node1"), 400),  # name differs from the URL's
        ("pods/c/binding", binding("c", "node1", uid="not-its-uid"), 409),
        ("pods/c/binding", {"kind": "Binding", "metadata": {"name": "c"}, "target": {}}, 422),
        ("pods/gone/binding", binding("gone", "node1"), 404),
        ("bindings", binding("gone", "node1"), 404),
    ]
    for path, body, code in bad:
        got, st = http(f"{url}/{path}", "POST", body)
        assert (got, st["kind"]) == (code, "Status"), (path, st)
    assert http(f"{url}/pods/c/binding")[0] == 405
    assert http(f"{url}/bindings")[0] == 405
    code, _ = http(f"{url}/pods/c/binding?dryRun=All", "POST", binding("c", "node1"))
    assert code == 201 and v1.read_namespaced_pod("c", ns).spec.node_name is None

    # a pod being deleted is not bound
    v1.patch_namespaced_pod("c", ns, {"metadata": {"finalizers": ["lab/hold"]}})
    v1.delete_namespaced_pod("c", ns)
    code, st = http(f"{url}/pods/c/binding", "POST", binding("c", "node1"))
    assert code == 409 and "being deleted" in st["message"]
    v1.patch_namespaced_pod("c", ns, [{"op": "remove", "path": "/metadata/finalizers"}])

    # a kubelet watching its node's pods sees each pod arrive when it is bound
    w = watch.Watch()
    seen = [(ev["type"], ev["object"].metadata.name)
            for ev in w.stream(v1.list_namespaced_pod, ns, resource_version=rv, field_selector="spec.nodeName=node1",
                               timeout_seconds=1)]  # fmt: skip
    assert seen == [("ADDED", "a")]


# --- list: selectors and pagination --------------------------------------------------------------


def test_list_selectors_and_pagination(v1: client.CoreV1Api, ns: str) -> None:
    specs = [
        ("a", {"app": "web", "tier": "fe"}, "n1"),
        ("b", {"app": "web", "tier": "be"}, "n2"),
        ("c", {"app": "db"}, "n1"),
        ("d", {}, None),
    ]
    for name, labels, node in specs:
        v1.create_namespaced_pod(ns, pod(name, labels, node))

    def names(**kw: Any) -> list[str]:
        return [p.metadata.name for p in v1.list_namespaced_pod(ns, **kw).items]

    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app==web,tier=be") == ["b"]
    assert names(label_selector="app!=web") == ["c", "d"]
    assert names(label_selector="tier in (fe, be)") == ["a", "b"]
    assert names(label_selector="app notin (web)") == ["c", "d"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c", "d"]
    assert names(label_selector="app,!tier") == ["c"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="spec.nodeName=n1") == ["a", "c"]
    assert names(field_selector="spec.nodeName!=n1,metadata.name!=d") == ["b"]
    assert names(field_selector="status.phase=Pending") == ["a", "b", "c", "d"]
    with pytest.raises(ApiException) as ei:
        names(label_selector="app in (web")
    assert ei.value.status == 400

    # all namespaces, narrowed by metadata.namespace
    everywhere = client.CoreV1Api(v1.api_client).list_pod_for_all_namespaces(
        field_selector=f"metadata.namespace={ns}"
    )
    assert [p.metadata.name for p in everywhere.items] == ["a", "b", "c", "d"]

    # pagination
    page1 = v1.list_namespaced_pod(ns, limit=3)
    assert [p.metadata.name for p in page1.items] == ["a", "b", "c"]
    assert page1.metadata._continue and page1.metadata.remaining_item_count == 1
    page2 = v1.list_namespaced_pod(ns, limit=3, _continue=page1.metadata._continue)
    assert [p.metadata.name for p in page2.items] == ["d"] and not page2.metadata._continue
    assert page2.metadata.resource_version == page1.metadata.resource_version


# --- watch -------------------------------------------------------------------------------------


def test_watch_from_resource_version_and_selectors(v1: client.CoreV1Api, ns: str) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "pre", "labels": {"w": "1"}}})
    rv = v1.list_namespaced_config_map(ns).metadata.resource_version
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "x", "labels": {"w": "1"}}})
    v1.patch_namespaced_config_map("x", ns, {"data": {"k": "v"}})
    v1.patch_namespaced_config_map("x", ns, {"metadata": {"labels": {"w": "2"}}})  # stops matching w=1
    v1.patch_namespaced_config_map("pre", ns, {"metadata": {"labels": {"w": "1", "z": "z"}}})
    v1.delete_namespaced_config_map("pre", ns)

    def events(**kw: Any) -> list[tuple[str, str]]:
        w = watch.Watch()
        out = []
        for ev in w.stream(v1.list_namespaced_config_map, ns, timeout_seconds=1, **kw):
            out.append((ev["type"], ev["object"].metadata.name))
            if len(out) == kw.pop("_n", 99):
                w.stop()
        return out

    assert events(resource_version=rv) == [
        ("ADDED", "x"),
        ("MODIFIED", "x"),
        ("MODIFIED", "x"),
        ("MODIFIED", "pre"),
        ("DELETED", "pre"),
    ]
    assert events(resource_version=rv, label_selector="w=1") == [
        ("ADDED", "x"),
        ("MODIFIED", "x"),
        ("DELETED", "x"),  # no longer matches the selector
        ("MODIFIED", "pre"),
        ("DELETED", "pre"),
    ]
    # rv unset: synthetic ADDED for what exists now
    assert events() == [("ADDED", "x")]


def test_watch_live_events_bookmarks_and_timeout(v1: client.CoreV1Api, ns: str) -> None:
    rv = v1.list_namespaced_config_map(ns).metadata.resource_version
    w = watch.Watch()
    seen: list[tuple[str, str]] = []
    created = False
    # the client-side read timeout turns a stream the server never ends into a failure, not a hang
    for ev in w.stream(v1.list_namespaced_config_map, ns, resource_version=rv, allow_watch_bookmarks=True,
                       timeout_seconds=2, _request_timeout=30):  # fmt: skip
        if ev["type"] == "BOOKMARK":
            obj = ev["raw_object"]
            assert obj["kind"] == "ConfigMap" and int(obj["metadata"]["resourceVersion"]) >= int(rv)
            seen.append(("BOOKMARK", obj["metadata"]["resourceVersion"]))
            if not created:
                created = True
                v1.create_namespaced_config_map(ns, {"metadata": {"name": "live"}})
        else:
            seen.append((ev["type"], ev["object"].metadata.name))
    # timeoutSeconds=2 ended the stream cleanly (the loop above returned); it stayed open long enough
    # for several bookmarks (every 0.3 s) after the event, i.e. it was not cut short at the first one
    kinds = [k for k, _ in seen]
    assert ("ADDED", "live") in seen and kinds.count("BOOKMARK") >= 3
    # the bookmark after the event carries a version at least as new as the event's
    added_at = seen.index(("ADDED", "live"))
    live_rv = int(v1.read_namespaced_config_map("live", ns).metadata.resource_version)
    later = [int(v) for k, v in seen[added_at:] if k == "BOOKMARK"]
    assert later and later[0] >= live_rv


def test_watch_410_after_history_trimmed() -> None:
    with APIServerThread(history_size=3) as srv:
        c = make_client(srv.url)
        v1 = client.CoreV1Api(c)
        rv = v1.list_namespaced_config_map("default").metadata.resource_version
        for i in range(5):
            v1.create_namespaced_config_map("default", {"metadata": {"name": f"c{i}"}})
        with pytest.raises(ApiException) as ei:
            for _ in watch.Watch().stream(
                v1.list_namespaced_config_map, "default", resource_version=rv, timeout_seconds=2
            ):
                pass
        assert ei.value.status == 410 and "Expired" in str(ei.value.reason)
        # the raw stream: one ERROR event with a Status 410 Expired, then the stream ends
        resp = v1.list_namespaced_config_map(
            "default", watch=True, resource_version=rv, _preload_content=False
        )
        lines = [json.loads(x) for x in resp.data.decode().splitlines()]
        assert len(lines) == 1 and lines[0]["type"] == "ERROR"
        assert lines[0]["object"]["code"] == 410 and lines[0]["object"]["reason"] == "Expired"
        # a recent version is still covered by the 3 buffered events
        recent = v1.read_namespaced_config_map("c3", "default").metadata.resource_version
        evs = list(
            watch.Watch().stream(
                v1.list_namespaced_config_map, "default", resource_version=recent, timeout_seconds=1
            )
        )
        assert [e["object"].metadata.name for e in evs] == ["c4"]
        # trimming by hand (in-process control) expires everything older than now
        srv.trim_history("configmaps")
        with pytest.raises(ApiException) as ei:
            list(
                watch.Watch().stream(
                    v1.list_namespaced_config_map, "default", resource_version=recent, timeout_seconds=1
                )
            )
        assert ei.value.status == 410
        c.close()


# --- CRDs ---------------------------------------------------------------------------------------


def crd(plural: str, kind: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.lab.pycilium.io"},
        "spec": {
            "group": "lab.pycilium.io",
            "scope": scope,
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "shortNames": [plural[:3]]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def test_crd_registration_and_custom_objects(api: client.ApiClient, ns: str) -> None:
    ext = client.ApiextensionsV1Api(api)
    co = client.CustomObjectsApi(api)
    g, v = "lab.pycilium.io", "v1"
    made = ext.create_custom_resource_definition(crd("widgets", "Widget", "Namespaced"))
    assert {c.type for c in made.status.conditions} == {"Established", "NamesAccepted"}
    ext.create_custom_resource_definition(crd("identities", "Identity", "Cluster"))
    try:
        # discovery shows the new group and resources at once
        code, doc = http(f"{api.configuration.host}/apis/{g}/{v}")
        assert code == 200
        res = {r["name"]: r for r in doc["resources"]}
        assert res["widgets"]["namespaced"] and not res["identities"]["namespaced"]
        assert res["widgets"]["shortNames"] == ["wid"] and "widgets/status" in res

        w = co.create_namespaced_custom_object(
            g,
            v,
            ns,
            "widgets",
            {
                "apiVersion": f"{g}/{v}",
                "kind": "Widget",
                "metadata": {"name": "w1", "labels": {"k": "v"}},
                "spec": {"size": 1},
            },
        )
        assert w["metadata"]["uid"] and w["kind"] == "Widget"
        w = co.patch_namespaced_custom_object(g, v, ns, "widgets", "w1", {"spec": {"size": 2}})
        assert w["spec"]["size"] == 2 and w["metadata"]["generation"] == 2
        w = co.patch_namespaced_custom_object_status(g, v, ns, "widgets", "w1", {"status": {"ok": True}})
        assert w["status"] == {"ok": True} and w["metadata"]["generation"] == 2
        assert [
            i["metadata"]["name"]
            for i in co.list_namespaced_custom_object(g, v, ns, "widgets", label_selector="k=v")["items"]
        ] == ["w1"]

        # cluster-scoped identity objects: create-conflict as a lock
        ident = {
            "apiVersion": f"{g}/{v}",
            "kind": "Identity",
            "metadata": {"name": "1234"},
            "security-labels": {"a": "b"},
        }
        co.create_cluster_custom_object(g, v, "identities", ident)
        with pytest.raises(ApiException) as ei:
            co.create_cluster_custom_object(g, v, "identities", ident)
        assert ei.value.status == 409 and status_of(ei.value)["details"]["group"] == g
        rv = co.list_cluster_custom_object(g, v, "identities")["metadata"]["resourceVersion"]
        co.delete_cluster_custom_object(g, v, "identities", "1234")
        evs = list(
            watch.Watch().stream(
                co.list_cluster_custom_object, g, v, "identities", resource_version=rv, timeout_seconds=1
            )
        )
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("DELETED", "1234")]

        # a bad CRD is rejected with 422
        bad = crd("things", "Thing", "Namespaced")
        bad["metadata"]["name"] = "wrong.lab.pycilium.io"
        with pytest.raises(ApiException) as ei:
            ext.create_custom_resource_definition(bad)
        assert (
            ei.value.status == 422 and status_of(ei.value)["details"]["causes"][0]["field"] == "metadata.name"
        )
    finally:
        ext.delete_custom_resource_definition("widgets.lab.pycilium.io")
        ext.delete_custom_resource_definition("identities.lab.pycilium.io")
    # the resource is gone with its CRD
    with pytest.raises(ApiException) as ei:
        co.list_namespaced_custom_object(g, v, ns, "widgets")
    assert ei.value.status == 404


# --- Services -----------------------------------------------------------------------------------


def svc(
    name: str, type_: str = "ClusterIP", cluster_ip: str | None = None, node_port: int | None = None
) -> dict[str, Any]:
    port: dict[str, Any] = {"port": 80, "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    spec: dict[str, Any] = {"type": type_, "selector": {"app": name}, "ports": [port]}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"metadata": {"name": name}, "spec": spec}


def test_service_cluster_ip_and_node_port_allocation(v1: client.CoreV1Api, ns: str) -> None:
    import ipaddress

    a = v1.create_namespaced_service(ns, svc("a"))
    ip = a.spec.cluster_ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/12") and a.spec.cluster_ips == [ip]
    assert ip != "10.96.0.1"  # kept for the `kubernetes` Service
    headless = v1.create_namespaced_service(ns, svc("h", cluster_ip="None"))
    assert headless.spec.cluster_ip == "None"

    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_service(ns, svc("dup", cluster_ip=ip))
    st = status_of(ei.value)
    assert ei.value.status == 422 and st["details"]["causes"][0]["field"] == "spec.clusterIPs"
    assert "already allocated" in st["message"]
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_service(ns, svc("out", cluster_ip="192.168.1.1"))
    assert ei.value.status == 422

    np_svc = v1.create_namespaced_service(ns, svc("np", "NodePort"))
    port = np_svc.spec.ports[0].node_port
    assert 30000 <= port <= 32767 and np_svc.spec.ports[0].protocol == "TCP"
    lb = v1.create_namespaced_service(ns, svc("lb", "LoadBalancer"))
    assert lb.spec.ports[0].node_port not in (None, port)
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_service(ns, svc("np2", "NodePort", node_port=port))
    st = status_of(ei.value)
    assert ei.value.status == 422 and st["details"]["causes"][0]["field"] == "spec.ports[0].nodePort"

    # updates keep allocations when the fields are left empty; clusterIP is immutable
    body = svc("np", "NodePort")
    body["metadata"]["labels"] = {"x": "y"}
    kept = v1.replace_namespaced_service("np", ns, body)
    assert kept.spec.cluster_ip == np_svc.spec.cluster_ip and kept.spec.ports[0].node_port == port
    with pytest.raises(ApiException) as ei:
        v1.patch_namespaced_service("np", ns, {"spec": {"clusterIP": ip}})
    assert ei.value.status == 422

    # release on delete and on type change: the same values can be taken again
    v1.delete_namespaced_service("a", ns)
    v1.delete_namespaced_service("np", ns)
    again = v1.create_namespaced_service(ns, svc("again", "NodePort", cluster_ip=ip, node_port=port))
    assert again.spec.cluster_ip == ip and again.spec.ports[0].node_port == port
    lb_port = lb.spec.ports[0].node_port
    changed = v1.patch_namespaced_service("lb", ns, {"spec": {"type": "ClusterIP"}})
    assert changed.spec.ports[0].node_port is None
    assert (
        v1.create_namespaced_service(ns, svc("reuse", "NodePort", node_port=lb_port)).spec.ports[0].node_port
        == lb_port
    )


# --- faults -------------------------------------------------------------------------------------


def test_fault_cut_watches(server: APIServerThread, v1: client.CoreV1Api, ns: str) -> None:
    for graceful, via_http in ((False, False), (True, True)):
        # a read timeout turns a watch the cut did not end into a failure (ReadTimeoutError), not a hang
        resp = v1.list_namespaced_config_map(ns, watch=True, _preload_content=False, _request_timeout=10)
        deadline = time.monotonic() + 5
        while server.active_watches == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if via_http:
            assert fault(server.url, action="cut_watches", graceful=True)["cut"] >= 1
        else:
            assert server.cut_watches(graceful=graceful) >= 1
        try:
            data = b"".join(resp.stream(1024))
            ended_cleanly = True
        except urllib3.exceptions.ProtocolError:
            data, ended_cleanly = b"", False
        resp.release_conn()
        assert ended_cleanly is graceful and data == b""


def test_fault_delay_and_gone(server: APIServerThread, v1: client.CoreV1Api, ns: str) -> None:
    server.set_delay(300)
    try:
        start = time.monotonic()
        v1.list_namespaced_pod(ns)
        assert time.monotonic() - start >= 0.3
    finally:
        assert fault(server.url, action="delay", ms=0)["delayMs"] == 0

    rv = v1.list_namespaced_pod(ns).metadata.resource_version
    fault(server.url, action="gone", resource="pods")
    with pytest.raises(ApiException) as ei:
        list(watch.Watch().stream(v1.list_namespaced_pod, ns, resource_version=rv, timeout_seconds=1))
    assert ei.value.status == 410
    # only the next watch; other resources unaffected
    assert (
        list(watch.Watch().stream(v1.list_namespaced_pod, ns, resource_version=rv, timeout_seconds=1)) == []
    )
    server.force_gone()  # every resource's next watch
    for fn in (v1.list_namespaced_pod, v1.list_namespaced_service):
        with pytest.raises(ApiException) as ei:
            list(watch.Watch().stream(fn, ns, resource_version=rv, timeout_seconds=1))
        assert ei.value.status == 410
    server.clear_faults()


def test_fault_refuse(server: APIServerThread, v1: client.CoreV1Api, ns: str) -> None:
    fault(server.url, action="refuse", seconds=0.6, mode="503")
    with pytest.raises(ApiException) as ei:
        v1.list_namespaced_pod(ns)
    assert ei.value.status == 503 and status_of(ei.value)["reason"] == "ServiceUnavailable"
    assert fault(server.url, action="clear")["refuseSecondsLeft"] == 0
    v1.list_namespaced_pod(ns)

    server.refuse(0.6, mode="close")
    with pytest.raises(urllib3.exceptions.HTTPError):
        v1.list_namespaced_pod(ns)
    time.sleep(0.7)
    assert v1.list_namespaced_pod(ns).items == []


# --- persistence and the command line -----------------------------------------------------------


def test_state_persists_across_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "state.json")
    with APIServerThread(state_file=state) as srv:
        v1 = client.CoreV1Api(make_client(srv.url))
        v1.create_namespaced_service("default", svc("kept", "NodePort"))
        before = v1.read_namespaced_service("kept", "default")
        list_rv = v1.list_namespaced_service("default").metadata.resource_version
    with APIServerThread(state_file=state) as srv:
        v1 = client.CoreV1Api(make_client(srv.url))
        after = v1.read_namespaced_service("kept", "default")
        assert after.metadata.uid == before.metadata.uid and after.spec.cluster_ip == before.spec.cluster_ip
        # allocations are remembered: the same ClusterIP cannot be taken again
        with pytest.raises(ApiException) as ei:
            v1.create_namespaced_service("default", svc("x", cluster_ip=before.spec.cluster_ip))
        assert ei.value.status == 422
        # resourceVersions keep increasing; watches from before the restart must re-list
        cm = v1.create_namespaced_config_map("default", {"metadata": {"name": "new"}})
        assert int(cm.metadata.resource_version) > int(list_rv)
        with pytest.raises(ApiException) as ei:
            list(
                watch.Watch().stream(
                    v1.list_namespaced_service, "default", resource_version=list_rv, timeout_seconds=1
                )
            )
        assert ei.value.status == 410


def test_binds_the_address_given() -> None:
    with APIServerThread(host="127.0.0.2", port=0) as srv:
        assert srv.url.startswith("http://127.0.0.2:")
        code, body = http(f"{srv.url}/api")
        assert code == 200 and body["versions"] == ["v1"]


def test_command_line_server(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    kubeconfig = tmp_path / "kc"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pycilium.lab.apiserver",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--state",
            str(state),
            "--kubeconfig",
            str(kubeconfig),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        code, ver = http(f"{url}/version")
        assert code == 200 and ver["major"] == "1"
        code, _ = http(f"{url}/api/v1/namespaces/default/configmaps", "POST", {"metadata": {"name": "cli"}})
        assert code == 201
        assert kubeconfig.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    saved = json.loads(state.read_text())
    assert [o["metadata"]["name"] for o in saved["objects"]["/configmaps"]] == ["cli"]


# --- kubectl ------------------------------------------------------------------------------------

MANIFEST = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {ns}
  labels: {{app: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - name: http
    port: 80
    targetPort: {target}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny
  namespace: {ns}
spec:
  podSelector: {{}}
  policyTypes: [Ingress]
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.lab.pycilium.io
spec:
  group: lab.pycilium.io
  scope: Namespaced
  names: {{plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}}
  versions:
  - name: v1
    served: true
    storage: true
    additionalPrinterColumns:
    - {{name: Size, type: integer, jsonPath: .spec.n}}
    schema:
      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def test_kubectl_apply_get_patch_delete(server: APIServerThread, tmp_path: Path) -> None:
    kc = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    ns = f"k-{uuid.uuid4().hex[:6]}"

    def kubectl(*args: str, stdin: str | None = None) -> str:
        env = {**os.environ, "HOME": str(tmp_path)}
        cmd = [str(KUBECTL), "--kubeconfig", kc, "--cache-dir", str(tmp_path / "cache"), *args]
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
        return r.stdout

    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST.format(ns=ns, target=8080))
    try:
        assert kubectl("create", "namespace", ns).strip() == f"namespace/{ns} created"
        out = kubectl("apply", "-f", str(manifest))
        assert "service/web created" in out and "customresourcedefinition" in out
        svc_obj = json.loads(kubectl("get", "-n", ns, "svc", "web", "-o", "json"))
        assert svc_obj["spec"]["ports"][0]["nodePort"] >= 30000
        # re-apply with a change: client-side apply computes a strategic merge patch
        manifest.write_text(MANIFEST.format(ns=ns, target=9090))
        out = kubectl("apply", "-f", str(manifest))
        assert "service/web configured" in out and "networkpolicy.networking.k8s.io/deny unchanged" in out
        svc2 = json.loads(kubectl("get", "-n", ns, "svc", "web", "-o", "json"))
        node_port = svc_obj["spec"]["ports"][0]["nodePort"]
        assert (
            svc2["spec"]["ports"][0]["targetPort"] == 9090
            and svc2["spec"]["ports"][0]["nodePort"] == node_port
        )
        # server-side printing: kubectl's table columns
        table = kubectl("get", "-n", ns, "svc", "-o", "wide").splitlines()
        assert table[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE", "SELECTOR"]
        assert table[1].split()[:5] == [
            "web",
            "NodePort",
            svc_obj["spec"]["clusterIP"],
            "<none>",
            f"80:{node_port}/TCP",
        ]

        # typed-client commands send protobuf bodies
        kubectl("create", "configmap", "made", "-n", ns, "--from-literal=a=1")
        assert json.loads(kubectl("get", "-n", ns, "cm", "made", "-o", "json"))["data"] == {"a": "1"}

        # the CRD from the same file is served; short names come from discovery
        kubectl(
            "apply",
            "-f",
            "-",
            stdin=f"apiVersion: lab.pycilium.io/v1\nkind: Gadget\nmetadata: {{name: g1, namespace: {ns}}}\nspec: {{n: 1}}\n",
        )
        kubectl("patch", "-n", ns, "gd", "g1", "--type=merge", "-p", '{"spec":{"n":2}}')
        lst = json.loads(kubectl("get", "-n", ns, "gadgets", "-o", "json"))
        assert [(i["metadata"]["name"], i["spec"]["n"]) for i in lst["items"]] == [("g1", 2)]
        assert kubectl("get", "-n", ns, "gd", "-l", "!nope").split()[:4] == ["NAME", "SIZE", "AGE", "g1"]

        kubectl("label", "-n", ns, "netpol", "deny", "team=a")
        assert (
            json.loads(kubectl("get", "-n", ns, "netpol", "-l", "team=a", "-o", "json"))["items"][0][
                "metadata"
            ]["name"]
            == "deny"
        )
        kubectl("delete", "-n", ns, "gadget", "g1")
        out = kubectl("get", "-n", ns, "gadgets", "-o", "json")
        assert json.loads(out)["items"] == []
        kubectl("delete", "-f", str(manifest))
        kubectl("delete", "namespace", ns)
    finally:
        for args in (["-f", str(manifest)], ["namespace", ns]):
            subprocess.run(
                [
                    str(KUBECTL),
                    "--kubeconfig",
                    kc,
                    "--cache-dir",
                    str(tmp_path / "cache"),
                    "delete",
                    "--ignore-not-found",
                    *args,
                ],
                capture_output=True,
                timeout=30,
            )
    v1 = client.CoreV1Api(make_client(server.url))
    with pytest.raises(ApiException):
        v1.read_namespace(ns)


def test_kubectl_scale(server: APIServerThread, api: client.ApiClient, ns: str, tmp_path: Path) -> None:
    kc = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    apps = client.AppsV1Api(api)
    template = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    apps.create_namespaced_deployment(ns, {"metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": template}})  # fmt: skip

    def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HOME": str(tmp_path)}
        cmd = [str(KUBECTL), "--kubeconfig", kc, "--cache-dir", str(tmp_path / "cache"), "-n", ns, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)

    r = kubectl("scale", "deployment/web", "--replicas=3")
    assert r.returncode == 0 and r.stdout.strip() == "deployment.apps/web scaled", r.stderr
    assert apps.read_namespaced_deployment("web", ns).spec.replicas == 3
    # --current-replicas is a precondition: a wrong one changes nothing
    r = kubectl("scale", "deployment/web", "--current-replicas=2", "--replicas=1")
    assert r.returncode != 0 and apps.read_namespaced_deployment("web", ns).spec.replicas == 3
    r = kubectl("scale", "deploy", "web", "--current-replicas=3", "--replicas=0")
    assert r.returncode == 0, r.stderr
    assert apps.read_namespaced_deployment("web", ns).spec.replicas == 0
