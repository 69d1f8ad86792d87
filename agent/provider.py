"""The agent's state as the gRPC API serves it (pycilium.agent.api.provider.AgentStateProvider)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pycilium.agent.api import provider as p

if TYPE_CHECKING:
    from pycilium.agent.main import Agent


class Provider:
    def __init__(self, agent: Agent):
        self.agent = agent

    # -- status ------------------------------------------------------------------------------------
    def status(self, verbose: bool) -> p.StatusInfo:
        a, cfg = self.agent, self.agent.config
        services = a.components.get("services")
        nodes = a.components.get("nodes")
        policy = a.components.get("policy")
        reflectors = getattr(a, "_reflectors", [])
        k8s_ok = bool(reflectors) and all(r.synced.is_set() for r in reflectors)
        controllers = [p.ControllerStatus(name=f"k8s-watch-{r.name}", healthy=r.synced.is_set())
                       for r in reflectors]  # fmt: skip
        if services is not None:
            st = services.status()
            controllers.append(p.ControllerStatus(name="service-sync", healthy=not st["last_error"],
                                                  success_count=st["cycles"], last_error=st["last_error"]))  # fmt: skip
        if nodes is not None:
            controllers.append(p.ControllerStatus(name="node-routes", healthy=not nodes.route_errors,
                                                  last_error="; ".join(nodes.route_errors.values())))  # fmt: skip
        if policy is not None:
            controllers.append(p.ControllerStatus(name="policy-sync", healthy=policy.synced))
        ctgc = getattr(a, "ctgc", None)
        if ctgc is not None:
            controllers.append(p.ControllerStatus(name="conntrack-gc", healthy=True, success_count=ctgc.runs))
        n_nodes = len(nodes.nodes()) if nodes is not None else 0
        return p.StatusInfo(
            node_name=cfg.node_name,
            node_ip=a.node_ip,
            version=f"{a.__class__.__module__.split('.')[0]} 0.1.0",
            agent=p.ComponentStatus(p.OK if a.ready_reason is None else "WARNING", a.ready_reason or "ready"),
            kubernetes=p.ComponentStatus(p.OK if k8s_ok else "WARNING", "synced" if k8s_ok else "syncing"),
            kube_proxy_replacement=p.KubeProxyReplacementStatus(
                enabled=cfg.kube_proxy_replacement,
                devices=list(a.devices),
                direct_routing_device=a.devices[0] if a.devices else "",
                mode="SNAT",
                details={
                    "backend-selection": cfg.lb_algorithm,
                    "node-port-range": f"{cfg.node_port_min}-{cfg.node_port_max}",
                    "services": str(len(services.list_services())) if services else "0",
                },
            ),
            cni_config_path=f"{cfg.cni_conf_dir}/{cfg.cni_conf_name}",
            cni=p.ComponentStatus(p.OK if a.ready_reason is None else "WARNING"),
            ipam=self.ipam() if getattr(a, "ipam", None) is not None else None,
            masquerading=p.MasqueradingStatus(
                enabled=cfg.enable_ipv4_masquerade,
                mode="BPF",
                devices=list(a.devices),
                cidr=cfg.cluster_pool_ipv4_cidr,
            ),
            routing_mode="Native" if cfg.routing_mode == "native" else f"Tunnel [{cfg.tunnel_protocol}]",
            controllers=controllers,
            datapath=p.ComponentStatus(p.OK if getattr(a, "lxc", None) else "WARNING"),
            cluster_health=p.ComponentStatus(p.OK, f"{n_nodes}/{n_nodes} nodes known"),
            uptime_seconds=time.time() - a.started,
        )

    # -- services ----------------------------------------------------------------------------------
    def list_services(self) -> Sequence[p.ServiceInfo]:
        services = self.agent.components.get("services")
        if services is None:
            return []
        out = []
        for v in services.list_services():
            out.append(p.ServiceInfo(
                id=v.id, frontend_ip=v.address, frontend_port=v.port, protocol=v.protocol, type=v.type,
                backends=[p.BackendInfo(b.id, b.address, b.port, b.protocol, b.state) for b in v.backends],
                name=v.name, namespace=v.namespace,
                external_traffic_policy="Local" if v.flags & 0x04 else "Cluster",
                internal_traffic_policy="Local" if v.flags2 & 0x01 else "Cluster",
                session_affinity_timeout=v.affinity_timeout if v.flags & 0x10 else 0))  # fmt: skip
        return out

    # -- endpoints ---------------------------------------------------------------------------------
    def _endpoint_info(self, ep: object) -> p.EndpointInfo:
        a = self.agent
        policy = a.components.get("policy")
        status = {s.ep_id: s for s in policy.endpoints()} if policy is not None else {}
        s = status.get(ep.id)  # type: ignore[attr-defined]
        identity = ep.identity  # type: ignore[attr-defined]
        labels = policy.identity_labels(identity) if policy is not None else []
        return p.EndpointInfo(
            id=ep.id, identity=identity, labels=list(labels), ipv4=ep.ipv4,  # type: ignore[attr-defined]
            ingress_enforced=bool(s and s.ingress_enforced), egress_enforced=bool(s and s.egress_enforced),
            state="ready", pod_name=ep.pod_name, namespace=ep.pod_namespace,  # type: ignore[attr-defined]
            container_id=ep.container_id, ifname=ep.host_ifname, ifindex=ep.host_ifindex,  # type: ignore[attr-defined]
            mac=ep.pod_mac, netns=ep.netns)  # type: ignore[attr-defined]  # fmt: skip

    def list_endpoints(self) -> Sequence[p.EndpointInfo]:
        return [self._endpoint_info(ep) for ep in self.agent.endpoints.list_endpoints()]

    def get_endpoint(self, endpoint_id: int) -> p.EndpointInfo | None:
        ep = self.agent.endpoints.get(endpoint_id)
        return self._endpoint_info(ep) if ep is not None else None

    def delete_endpoint(self, endpoint_id: int) -> bool:
        ep = self.agent.endpoints.get(endpoint_id)
        if ep is None:
            return False
        self.agent.endpoints.delete(ep.container_id, ep.ifname)
        return True

    # -- identities --------------------------------------------------------------------------------
    def list_identities(self) -> Sequence[p.IdentityInfo]:
        policy = self.agent.components.get("policy")
        if policy is None:
            return []
        return [p.IdentityInfo(i, list(ls)) for i, ls in sorted(policy.identities().items())]

    def get_identity(self, identity_id: int) -> p.IdentityInfo | None:
        policy = self.agent.components.get("policy")
        if policy is None:
            return None
        labels = policy.identities().get(identity_id)
        return p.IdentityInfo(identity_id, list(labels)) if labels is not None else None

    def ipam(self) -> p.IPAMInfo:
        ipam = self.agent.ipam
        st = ipam.status()
        allocs = {a.ip: a.pod or a.owner for a in ipam.allocations()}
        return p.IPAMInfo(cidr=ipam.pod_cidr or "", capacity=st.total,
                          allocations=allocs)  # fmt: skip
