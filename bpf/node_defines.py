"""Node-level compile settings of the datapath programs, derived from the agent configuration."""

from __future__ import annotations

import ipaddress
from typing import Any

from pycilium.bpf.loader import NodeDefines, sizes_from_config
from pycilium.bpf.maps.util import ip_to_be32


def _cidr(cidr: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(cidr, strict=False)
    return ip_to_be32(str(net.network_address)), ip_to_be32(str(net.netmask))


def node_defines(config: Any, *, pin_root: str | None = None, node_ip: str, pod_cidr: str | None,
                 cluster_cidr: str | None = None, trace: bool | None = None) -> NodeDefines:  # fmt: skip
    """-D settings for bpf_lxc.c / bpf_host.c / bpf_xdp.c on one node."""
    v: dict[str, int | str] = {
        "NODE_IP": ip_to_be32(node_ip),
        "NODEPORT_MIN": config.node_port_min,
        "NODEPORT_MAX": config.node_port_max,
        "SNAT_PORT_MIN": config.snat_port_min,
        "SNAT_PORT_MAX": config.snat_port_max,
        "CT_LIFETIME_TCP": config.ct_timeout_tcp,
        "CT_LIFETIME_TCP_SYN": config.ct_timeout_tcp_syn,
        "CT_LIFETIME_TCP_FIN": config.ct_timeout_tcp_fin,
        "CT_LIFETIME_NONTCP": config.ct_timeout_any,
        "LB_MAGLEV_TABLE_SIZE": config.maglev_table_size,
    }
    if pod_cidr:
        v["POD_CIDR_ADDR"], v["POD_CIDR_MASK"] = _cidr(pod_cidr)
    cluster = cluster_cidr or config.cluster_pool_ipv4_cidr
    v["CLUSTER_CIDR_ADDR"], v["CLUSTER_CIDR_MASK"] = _cidr(cluster)
    if config.enable_ipv4_masquerade and pod_cidr:
        v["ENABLE_MASQUERADE"] = ""
    if config.service_no_backend_response == "drop":
        v["SERVICE_NO_BACKEND_DROP"] = ""
    if trace if trace is not None else config.monitor_trace:
        v["ENABLE_TRACE"] = ""
    return NodeDefines(pin_root or config.bpf_root, sizes_from_config(config), v)
