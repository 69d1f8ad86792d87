"""Node watcher: routes to other nodes' pod CIDRs, node ipcache entries, this node's pod CIDRs.

nodes = NodeManager(node_name=cfg.node_name, bpf_root=cfg.bpf_root, routing_mode=cfg.routing_mode,
                    on_pod_cidrs=ipam.set_pod_cidrs, on_nodes_changed=services.nodes_changed)
r = Reflector(api, NODES, handlers=[nodes.handlers()])
nodes.start(sources=[r]); r.start()
"""

from .manager import NodeInfo, NodeManager, parse_node
from .routes import RTPROT_PYCILIUM, Route, RouteProgrammer

__all__ = ["RTPROT_PYCILIUM", "NodeInfo", "NodeManager", "Route", "RouteProgrammer", "parse_node"]
