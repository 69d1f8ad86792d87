from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComponentStatus(_message.Message):
    __slots__ = ("state", "message")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: str
    message: str
    def __init__(self, state: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class KubeProxyReplacement(_message.Message):
    __slots__ = ("enabled", "devices", "direct_routing_device", "mode", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DIRECT_ROUTING_DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    devices: _containers.RepeatedScalarFieldContainer[str]
    direct_routing_device: str
    mode: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, enabled: _Optional[bool] = ..., devices: _Optional[_Iterable[str]] = ..., direct_routing_device: _Optional[str] = ..., mode: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Masquerading(_message.Message):
    __slots__ = ("enabled", "mode", "devices", "cidr")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    mode: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    cidr: str
    def __init__(self, enabled: _Optional[bool] = ..., mode: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., cidr: _Optional[str] = ...) -> None: ...

class Controller(_message.Message):
    __slots__ = ("name", "healthy", "success_count", "failure_count", "last_error", "last_success_unix", "last_failure_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    healthy: bool
    success_count: int
    failure_count: int
    last_error: str
    last_success_unix: float
    last_failure_unix: float
    def __init__(self, name: _Optional[str] = ..., healthy: _Optional[bool] = ..., success_count: _Optional[int] = ..., failure_count: _Optional[int] = ..., last_error: _Optional[str] = ..., last_success_unix: _Optional[float] = ..., last_failure_unix: _Optional[float] = ...) -> None: ...

class IPAMStatus(_message.Message):
    __slots__ = ("cidr", "capacity", "allocations")
    class AllocationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CIDR_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    cidr: str
    capacity: int
    allocations: _containers.ScalarMap[str, str]
    def __init__(self, cidr: _Optional[str] = ..., capacity: _Optional[int] = ..., allocations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("verbose",)
    VERBOSE_FIELD_NUMBER: _ClassVar[int]
    verbose: bool
    def __init__(self, verbose: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_name", "node_ip", "version", "agent", "kubernetes", "kube_proxy_replacement", "cni_config_path", "cni", "ipam", "masquerading", "routing_mode", "controllers", "datapath", "cluster_health", "uptime_seconds")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    KUBE_PROXY_REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CNI_CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    CNI_FIELD_NUMBER: _ClassVar[int]
    IPAM_FIELD_NUMBER: _ClassVar[int]
    MASQUERADING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_MODE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    DATAPATH_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_HEALTH_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    node_ip: str
    version: str
    agent: ComponentStatus
    kubernetes: ComponentStatus
    kube_proxy_replacement: KubeProxyReplacement
    cni_config_path: str
    cni: ComponentStatus
    ipam: IPAMStatus
    masquerading: Masquerading
    routing_mode: str
    controllers: _containers.RepeatedCompositeFieldContainer[Controller]
    datapath: ComponentStatus
    cluster_health: ComponentStatus
    uptime_seconds: float
    def __init__(self, node_name: _Optional[str] = ..., node_ip: _Optional[str] = ..., version: _Optional[str] = ..., agent: _Optional[_Union[ComponentStatus, _Mapping]] = ..., kubernetes: _Optional[_Union[ComponentStatus, _Mapping]] = ..., kube_proxy_replacement: _Optional[_Union[KubeProxyReplacement, _Mapping]] = ..., cni_config_path: _Optional[str] = ..., cni: _Optional[_Union[ComponentStatus, _Mapping]] = ..., ipam: _Optional[_Union[IPAMStatus, _Mapping]] = ..., masquerading: _Optional[_Union[Masquerading, _Mapping]] = ..., routing_mode: _Optional[str] = ..., controllers: _Optional[_Iterable[_Union[Controller, _Mapping]]] = ..., datapath: _Optional[_Union[ComponentStatus, _Mapping]] = ..., cluster_health: _Optional[_Union[ComponentStatus, _Mapping]] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("id", "ip", "port", "protocol", "state", "node_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    ip: str
    port: int
    protocol: str
    state: str
    node_name: str
    def __init__(self, id: _Optional[int] = ..., ip: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., state: _Optional[str] = ..., node_name: _Optional[str] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("id", "frontend_ip", "frontend_port", "protocol", "type", "backends", "name", "namespace", "external_traffic_policy", "internal_traffic_policy", "session_affinity_timeout")
    ID_FIELD_NUMBER: _ClassVar[int]
    FRONTEND_IP_FIELD_NUMBER: _ClassVar[int]
    FRONTEND_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_TRAFFIC_POLICY_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_TRAFFIC_POLICY_FIELD_NUMBER: _ClassVar[int]
    SESSION_AFFINITY_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    id: int
    frontend_ip: str
    frontend_port: int
    protocol: str
    type: str
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    name: str
    namespace: str
    external_traffic_policy: str
    internal_traffic_policy: str
    session_affinity_timeout: int
    def __init__(self, id: _Optional[int] = ..., frontend_ip: _Optional[str] = ..., frontend_port: _Optional[int] = ..., protocol: _Optional[str] = ..., type: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., external_traffic_policy: _Optional[str] = ..., internal_traffic_policy: _Optional[str] = ..., session_affinity_timeout: _Optional[int] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    def __init__(self, services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("id", "identity", "labels", "ipv4", "ingress_enforced", "egress_enforced", "state", "pod_name", "namespace", "container_id", "ifname", "ifindex", "mac", "netns")
    ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IPV4_FIELD_NUMBER: _ClassVar[int]
    INGRESS_ENFORCED_FIELD_NUMBER: _ClassVar[int]
    EGRESS_ENFORCED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    IFINDEX_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    id: int
    identity: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    ipv4: str
    ingress_enforced: bool
    egress_enforced: bool
    state: str
    pod_name: str
    namespace: str
    container_id: str
    ifname: str
    ifindex: int
    mac: str
    netns: str
    def __init__(self, id: _Optional[int] = ..., identity: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., ipv4: _Optional[str] = ..., ingress_enforced: _Optional[bool] = ..., egress_enforced: _Optional[bool] = ..., state: _Optional[str] = ..., pod_name: _Optional[str] = ..., namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., ifname: _Optional[str] = ..., ifindex: _Optional[int] = ..., mac: _Optional[str] = ..., netns: _Optional[str] = ...) -> None: ...

class ListEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class GetEndpointRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class DeleteEndpointRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class DeleteEndpointResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("id", "labels")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities",)
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[Identity]
    def __init__(self, identities: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ...) -> None: ...

class GetIdentityRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetIPAMRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
