"""A Kubernetes-API-compatible HTTP server for the lab (and for tests).

Serves core v1 (namespaces, nodes, pods, services, endpoints, configmaps, secrets, serviceaccounts,
events), discovery.k8s.io/v1 EndpointSlices, networking.k8s.io/v1 NetworkPolicies, apps/v1
Deployments and DaemonSets, coordination.k8s.io/v1 Leases, apiextensions.k8s.io/v1 CRDs and every
custom resource a CRD registers; list/watch with resourceVersion, selectors, pagination, bookmarks
and 410 Expired; Service ClusterIP/NodePort allocation; fault injection. Works with the official
`kubernetes` client and kubectl over plain HTTP.

Modules: store (objects, resourceVersion, event history), selectors, patch, resources (types and
CRD registration), rest (generic verb semantics), semantics (per-kind admission), allocators,
watch (streams), discovery, handlers (HTTP routing), faults, server (lifecycle, thread runner),
kubeconfig.
"""

from .faults import Faults
from .kubeconfig import kubeconfig_dict, write_kubeconfig
from .server import APIServer, APIServerThread, ServerConfig

__all__ = ["APIServer", "APIServerThread", "Faults", "ServerConfig", "kubeconfig_dict", "write_kubeconfig"]
