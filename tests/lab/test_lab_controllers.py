"""The lab's controllers: EndpointSlice computation, and the scheduler, Deployment and EndpointSlice
controllers running against the embedded API server (the kubelet's part is played by the test,
which patches pod status the way the kubelet does)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from pycilium.lab.apiserver import APIServerThread
from pycilium.lab.cluster.kube import DEPLOYMENT, ENDPOINTSLICE, NAMESPACE, NODE, POD, SERVICE, Kube
from pycilium.lab.controllers import (
    LAB_NODE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    Controllers,
    WorkQueue,
    desired_slices,
    endpoint_conditions,
)

Obj = dict[str, Any]


def pod(name: str, ip: str | None, node: str = "node1", labels: dict[str, str] | None = None, ready: bool = True,
        ports: list[Obj] | None = None, terminating: bool = False, ns: str = "d") -> Obj:  # fmt: skip
    meta: Obj = {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {"app": "a"}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: Obj = {"phase": "Running" if ip else "Pending",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}  # fmt: skip
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
            "status": status}  # fmt: skip


def svc(ports: list[Obj], selector: dict[str, str] | None = None, **spec: Any) -> Obj:
    return {"metadata": {"name": "s", "namespace": "d", "uid": "svc-uid", "labels": {"x": "y"}},
            "spec": {"selector": selector if selector is not None else {"app": "a"}, "ports": ports, **spec}}  # fmt: skip


# ---- pure computation -----------------------------------------------------------------------------


def test_conditions_follow_readiness_and_termination() -> None:
    assert endpoint_conditions(pod("p", "1.1.1.1")) == {"ready": True, "serving": True, "terminating": False}
    assert endpoint_conditions(pod("p", "1.1.1.1", ready=False)) == {
        "ready": False,
        "serving": False,
        "terminating": False,
    }
    assert endpoint_conditions(pod("p", "1.1.1.1", terminating=True)) == {
        "ready": False,
        "serving": True,
        "terminating": True,
    }
    assert endpoint_conditions(pod("p", "1.1.1.1", ready=False), publish_not_ready=True)["ready"] is True


def test_slices_group_pods_by_resolved_ports() -> None:
    http_a = [{"name": "http", "containerPort": 8080}]
    http_b = [{"name": "http", "containerPort": 9090}]
    pods = [
        pod("a1", "10.0.1.2", ports=http_a),
        pod("b1", "10.0.2.2", node="node2", ports=http_b),
        pod("a2", "10.0.1.3", ports=http_a, terminating=True),
        pod("nip", None, ports=http_a),  # no IP yet: not listed
        pod("other", "10.0.1.9", labels={"app": "b"}, ports=http_a),  # not selected
        pod("otherns", "10.0.1.8", ns="e", ports=http_a),  # another namespace
    ]
    slices = desired_slices(svc([{"name": "web", "port": 80, "targetPort": "http"}]), pods)
    assert len(slices) == 2
    by_port = {s["ports"][0]["port"]: s for s in slices}
    assert set(by_port) == {8080, 9090}
    s = by_port[8080]
    assert s["ports"] == [{"name": "web", "protocol": "TCP", "port": 8080}]
    assert [(e["addresses"], e["nodeName"], e["conditions"]["terminating"]) for e in s["endpoints"]] == [
        (["10.0.1.2"], "node1", False),
        (["10.0.1.3"], "node1", True),
    ]
    assert s["endpoints"][0]["targetRef"] == {"kind": "Pod", "namespace": "d", "name": "a1", "uid": "uid-a1"}
    assert s["metadata"]["labels"] == {"x": "y", SERVICE_NAME_LABEL: "s", MANAGED_BY_LABEL: MANAGED_BY}
    assert s["metadata"]["ownerReferences"][0]["uid"] == "svc-uid"
    assert s["addressType"] == "IPv4"
    names = {x["metadata"]["name"] for x in slices}
    assert all(n.startswith("s-") for n in names)
    assert desired_slices(svc([{"name": "web", "port": 80, "targetPort": "http"}]), pods) == slices  # stable


def test_host_network_pods_are_endpoints_at_their_node_ip() -> None:
    """A hostNetwork pod's podIP is its node's IP; it is listed like any pod (with nodeName), and a
    pod the kubelet rejected (Failed) is not."""
    hn = pod("hn", "192.168.200.12", node="node2", ports=[{"name": "http", "containerPort": 9090}])
    hn["spec"]["hostNetwork"] = True
    rejected = pod("hn-b", None, node="node2", ports=[{"name": "http", "containerPort": 9090}])
    rejected["spec"]["hostNetwork"] = True
    rejected["status"] = {"phase": "Failed", "reason": "NodePorts"}
    (s,) = desired_slices(svc([{"port": 80, "targetPort": "http"}]), [hn, rejected])
    assert [(e["addresses"], e["nodeName"], e["conditions"]["ready"]) for e in s["endpoints"]] == [
        (["192.168.200.12"], "node2", True)
    ]
    assert s["ports"] == [{"name": "", "protocol": "TCP", "port": 9090}]


def test_slice_ports_numeric_default_and_unresolvable() -> None:
    p = pod("a", "10.0.0.2", ports=[{"name": "dns", "containerPort": 5353, "protocol": "UDP"}])
    ports = [
        {"name": "tcp", "port": 80, "targetPort": 8080},
        {"name": "plain", "port": 81},
        {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
        {"name": "missing", "port": 82, "targetPort": "nope"},
    ]
    (s,) = desired_slices(svc(ports), [p])
    assert s["ports"] == [
        {"name": "tcp", "protocol": "TCP", "port": 8080},
        {"name": "plain", "protocol": "TCP", "port": 81},
        {"name": "dns", "protocol": "UDP", "port": 5353},
    ]


def test_service_without_pods_gets_one_empty_slice_and_headless_label() -> None:
    (s,) = desired_slices(svc([{"port": 80}], clusterIP="None"), [])
    assert s["endpoints"] == [] and s["ports"] == []
    assert s["metadata"]["labels"]["service.kubernetes.io/headless"] == ""


def test_workqueue_dedups_and_retries() -> None:
    q = WorkQueue()
    stop = threading.Event()
    q.add(("svc", "a", "b"))
    q.add(("svc", "a", "b"))
    q.add(("deploy", "a", "c"))
    assert q.get(stop) == ("svc", "a", "b")
    assert q.get(stop) == ("deploy", "a", "c")
    assert q.get(stop, timeout=0.05) is None
    q.retry(("sched", "a", "p"), 0.1)
    t0 = time.monotonic()
    assert q.get(stop, timeout=2) == ("sched", "a", "p")
    assert time.monotonic() - t0 >= 0.09


# ---- against the embedded API server --------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[APIServerThread]:
    srv = APIServerThread(graceful_pod_deletion=False, bookmark_interval=1.0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kube(server: APIServerThread) -> Iterator[Kube]:
    cfg = client.Configuration()
    cfg.host = server.url
    k = Kube(api=client.ApiClient(cfg))
    for name, lab in (("node1", True), ("node2", True), ("other", False)):
        labels = {LAB_NODE_LABEL: "t"} if lab else {}
        k.create(NODE, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
    yield k
    k.close()


@pytest.fixture(scope="module")
def controllers(kube: Kube) -> Iterator[Controllers]:
    c = Controllers(kube, resync=5.0)
    c.start(sync_timeout=20)
    yield c
    c.stop()


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"c{uuid.uuid4().hex[:6]}"
    kube.create(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def eventually(fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def run_pod(kube: Kube, p: Obj, ip: str) -> None:
    """What the kubelet does once a pod runs: status through the status subresource."""
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
              "conditions": [{"type": "Ready", "status": "True"}]}  # fmt: skip
    kube.patch(POD, p["metadata"]["name"], {"status": status}, p["metadata"]["namespace"], status=True)


def deployment(ns: str, replicas: int, labels: dict[str, str], port: int = 8080) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "c", "ports": [
                                      {"name": "http", "containerPort": port}]}]}}}}  # fmt: skip


def test_unscheduled_pods_go_round_robin_to_lab_nodes(kube: Kube, controllers: Controllers, ns: str) -> None:
    for i in range(4):
        kube.create(POD, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": ns},
                          "spec": {"containers": [{"name": "c"}]}}, ns)  # fmt: skip
    kube.create(POD, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pinned", "namespace": ns},
                      "spec": {"nodeName": "other", "containers": [{"name": "c"}]}}, ns)  # fmt: skip
    kube.create(POD, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "foreign", "namespace": ns},
                      "spec": {"schedulerName": "someone-else", "containers": [{"name": "c"}]}}, ns)  # fmt: skip

    def placed() -> dict[str, str] | None:
        pods = {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in kube.list(POD, ns)}
        return pods if all(pods[f"p{i}"] for i in range(4)) else None

    nodes = eventually(placed, what="pods scheduled")
    assert sorted(nodes[f"p{i}"] for i in range(4)) == ["node1", "node1", "node2", "node2"]
    assert nodes["pinned"] == "other"
    time.sleep(0.3)
    assert not kube.get(POD, "foreign", ns)["spec"].get("nodeName")  # type: ignore[index]


def test_deployment_expands_scales_rolls_and_is_collected(
    kube: Kube, controllers: Controllers, ns: str
) -> None:
    kube.create(DEPLOYMENT, deployment(ns, 3, {"app": "web", "v": "1"}), ns)

    def pods() -> list[Obj]:
        return [p for p in kube.list(POD, ns) if not p["metadata"].get("deletionTimestamp")]

    got = eventually(lambda: (lambda ps: ps if len(ps) == 3 else None)(pods()), what="3 pods")
    dep = kube.get(DEPLOYMENT, "web", ns)
    assert dep is not None
    for p in got:
        meta = p["metadata"]
        assert meta["name"].startswith("web-") and len(meta["name"].split("-")) == 3
        assert (
            meta["labels"]["app"] == "web"
            and meta["labels"]["v"] == "1"
            and meta["labels"]["pod-template-hash"]
        )
        assert meta["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
        assert p["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080
    time.sleep(0.5)
    assert len(pods()) == 3  # not scaled twice while the cache catches up

    # patches, not read-modify-write: the controller updates the status at any moment
    kube.patch(DEPLOYMENT, "web", {"spec": {"replicas": 1}}, ns)
    eventually(lambda: len(pods()) == 1, what="scaled to 1")

    # a new template: new pods first, the old one goes once they are Ready
    kube.patch(DEPLOYMENT, "web", {"spec": {"template": {"metadata": {"labels": {"v": "2"}}}}}, ns)
    eventually(lambda: any(p["metadata"]["labels"]["v"] == "2" for p in pods()), what="a v2 pod")
    time.sleep(0.3)
    assert any(p["metadata"]["labels"]["v"] == "1" for p in pods())  # old kept until the new is ready
    for i, p in enumerate(pods()):
        if p["metadata"]["labels"]["v"] == "2":
            run_pod(kube, p, f"10.9.0.{i + 2}")
    eventually(lambda: {p["metadata"]["labels"]["v"] for p in pods()} == {"2"}, what="only v2 pods")
    eventually(lambda: (kube.get(DEPLOYMENT, "web", ns) or {}).get("status", {}).get("readyReplicas") == 1,
               what="deployment status")  # fmt: skip

    kube.delete(DEPLOYMENT, "web", ns)
    eventually(lambda: not pods(), what="pods of the deleted deployment collected")


def test_scale_subresource_adds_and_removes_pods(kube: Kube, controllers: Controllers, ns: str) -> None:
    apps = client.AppsV1Api(kube.api)
    kube.create(DEPLOYMENT, deployment(ns, 1, {"app": "web"}), ns)

    def pods() -> list[Obj]:
        return [p for p in kube.list(POD, ns) if not p["metadata"].get("deletionTimestamp")]

    def count(n: int) -> Callable[[], list[Obj] | None]:
        return lambda: (lambda ps: ps if len(ps) == n else None)(pods())

    (first,) = eventually(count(1), what="1 pod")
    apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 4}})
    grown = eventually(count(4), what="scaled up to 4 through the scale subresource")
    assert first["metadata"]["name"] in {p["metadata"]["name"] for p in grown}  # added, not replaced
    # the scheduler binds them through pods/binding: every pod lands on a lab node, marked scheduled
    bound = eventually(lambda: (lambda ps: ps if all(p["spec"].get("nodeName") for p in ps) else None)(pods()),
                       what="pods bound")  # fmt: skip
    assert sorted(p["spec"]["nodeName"] for p in bound) == ["node1", "node1", "node2", "node2"]
    for p in bound:
        conds = {c["type"]: c["status"] for c in p["status"].get("conditions") or []}
        assert conds.get("PodScheduled") == "True", p
    for i, p in enumerate(grown):
        run_pod(kube, p, f"10.7.0.{i + 2}")

    def scale() -> Obj:
        return dict(apps.read_namespaced_deployment_scale("web", ns).to_dict())

    eventually(lambda: scale()["status"]["replicas"] == 4, what="scale status")
    # PUT without a resourceVersion: unconditional (the controller keeps writing the status)
    body = client.V1Scale(metadata=client.V1ObjectMeta(name="web"), spec=client.V1ScaleSpec(replicas=2))
    apps.replace_namespaced_deployment_scale("web", ns, body)
    left = eventually(count(2), what="scaled down to 2")
    assert {p["metadata"]["name"] for p in left} < {p["metadata"]["name"] for p in grown}
    time.sleep(0.5)
    assert len(pods()) == 2  # not scaled further while the cache catches up
    eventually(lambda: (kube.get(DEPLOYMENT, "web", ns) or {}).get("status", {}).get("replicas") == 2,
               what="deployment status")  # fmt: skip


def test_endpointslices_follow_pods_and_services(kube: Kube, controllers: Controllers, ns: str) -> None:
    for i, node in enumerate(("node1", "node2")):
        kube.create(POD, {"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": f"be{i}", "namespace": ns, "labels": {"app": "be"}},
                          "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                              {"name": "http", "containerPort": 8080},
                              {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]}}, ns)  # fmt: skip
    kube.create(SERVICE, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "be", "namespace": ns},
                          "spec": {"selector": {"app": "be"}, "ports": [
                              {"name": "http", "port": 80, "targetPort": "http"},
                              {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]}}, ns)  # fmt: skip

    def slices() -> list[Obj]:
        return kube.list(ENDPOINTSLICE, ns, label_selector=f"{SERVICE_NAME_LABEL}=be")

    # pods without an IP: an empty slice
    eventually(lambda: len(slices()) == 1 and slices()[0].get("endpoints") in (None, []), what="empty slice")
    for i in range(2):
        p = kube.get(POD, f"be{i}", ns)
        assert p is not None
        run_pod(kube, p, f"10.8.{i + 1}.2")

    def addresses() -> list[tuple[str, str, bool]]:
        return sorted((e["addresses"][0], e["nodeName"], e["conditions"]["ready"])
                      for s in slices() for e in s.get("endpoints") or [])  # fmt: skip

    eventually(
        lambda: addresses() == [("10.8.1.2", "node1", True), ("10.8.2.2", "node2", True)], what="endpoints"
    )
    (s,) = slices()
    assert sorted((p["name"], p["protocol"], p["port"]) for p in s["ports"]) == [
        ("dns", "UDP", 5353),
        ("http", "TCP", 8080),
    ]
    assert s["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY

    # relabel a pod out of the selector: its endpoint goes
    p = kube.get(POD, "be1", ns)
    assert p is not None
    p["metadata"]["labels"] = {"app": "gone"}
    kube.replace(POD, p, ns)
    eventually(lambda: addresses() == [("10.8.1.2", "node1", True)], what="endpoint removed")

    # a slice someone edited is put back
    (s,) = slices()
    s["endpoints"] = []
    kube.replace(ENDPOINTSLICE, s, ns)
    eventually(lambda: addresses() == [("10.8.1.2", "node1", True)], what="slice repaired")

    kube.delete(SERVICE, "be", ns)
    eventually(lambda: not slices(), what="slices of a deleted service removed")
