"""`pycilium lab apply/delete`: manifest parsing, the update rules, and apply/delete against the
embedded API server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client
from pycilium.lab import manifests
from pycilium.lab.apiserver import APIServerThread
from pycilium.lab.cluster.kube import NAMESPACE, POD, SERVICE, Kube
from pycilium.lab.manifests import ContainerPort, ManifestError


@pytest.fixture(scope="module")
def kube() -> Iterator[Kube]:
    srv = APIServerThread(graceful_pod_deletion=False)
    srv.start()
    cfg = client.Configuration()
    cfg.host = srv.url
    k = Kube(api=client.ApiClient(cfg))
    try:
        yield k
    finally:
        k.close()
        srv.stop()


# ---- parsing --------------------------------------------------------------------------------------


def test_parse_multi_document_with_list_and_empty_docs() -> None:
    objs = manifests.parse(
        """
---
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: x}}
---
# only a comment
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c1}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c2}}
"""
    )
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("Namespace", "a"),
        ("ConfigMap", "c1"),
        ("ConfigMap", "c2"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\nmetadata: {name: x}", "missing apiVersion"),
        ("apiVersion: v1\nmetadata: {name: x}", "missing kind"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {}", "missing metadata.name"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x, labels: {a: 1}}",
            "metadata.labels must map to strings",
        ),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}", "spec.containers is required"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}",
            "containerPort must be a port number",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"
            "spec: {containers: [{name: c, ports: [{containerPort: 80, protocol: ICMP}]}]}",
            "unknown protocol",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}",
            "spec.template.spec is required",
        ),
        ("- a\n- b", "is not a mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        manifests.parse(text, "f.yaml")


def test_load_reports_missing_file(tmp_path: object) -> None:
    with pytest.raises(ManifestError, match="No such file"):
        manifests.load("/nonexistent/x.yaml")


# ---- pod spec helpers -----------------------------------------------------------------------------

POD_SPEC = {
    "spec": {
        "containers": [
            {
                "name": "a",
                "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 53, "protocol": "UDP"}],
            },
            {"name": "b", "ports": [{"containerPort": 9090, "protocol": "TCP", "name": "metrics"}]},
        ]
    }
}


def test_container_ports_default_to_tcp() -> None:
    assert manifests.container_ports(POD_SPEC) == [
        ContainerPort(8080, "TCP", "http"),
        ContainerPort(53, "UDP", ""),
        ContainerPort(9090, "TCP", "metrics"),
    ]
    assert manifests.container_ports({"spec": {"containers": [{"name": "x"}]}}) == []


def test_resolve_target_port_by_number_name_and_default() -> None:
    assert manifests.resolve_target_port(POD_SPEC, 7000, 80, "TCP") == 7000
    assert manifests.resolve_target_port(POD_SPEC, "7001", 80, "TCP") == 7001
    assert manifests.resolve_target_port(POD_SPEC, None, 80, "TCP") == 80
    assert manifests.resolve_target_port(POD_SPEC, "metrics", 80, "TCP") == 9090
    assert manifests.resolve_target_port(POD_SPEC, "http", 80, "UDP") is None  # protocol must match
    assert manifests.resolve_target_port(POD_SPEC, "nope", 80, "TCP") is None


def test_label_selectors() -> None:
    assert manifests.match_labels({"app": "a"}, {"app": "a", "x": "y"})
    assert not manifests.match_labels({}, {"app": "a"})  # an empty Service selector selects nothing
    sel = {
        "matchLabels": {"app": "a"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe"]}],
    }
    assert manifests.match_label_selector(sel, {"app": "a", "tier": "fe"})
    assert not manifests.match_label_selector(sel, {"app": "a", "tier": "be"})
    assert manifests.match_label_selector({}, {"anything": "x"})
    assert not manifests.match_label_selector({"matchExpressions": [{"key": "k", "operator": "Exists"}]}, {})


# ---- update rules ---------------------------------------------------------------------------------


def test_updated_pod_replaces_labels_and_keeps_spec() -> None:
    existing = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": "d",
            "uid": "u1",
            "resourceVersion": "7",
            "labels": {"a": "1", "b": "2"},
        },
        "spec": {
            "nodeName": "node1",
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "TCP"}]}],
        },
        "status": {"phase": "Running"},
    }
    desired = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "d", "labels": {"a": "9"}},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
    }
    body, warnings = manifests.updated(existing, desired)
    assert body["metadata"]["labels"] == {"a": "9"}
    assert body["metadata"]["uid"] == "u1" and body["spec"] == existing["spec"]
    assert warnings == []  # same ports once defaulted
    desired["spec"]["containers"][0]["ports"] = [{"containerPort": 81}]
    _, warnings = manifests.updated(existing, desired)
    assert warnings and "kept" in warnings[0]


def test_updated_service_keeps_allocations_unless_given() -> None:
    existing = {
        "metadata": {"name": "s", "uid": "u", "resourceVersion": "3"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9"],
                 "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30111}]},
    }  # fmt: skip
    desired = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81, "nodePort": 30222}]},
    }
    body, _ = manifests.updated(existing, desired)
    assert body["spec"]["clusterIP"] == "10.96.0.9"
    assert [p.get("nodePort") for p in body["spec"]["ports"]] == [30111, 30222]
    assert body["metadata"]["resourceVersion"] == "3"


# ---- against the API server -----------------------------------------------------------------------


def _doc(ns: str, pod_labels: str = "{app: web, tier: fe}") -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}, labels: {{team: t}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {ns}, labels: {pod_labels}}}
spec: {{nodeName: node1, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
"""


def test_apply_creates_then_updates_in_place(kube: Kube) -> None:
    ns = f"m{uuid.uuid4().hex[:6]}"
    out = manifests.apply(kube, manifests.parse(_doc(ns)))
    assert [str(o) for o in out] == [
        f"namespace/{ns} created",
        f"pod/{ns}/web created",
        f"service/{ns}/web created",
    ]
    pod = kube.get(POD, "web", ns)
    svc = kube.get(SERVICE, "web", ns)
    assert pod is not None and svc is not None
    node_port = svc["spec"]["ports"][0]["nodePort"]

    out = manifests.apply(kube, manifests.parse(_doc(ns)))
    assert [o.action for o in out] == ["unchanged", "unchanged", "unchanged"]

    out = manifests.apply(kube, manifests.parse(_doc(ns, "{app: web, tier: be, new: x}")))
    assert [o.action for o in out] == ["unchanged", "configured", "unchanged"]
    pod2 = kube.get(POD, "web", ns)
    assert pod2 is not None
    assert pod2["metadata"]["uid"] == pod["metadata"]["uid"]  # never recreated
    assert pod2["metadata"]["labels"] == {"app": "web", "tier": "be", "new": "x"}
    out = manifests.apply(kube, manifests.parse(_doc(ns, "{app: web}")))
    pod3 = kube.get(POD, "web", ns)
    assert pod3 is not None and pod3["metadata"]["labels"] == {"app": "web"}  # replaced, not merged
    svc2 = kube.get(SERVICE, "web", ns)
    assert svc2 is not None
    assert svc2["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
    assert svc2["spec"]["ports"][0]["nodePort"] == node_port

    out = manifests.delete(kube, manifests.parse(_doc(ns)))
    assert [str(o) for o in out] == [
        f"service/{ns}/web deleted",
        f"pod/{ns}/web deleted",
        f"namespace/{ns} deleted",
    ]
    assert kube.get(NAMESPACE, ns) is None
    out = manifests.delete(kube, manifests.parse(_doc(ns)))
    assert {o.action for o in out} == {"not found"}


def test_unknown_kind_is_looked_up_by_discovery(kube: Kube) -> None:
    res = kube.resource("networking.k8s.io/v1", "NetworkPolicy")
    assert (res.plural, res.namespaced) == ("networkpolicies", True)
    res = kube.resource("coordination.k8s.io/v1", "Lease")
    assert (res.plural, res.namespaced) == ("leases", True)
    with pytest.raises(KeyError):
        kube.resource("example.com/v1", "Widget")
