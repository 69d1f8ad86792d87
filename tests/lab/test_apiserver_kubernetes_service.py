"""The lab API server's `default/kubernetes` Service: created from the advertise address, reserved
ClusterIP, kept across restarts with a state file, repaired when changed or deleted."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from pycilium.lab.apiserver import APIServerThread
from pycilium.lab.apiserver.__main__ import parse_args
from pycilium.lab.apiserver.kubernetes_service import first_service_ip


def v1_of(srv: APIServerThread) -> client.CoreV1Api:
    cfg = client.Configuration()
    cfg.host = srv.url
    cfg.retries = 0
    return client.CoreV1Api(client.ApiClient(cfg))


def slice_of(srv: APIServerThread) -> dict[str, Any]:
    url = f"{srv.url}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


def test_first_service_ip() -> None:
    assert first_service_ip("10.96.0.0/12") == "10.96.0.1"
    assert first_service_ip("172.20.0.0/16") == "172.20.0.1"


def test_kubernetes_service_points_at_the_advertised_address() -> None:
    with APIServerThread(advertise_address="192.168.200.1", advertise_port=6443) as srv:
        v1 = v1_of(srv)
        svc = v1.read_namespaced_service("kubernetes", "default")
        assert svc.spec.cluster_ip == "10.96.0.1" and svc.spec.cluster_ips == ["10.96.0.1"]
        assert svc.spec.type == "ClusterIP" and not svc.spec.selector
        assert svc.metadata.labels == {"component": "apiserver", "provider": "kubernetes"}
        ((port,),) = [svc.spec.ports]
        assert (port.name, port.port, port.protocol, port.target_port) == ("https", 443, "TCP", 6443)
        ep = v1.read_namespaced_endpoints("kubernetes", "default")
        assert [a.ip for a in ep.subsets[0].addresses] == ["192.168.200.1"]
        assert [(p.name, p.port) for p in ep.subsets[0].ports] == [("https", 6443)]
        sl = slice_of(srv)
        assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes"
        assert sl["addressType"] == "IPv4"
        assert sl["endpoints"] == [{"addresses": ["192.168.200.1"], "conditions": {"ready": True}}]
        assert sl["ports"] == [{"name": "https", "port": 6443, "protocol": "TCP"}]
        # the address is taken: asked for explicitly it is refused, and free picks never hand it out
        with pytest.raises(ApiException) as ei:
            v1.create_namespaced_service(
                "default",
                {"metadata": {"name": "thief"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 1}]}},
            )
        assert ei.value.status == 422 and "already allocated" in json.loads(ei.value.body)["message"]


def test_advertise_port_defaults_to_the_bound_port() -> None:
    with APIServerThread(advertise_address="127.0.0.1") as srv:
        port = int(srv.url.rpartition(":")[2])
        svc = v1_of(srv).read_namespaced_service("kubernetes", "default")
        assert svc.spec.ports[0].target_port == port
        assert slice_of(srv)["ports"][0]["port"] == port


def test_no_advertise_address_no_kubernetes_service() -> None:
    with APIServerThread() as srv:
        with pytest.raises(ApiException) as ei:
            v1_of(srv).read_namespaced_service("kubernetes", "default")
        assert ei.value.status == 404


def test_restart_with_state_writes_nothing_and_a_new_address_is_taken(tmp_path: Path) -> None:
    state = str(tmp_path / "state.json")
    with APIServerThread(state_file=state, advertise_address="192.168.200.1", advertise_port=6443) as srv:
        v1 = v1_of(srv)
        before = {
            "svc": v1.read_namespaced_service("kubernetes", "default").metadata,
            "ep": v1.read_namespaced_endpoints("kubernetes", "default").metadata,
            "slice": slice_of(srv)["metadata"],
        }
    with APIServerThread(state_file=state, advertise_address="192.168.200.1", advertise_port=6443) as srv:
        v1 = v1_of(srv)
        svc = v1.read_namespaced_service("kubernetes", "default").metadata
        ep = v1.read_namespaced_endpoints("kubernetes", "default").metadata
        sl = slice_of(srv)["metadata"]
        assert (svc.uid, svc.resource_version) == (before["svc"].uid, before["svc"].resource_version)
        assert (ep.uid, ep.resource_version) == (before["ep"].uid, before["ep"].resource_version)
        assert (sl["uid"], sl["resourceVersion"]) == (
            before["slice"]["uid"],
            before["slice"]["resourceVersion"],
        )
        # still reserved after loading the state
        with pytest.raises(ApiException) as ei:
            v1.create_namespaced_service(
                "default",
                {"metadata": {"name": "thief"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 1}]}},
            )
        assert ei.value.status == 422
    # the server moved: the endpoints follow, the Service (and its ClusterIP) stays
    with APIServerThread(state_file=state, advertise_address="192.168.200.2", advertise_port=7443) as srv:
        v1 = v1_of(srv)
        svc2 = v1.read_namespaced_service("kubernetes", "default")
        assert svc2.metadata.uid == before["svc"].uid and svc2.spec.cluster_ip == "10.96.0.1"
        assert svc2.spec.ports[0].target_port == 7443
        sl2 = slice_of(srv)
        assert sl2["metadata"]["uid"] == before["slice"]["uid"]
        assert sl2["endpoints"][0]["addresses"] == ["192.168.200.2"] and sl2["ports"][0]["port"] == 7443


def test_repair_puts_back_what_was_changed_or_deleted() -> None:
    with APIServerThread(advertise_address="192.168.200.1", advertise_port=6443) as srv:
        v1 = v1_of(srv)
        repair = srv.server.repair_kubernetes_service
        assert srv.call(repair) == []  # nothing to do
        v1.patch_namespaced_service(
            "kubernetes", "default", {"spec": {"ports": [{"name": "https", "port": 443, "targetPort": 1}]}}
        )
        v1.delete_namespaced_endpoints("kubernetes", "default")
        assert srv.call(repair) == ["updated service", "created endpoints"]
        assert v1.read_namespaced_service("kubernetes", "default").spec.ports[0].target_port == 6443
        v1.delete_namespaced_service("kubernetes", "default")
        assert srv.call(repair) == ["created service"]
        assert v1.read_namespaced_service("kubernetes", "default").spec.cluster_ip == "10.96.0.1"


def test_periodic_repair() -> None:
    with APIServerThread(
        advertise_address="192.168.200.1", advertise_port=6443, kubernetes_service_interval=0.1
    ) as srv:
        v1 = v1_of(srv)
        v1.delete_namespaced_service("kubernetes", "default")
        deadline = time.monotonic() + 10
        while True:
            try:
                svc = v1.read_namespaced_service("kubernetes", "default")
                break
            except ApiException as e:
                assert e.status == 404
                assert time.monotonic() < deadline, "not recreated"
                time.sleep(0.05)
        assert svc.spec.cluster_ip == "10.96.0.1"


def test_command_line_flags() -> None:
    a = parse_args(["--advertise-address", "192.168.200.1", "--advertise-port", "6443"])
    assert (a.advertise_address, a.advertise_port) == ("192.168.200.1", 6443)
    a = parse_args([])
    assert (a.advertise_address, a.advertise_port) == (None, 0)
