"""An endpoint: one pod interface the agent created, as persisted and as reported to other subsystems."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pycilium.bpf.maps.defines import d

GATEWAY_IP = "169.254.1.1"  # link-local gateway of every pod; the host veth answers for it (static neigh)
ID_INIT = d("ID_INIT")  # identity of an endpoint whose labels are not resolved yet
EP_F_HOST = d("EP_F_HOST")
EP_F_POLICY_INGRESS = d("EP_F_POLICY_INGRESS")
EP_F_POLICY_EGRESS = d("EP_F_POLICY_EGRESS")
EP_F_NO_MAC_CHECK = d("EP_F_NO_MAC_CHECK")
MIN_ENDPOINT_ID = 1
MAX_ENDPOINT_ID = 65535
STATE_VERSION = 1


def host_ifname(container_id: str, ifname: str = "eth0") -> str:
    """Host-side veth name: ``lxc`` + 12 hex digits of sha256(containerID[/ifname]) (15 chars)."""
    key = container_id if ifname == "eth0" else f"{container_id}/{ifname}"
    return "lxc" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class Endpoint:
    """One pod interface. `id` is the endpoint id (lxc_id in the endpoints map, key of policy)."""

    id: int
    container_id: str
    ifname: str
    netns: str
    ipv4: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_mac: str
    mtu: int
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    identity: int = ID_INIT
    flags: int = 0
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        """The IPAM owner key of this endpoint."""
        return f"{self.container_id}/{self.ifname}"

    @property
    def pod(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["version"] = STATE_VERSION
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Endpoint:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})
