"""Agent configuration: one validated model, read from env (PYCILIUM_*), a config dir or flags.

A Kubernetes ConfigMap mounted as a directory (one file per key, kebab-case names such as
``bpf-ct-global-tcp-max``) is read with ``--config-dir``; environment variables
``PYCILIUM_<FIELD_NAME>`` override it; command-line flags override both.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_STATE_DIR = "/var/run/pycilium"
DEFAULT_BPF_ROOT = "/sys/fs/bpf/pycilium"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


class AgentConfig(BaseModel):
    """Resolved node-level settings of one agent."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    node_name: str = Field(default_factory=lambda: os.uname().nodename, alias="node-name")
    # Kubernetes access: in-cluster config when neither is set.
    kubeconfig: str | None = Field(default=None, alias="kubeconfig")
    k8s_service_host: str | None = Field(default=None, alias="k8s-service-host")
    k8s_service_port: int | None = Field(default=None, alias="k8s-service-port", ge=1, le=65535)

    # Datapath devices and addressing.
    devices: list[str] = Field(default_factory=list, alias="devices")  # external devices; [] = auto
    node_ip: str | None = Field(default=None, alias="node-ip")  # auto from the first device
    cluster_pool_ipv4_cidr: str = Field(default="10.200.0.0/16", alias="cluster-pool-ipv4-cidr")
    pod_cidr: str | None = Field(default=None, alias="pod-cidr")  # else Node.spec.podCIDR
    service_cidr: str = Field(default="10.96.0.0/12", alias="service-cidr")
    ipam_mode: Literal["kubernetes", "static"] = Field(default="kubernetes", alias="ipam-mode")
    # native: routes to other nodes' pod CIDRs via their node IPs (the underlay must route pod IPs
    # between nodes, e.g. one L2 segment); tunnel: VXLAN between nodes (agent/nodes/tunnel.py).
    routing_mode: Literal["native", "tunnel"] = Field(default="native", alias="routing-mode")
    tunnel_protocol: Literal["vxlan"] = Field(default="vxlan", alias="tunnel-protocol")
    tunnel_port: int = Field(default=8472, alias="tunnel-port", ge=1, le=65535)
    mtu: int = Field(default=1500, alias="mtu", ge=1280, le=9000)  # the node's device MTU

    # Kube-proxy replacement and load-balancing.
    kube_proxy_replacement: bool = Field(default=True, alias="kube-proxy-replacement")
    lb_algorithm: Literal["random", "maglev"] = Field(default="random", alias="bpf-lb-algorithm")
    maglev_table_size: int = Field(default=16381, alias="bpf-lb-maglev-table-size")
    node_port_min: int = Field(default=30000, alias="node-port-min", ge=1, le=65535)
    node_port_max: int = Field(default=32767, alias="node-port-max", ge=1, le=65535)
    service_no_backend_response: Literal["reject", "drop"] = Field(
        default="reject", alias="service-no-backend-response"
    )
    enable_ipv4_masquerade: bool = Field(default=True, alias="enable-ipv4-masquerade")
    # Socket load-balancing for the node's own processes (cgroup connect4/sendmsg4/recvmsg4).
    enable_socket_lb: bool = Field(default=True, alias="bpf-lb-sock")
    cgroup_root: str = Field(default="", alias="cgroup-root")  # cgroup v2 mount; "" = the first one found
    snat_port_min: int = Field(default=32768, alias="bpf-snat-port-min", ge=1024, le=65535)
    snat_port_max: int = Field(default=65535, alias="bpf-snat-port-max", ge=1024, le=65535)

    # Map sizes.
    ct_global_tcp_max: int = Field(default=524288, alias="bpf-ct-global-tcp-max", ge=1024)
    ct_global_any_max: int = Field(default=262144, alias="bpf-ct-global-any-max", ge=1024)
    nat_global_max: int = Field(default=524288, alias="bpf-nat-global-max", ge=1024)
    lb_map_max: int = Field(default=65536, alias="bpf-lb-map-max", ge=1024)
    policy_map_max: int = Field(default=65536, alias="bpf-policy-map-max", ge=1024)
    ipcache_map_max: int = Field(default=512000, alias="bpf-ipcache-map-max", ge=1024)

    # Conntrack timeouts (seconds) and GC.
    ct_timeout_tcp: int = Field(default=8000, alias="bpf-ct-timeout-regular-tcp", ge=1)
    ct_timeout_tcp_syn: int = Field(default=60, alias="bpf-ct-timeout-regular-tcp-syn", ge=1)
    ct_timeout_tcp_fin: int = Field(default=10, alias="bpf-ct-timeout-regular-tcp-fin", ge=1)
    ct_timeout_any: int = Field(default=60, alias="bpf-ct-timeout-regular-any", ge=1)
    conntrack_gc_interval: float = Field(default=0.0, alias="conntrack-gc-interval", ge=0)  # 0: adaptive
    conntrack_gc_max_interval: float = Field(default=43200.0, alias="conntrack-gc-max-interval", gt=0)

    # Policy.
    policy_enforcement_mode: Literal["default", "always", "never"] = Field(
        default="default", alias="enable-policy"
    )
    identity_gc_interval: float = Field(default=900.0, alias="identity-gc-interval", gt=0)
    identity_gc_grace: float = Field(default=300.0, alias="identity-gc-grace", ge=0)

    # Paths and ports.
    bpf_root: str = Field(default=DEFAULT_BPF_ROOT, alias="bpf-root")
    state_dir: str = Field(default=DEFAULT_STATE_DIR, alias="state-dir")
    # Where the node's /proc/sys is writable (a non-privileged container sees a read-only
    # /proc/sys; the chart mounts the host's /proc/sys/net at /host/proc/sys/net).
    proc_sys_root: str = Field(default="/proc/sys", alias="proc-sys-root")
    socket_path: str = Field(default=f"{DEFAULT_STATE_DIR}/pycilium.sock", alias="socket-path")
    cni_socket_path: str = Field(default=f"{DEFAULT_STATE_DIR}/cni.sock", alias="cni-socket-path")
    cni_conf_dir: str = Field(default="/etc/cni/net.d", alias="cni-conf-dir")
    cni_bin_dir: str = Field(default="/opt/cni/bin", alias="cni-bin-dir")
    cni_conf_name: str = Field(default="05-pycilium.conflist", alias="cni-conf-name")
    cni_log_file: str = Field(default=f"{DEFAULT_STATE_DIR}/pycilium-cni.log", alias="cni-log-file")
    cni_exclusive: bool = Field(default=False, alias="cni-exclusive")
    write_cni_conf_when_ready: bool = Field(default=True, alias="write-cni-conf-when-ready")
    health_port: int = Field(default=9879, alias="health-port", ge=0, le=65535)
    prometheus_port: int = Field(default=9962, alias="prometheus-serve-port", ge=0, le=65535)
    health_bind: str = Field(default="127.0.0.1", alias="health-bind-address")
    prometheus_bind: str = Field(default="0.0.0.0", alias="prometheus-bind-address")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", alias="log-level")
    log_format: Literal["text", "json"] = Field(default="text", alias="log-format")
    monitor_trace: bool = Field(default=False, alias="monitor-trace")

    @field_validator("cluster_pool_ipv4_cidr", "service_cidr", "pod_cidr")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as e:
            raise ValueError(f"not an IPv4 CIDR: {v!r} ({e})") from e

    @property
    def pod_mtu(self) -> int:
        """MTU of pod interfaces: the device's, minus the VXLAN overhead in tunnel mode."""
        from pycilium.agent.nodes.tunnel import VXLAN_OVERHEAD

        return self.mtu - VXLAN_OVERHEAD if self.routing_mode == "tunnel" else self.mtu

    @field_validator("maglev_table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        from pycilium.agent.services.maglev import is_prime

        if not 251 <= v <= 1_048_573 or not is_prime(v):
            raise ValueError(f"must be a prime between 251 and 1048573, got {v}")
        return v

    @field_validator("node_ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError as e:
            raise ValueError(f"not an IPv4 address: {v!r}") from e

    def node_bpf_root(self) -> Path:
        return Path(self.bpf_root)


_BOOL_TRUE = {"true", "1", "yes", "on"}
_BOOL_FALSE = {"false", "0", "no", "off", ""}


def _coerce(raw: str, field_type: Any) -> Any:
    """Config-dir and env values are strings; lists are comma or space separated."""
    text = raw.strip()
    origin = getattr(field_type, "__origin__", None)
    if origin is list:
        return [p for p in text.replace(",", " ").split() if p]
    return text


def load_config(
    config_dir: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> AgentConfig:
    """Merge config-dir files, PYCILIUM_* environment variables and explicit overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    by_alias = {f.alias or n: (n, f) for n, f in AgentConfig.model_fields.items()}
    by_name = {n: (n, f) for n, f in AgentConfig.model_fields.items()}
    if config_dir is not None:
        d = Path(config_dir)
        if not d.is_dir():
            raise ConfigError(f"config dir {d} does not exist")
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue  # ConfigMap volumes carry ..data symlink dirs
            if p.name not in by_alias:
                raise ConfigError(f"unknown config key {p.name!r} in {d}")
            name, f = by_alias[p.name]
            values[name] = _coerce(p.read_text(), f.annotation)
    for key, raw in env.items():
        if not key.startswith("PYCILIUM_"):
            continue
        name = key[len("PYCILIUM_") :].lower()
        if name in by_name:
            values[name] = _coerce(raw, by_name[name][1].annotation)
    for k, v in (overrides or {}).items():
        name = by_alias[k][0] if k in by_alias else k
        if name not in by_name:
            raise ConfigError(f"unknown config key {k!r}")
        values[name] = v
    for name, v in list(values.items()):
        if isinstance(v, str) and by_name[name][1].annotation is bool:
            low = v.lower()
            if low not in _BOOL_TRUE | _BOOL_FALSE:
                raise ConfigError(f"config key {by_name[name][1].alias!r}: not a boolean: {v!r}")
            values[name] = low in _BOOL_TRUE
    try:
        return AgentConfig.model_validate(values)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            alias = by_name[field][1].alias if field in by_name else field
            msgs.append(f"{alias}: {err['msg']}")
        raise ConfigError("invalid agent configuration: " + "; ".join(msgs)) from None
