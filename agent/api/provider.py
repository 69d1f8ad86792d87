"""What the gRPC API needs from the agent: the AgentStateProvider protocol and its plain data.

The agent implements AgentStateProvider with these dataclasses and never touches protobuf; the
server (server.py) converts them to messages. Methods are called on the server's event loop, one
at a time per request; they should return a snapshot quickly. A method may also be ``async def``
(the server awaits what it returns), which suits an agent that keeps its state on its own loop and
uses ``start_server`` in that loop.

Errors: raise ``LookupError`` for "no such object" (NOT_FOUND), ``ValueError`` for a bad argument
(INVALID_ARGUMENT), ``NotImplementedError`` (UNIMPLEMENTED); anything else becomes INTERNAL with
the exception text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Component states (ComponentStatus.state).
OK = "Ok"
WARNING = "Warning"
FAILURE = "Failure"
DISABLED = "Disabled"

# Backend states, as the CLI prints them.
BACKEND_STATES = ("active", "terminating", "quarantined", "maintenance")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalIPs", "HostPort")


@dataclass
class ComponentStatus:
    state: str = OK  # OK / WARNING / FAILURE / DISABLED
    message: str = ""  # e.g. the Kubernetes server version, or the error


@dataclass
class KubeProxyReplacementStatus:
    enabled: bool = True
    devices: list[str] = field(default_factory=list)  # devices the host programs are attached to
    direct_routing_device: str = ""
    mode: str = "SNAT"
    details: dict[str, str] = field(default_factory=dict)  # shown by `status --verbose`


@dataclass
class MasqueradingStatus:
    enabled: bool = True
    mode: str = "BPF"
    devices: list[str] = field(default_factory=list)
    cidr: str = ""  # destinations in this range are not masqueraded


@dataclass
class ControllerStatus:
    name: str
    healthy: bool = True
    success_count: int = 0
    failure_count: int = 0
    last_error: str = ""
    last_success_unix: float = 0.0  # 0: never
    last_failure_unix: float = 0.0


@dataclass
class IPAMInfo:
    cidr: str  # the node's pod CIDR
    capacity: int  # allocatable addresses (e.g. 254 for a /24)
    allocations: dict[str, str] = field(default_factory=dict)  # IP -> owner ("ns/pod", "router")


@dataclass
class StatusInfo:
    node_name: str
    node_ip: str = ""
    version: str = ""
    agent: ComponentStatus = field(default_factory=ComponentStatus)
    kubernetes: ComponentStatus = field(default_factory=ComponentStatus)
    kube_proxy_replacement: KubeProxyReplacementStatus = field(default_factory=KubeProxyReplacementStatus)
    cni_config_path: str = ""
    cni: ComponentStatus = field(default_factory=ComponentStatus)
    ipam: IPAMInfo | None = None
    masquerading: MasqueradingStatus = field(default_factory=MasqueradingStatus)
    routing_mode: str = "Native"  # "Native" or "Tunnel [vxlan]"
    controllers: list[ControllerStatus] = field(default_factory=list)
    datapath: ComponentStatus = field(default_factory=ComponentStatus)
    cluster_health: ComponentStatus | None = None  # message e.g. "3/3 reachable"
    uptime_seconds: float = 0.0


@dataclass
class BackendInfo:
    id: int
    ip: str
    port: int
    protocol: str = "TCP"
    state: str = "active"  # one of BACKEND_STATES
    node_name: str = ""


@dataclass
class ServiceInfo:
    id: int  # the frontend's rev_nat_index
    frontend_ip: str  # 0.0.0.0 for NodePort frontends
    frontend_port: int
    protocol: str = "TCP"
    type: str = "ClusterIP"  # one of SERVICE_TYPES
    backends: list[BackendInfo] = field(default_factory=list)
    name: str = ""
    namespace: str = ""
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    session_affinity_timeout: int = 0  # seconds; 0: no session affinity


@dataclass
class EndpointInfo:
    id: int
    identity: int
    labels: list[str] = field(default_factory=list)  # "source:key=value", e.g. "k8s:app=web"
    ipv4: str = ""
    ingress_enforced: bool = False
    egress_enforced: bool = False
    state: str = "ready"
    pod_name: str = ""
    namespace: str = ""
    container_id: str = ""
    ifname: str = ""  # host-side veth
    ifindex: int = 0
    mac: str = ""
    netns: str = ""


@dataclass
class IdentityInfo:
    id: int
    labels: list[str] = field(default_factory=list)


@runtime_checkable
class AgentStateProvider(Protocol):
    """The agent's state as the API serves it (see the module docstring for the calling rules)."""

    def status(self, verbose: bool) -> StatusInfo: ...

    def list_services(self) -> Sequence[ServiceInfo]: ...

    def list_endpoints(self) -> Sequence[EndpointInfo]: ...

    def get_endpoint(self, endpoint_id: int) -> EndpointInfo | None: ...  # None: NOT_FOUND

    def delete_endpoint(self, endpoint_id: int) -> bool: ...  # False: there was no such endpoint

    def list_identities(self) -> Sequence[IdentityInfo]: ...  # reserved identities included

    def get_identity(self, identity_id: int) -> IdentityInfo | None: ...

    def ipam(self) -> IPAMInfo: ...
