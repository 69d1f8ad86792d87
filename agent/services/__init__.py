"""Kubernetes Services + EndpointSlices -> the BPF load balancer (kube-proxy replacement).

mgr = ServiceManager(node_name=cfg.node_name, bpf_root=cfg.bpf_root, state_dir=cfg.state_dir)
svc = Reflector(api, SERVICES, label_selector=SERVICE_SELECTOR, transform=compact_service,
                store_objects=False, handlers=[mgr.service_handlers()])
eps = Reflector(api, ENDPOINTSLICES, label_selector=ENDPOINTSLICE_SELECTOR,
                transform=compact_endpoint_slice, store_objects=False,
                handlers=[mgr.endpointslice_handlers()])
mgr.start(sources=[svc, eps]); svc.start(); eps.start()
...
mgr.list_services()   # pycilium service list
"""

from .lbmaps import LBMaps, PurgeRequest
from .manager import BackendView, ServiceManager, ServiceView
from .model import (
    ServiceInfo,
    SliceInfo,
    compact_endpoint_slice,
    compact_service,
    parse_endpoint_slice,
    parse_service,
)
from .translate import Frontend, FrontendPlan, ServicePlan, plan_service

__all__ = [
    "BackendView",
    "Frontend",
    "FrontendPlan",
    "LBMaps",
    "PurgeRequest",
    "ServiceInfo",
    "ServiceManager",
    "ServicePlan",
    "ServiceView",
    "SliceInfo",
    "compact_endpoint_slice",
    "compact_service",
    "parse_endpoint_slice",
    "parse_service",
    "plan_service",
]
