"""Pod network endpoints: veth, addresses, routes, endpoints map entries, datapath attachment."""

from pycilium.agent.endpoint.datapath import EndpointDatapath, NoopDatapath, TcProgramAttacher
from pycilium.agent.endpoint.manager import (
    AddRequest,
    EndpointError,
    EndpointManager,
    EndpointMap,
    GCReport,
)
from pycilium.agent.endpoint.model import GATEWAY_IP, ID_INIT, Endpoint, host_ifname

__all__ = [
    "GATEWAY_IP",
    "ID_INIT",
    "AddRequest",
    "Endpoint",
    "EndpointDatapath",
    "EndpointError",
    "EndpointManager",
    "EndpointMap",
    "GCReport",
    "NoopDatapath",
    "TcProgramAttacher",
    "host_ifname",
]
