"""A plain-Python AgentStateProvider with fixed state, served by the real gRPC server in tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pycilium.agent.api.provider import (
    BackendInfo,
    ComponentStatus,
    ControllerStatus,
    EndpointInfo,
    IdentityInfo,
    IPAMInfo,
    KubeProxyReplacementStatus,
    MasqueradingStatus,
    ServiceInfo,
    StatusInfo,
)


class FakeAgent:
    """The agent-state interface implemented over lists; not a mock of anything in the kernel."""

    def __init__(self) -> None:
        self.services = [
            ServiceInfo(id=1, frontend_ip="10.96.0.10", frontend_port=80, protocol="TCP", type="ClusterIP",
                        backends=[BackendInfo(11, "10.0.1.7", 80), BackendInfo(12, "10.0.1.8", 80,
                                                                                state="terminating")],
                        name="web", namespace="default"),
            ServiceInfo(id=2, frontend_ip="0.0.0.0", frontend_port=30080, protocol="TCP", type="NodePort",
                        backends=[BackendInfo(11, "10.0.1.7", 80)], name="web", namespace="default",
                        external_traffic_policy="Local"),
            ServiceInfo(id=3, frontend_ip="10.96.0.53", frontend_port=53, protocol="UDP", type="ClusterIP"),
        ]  # fmt: skip
        self.endpoints = [
            EndpointInfo(id=339, identity=6443, labels=["k8s:io.kubernetes.pod.namespace=default", "k8s:app=x"],
                         ipv4="10.244.2.65", ingress_enforced=True, egress_enforced=False, state="ready",
                         pod_name="x-1", namespace="default", ifname="lxc1234", ifindex=29),
            EndpointInfo(id=12, identity=1, labels=["reserved:host"], ipv4="", state="ready"),
        ]  # fmt: skip
        self.identities = [
            IdentityInfo(1, ["reserved:host"]),
            IdentityInfo(2, ["reserved:world"]),
            IdentityInfo(12345, ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]),
            IdentityInfo(6443, ["k8s:app=x", "k8s:io.kubernetes.pod.namespace=default"]),
        ]
        self.ipam_info = IPAMInfo("10.0.1.0/24", 254, {"10.0.1.1": "router", "10.0.1.7": "default/web-1"})
        self.deleted: list[int] = []
        self.broken = False
        self.status_calls: list[bool] = []

    def status(self, verbose: bool) -> StatusInfo:
        self.status_calls.append(verbose)
        return StatusInfo(
            node_name="node-1",
            node_ip="172.18.0.2",
            version="0.1.0",
            kubernetes=ComponentStatus("Ok", "1.30"),
            kube_proxy_replacement=KubeProxyReplacementStatus(
                True, ["eth0"], "eth0", "SNAT", {"Session Affinity": "Enabled", "Backend Selection": "Random"}
            ),
            cni_config_path="/etc/cni/net.d/05-pycilium.conflist",
            ipam=self.ipam_info,
            masquerading=MasqueradingStatus(True, "BPF", ["eth0"], "10.0.0.0/16"),
            routing_mode="Native",
            controllers=[
                ControllerStatus("sync-services", True, success_count=3),
                ControllerStatus(
                    "identity-gc",
                    not self.broken,
                    failure_count=int(self.broken),
                    last_error="apiserver timeout" if self.broken else "",
                ),
            ],
            cluster_health=ComponentStatus("Ok", "3/3 reachable"),
            uptime_seconds=3725,
        )

    def list_services(self) -> list[ServiceInfo]:
        return self.services

    def list_endpoints(self) -> list[EndpointInfo]:
        if self.broken:
            raise RuntimeError("endpoint manager exploded")
        return self.endpoints

    def get_endpoint(self, endpoint_id: int) -> EndpointInfo | None:
        return next((e for e in self.endpoints if e.id == endpoint_id), None)

    def delete_endpoint(self, endpoint_id: int) -> bool:
        ep = self.get_endpoint(endpoint_id)
        if ep is None:
            return False
        self.endpoints.remove(ep)
        self.deleted.append(endpoint_id)
        return True

    def list_identities(self) -> list[IdentityInfo]:
        return self.identities

    def get_identity(self, identity_id: int) -> IdentityInfo | None:
        return next((i for i in self.identities if i.id == identity_id), None)

    def ipam(self) -> IPAMInfo:
        return self.ipam_info


@contextmanager
def running_agent(socket_path: Path, agent: FakeAgent | None = None) -> Iterator[FakeAgent]:
    """The real API server on `socket_path`, answering from a FakeAgent."""
    from pycilium.agent.api.server import serve

    state = agent or FakeAgent()
    handle = serve(state, str(socket_path))
    try:
        yield state
    finally:
        handle.stop(grace=0)
