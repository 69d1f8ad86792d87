"""Kubernetes API access for the agent: client factory, reflectors (list+watch), CRD installer.

    api = new_api_client(config)                      # kubeconfig / in-cluster / host override
    install_crds(api)                                 # PyCiliumIdentity, PyCiliumNetworkPolicy
    svc = Reflector(api, SERVICES, label_selector=SERVICE_SELECTOR, handlers=[...])
    svc.start(); svc.wait_synced(); ...; svc.stop()

Reflectors run in threads with the synchronous client; see reflector.py for the event semantics.
"""

from .client import APIError, ClientConfigError, make_configuration, new_api_client, request_json
from .crds import AGENT_CRDS, IDENTITY_CRD, NETWORK_POLICY_CRD, install_crds
from .reflector import Backoff, Handlers, HasSynced, Reflector, compact, wait_for_sync
from .resources import (
    ENDPOINTSLICE_SELECTOR,
    ENDPOINTSLICES,
    NAMESPACES,
    NETWORKPOLICIES,
    NODES,
    PODS,
    PYCILIUM_IDENTITIES,
    PYCILIUM_NETWORK_POLICIES,
    SERVICE_SELECTOR,
    SERVICES,
    Resource,
)

__all__ = [
    "AGENT_CRDS",
    "ENDPOINTSLICES",
    "ENDPOINTSLICE_SELECTOR",
    "IDENTITY_CRD",
    "NAMESPACES",
    "NETWORKPOLICIES",
    "NETWORK_POLICY_CRD",
    "NODES",
    "PODS",
    "PYCILIUM_IDENTITIES",
    "PYCILIUM_NETWORK_POLICIES",
    "SERVICES",
    "SERVICE_SELECTOR",
    "APIError",
    "Backoff",
    "ClientConfigError",
    "Handlers",
    "HasSynced",
    "Reflector",
    "Resource",
    "compact",
    "install_crds",
    "make_configuration",
    "new_api_client",
    "request_json",
    "wait_for_sync",
]
