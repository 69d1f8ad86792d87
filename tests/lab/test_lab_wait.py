"""`apply --wait`: what counts as running and programmed (the map side runs in tests/e2e)."""

from __future__ import annotations

from pycilium.lab.cluster.wait import Targets, pod_waiting, policy_types, ready_endpoints


def test_targets_by_kind_with_default_namespace() -> None:
    objs = [
        {"kind": "Pod", "metadata": {"name": "p"}},
        {"kind": "Deployment", "metadata": {"name": "d", "namespace": "x"}},
        {"kind": "Service", "metadata": {"name": "s", "namespace": "x"}},
        {"kind": "NetworkPolicy", "metadata": {"name": "n", "namespace": "x"}},
        {"kind": "Namespace", "metadata": {"name": "x"}},
    ]
    t = Targets.of(objs)
    assert (t.pods, t.deployments, t.services, t.policies) == ([("default", "p")], [("x", "d")], [("x", "s")],
                                                               [("x", "n")])  # fmt: skip


def test_policy_types_default() -> None:
    assert policy_types({}) == ["Ingress"]
    assert policy_types({"egress": [{}]}) == ["Ingress", "Egress"]
    assert policy_types({"policyTypes": ["Egress"], "ingress": [{}]}) == ["Egress"]


def test_pod_waiting_reasons() -> None:
    key = ("d", "p")
    assert pod_waiting(None, key) == "pod d/p not found"
    assert pod_waiting({"spec": {}}, key) == "pod d/p not scheduled"
    pending = {"spec": {"nodeName": "n"}, "status": {"phase": "Pending", "conditions": [
        {"type": "Ready", "status": "False", "message": "no CNI configuration yet"}]}}  # fmt: skip
    assert pod_waiting(pending, key) == "pod d/p Pending: no CNI configuration yet"
    running = {"spec": {"nodeName": "n"}, "status": {"phase": "Running", "podIP": "10.0.0.2",
                                                     "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
    assert pod_waiting(running, key) == ""


def test_ready_endpoints_per_port() -> None:
    slices = [
        {"ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
         "endpoints": [{"conditions": {"ready": True}}, {"conditions": {"ready": False}}, {"conditions": {}}]},
        {"ports": [{"name": "dns", "protocol": "UDP", "port": 53}], "endpoints": [{"conditions": {"ready": True}}]},
    ]  # fmt: skip
    assert ready_endpoints(slices, "http", "TCP") == 2  # unknown readiness counts as ready
    assert ready_endpoints(slices, "dns", "UDP") == 1
    assert ready_endpoints(slices, "dns", "TCP") == 0
