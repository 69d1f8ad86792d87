"""Kubernetes NetworkPolicy enforced by security identity.

- selectors: label selectors and peer selectors (pods, namespaces, ipBlocks);
- k8s: NetworkPolicy dicts parsed into rules (exact Kubernetes semantics, errors by field);
- selectorcache: selector -> identities, kept up to date as identities come and go;
- ports: endPort ranges as LPM prefixes;
- compiler: rules -> enforcement flags and policy map keys of one endpoint;
- datapath: the pinned policy and endpoints maps (and an in-memory double);
- engine: `PolicyEngine`, incremental and ordered writes for all local endpoints;
- controlplane: `PolicyControlPlane`, identity + ipcache + policy wired for the agent's main.
"""

from pycilium.agent.policy.compiler import EndpointPolicy, PolicyMapKey, Subject, compile_endpoint
from pycilium.agent.policy.controlplane import PolicyControlPlane
from pycilium.agent.policy.datapath import (
    MemoryPolicyDatapath,
    PinnedPolicyDatapath,
    PolicyDatapath,
    dump_policy_map,
)
from pycilium.agent.policy.engine import EndpointStatus, PolicyEngine, PolicyEntryView
from pycilium.agent.policy.k8s import ParsedPolicy, parse_network_policy
from pycilium.agent.policy.ports import range_to_prefixes
from pycilium.agent.policy.selectorcache import SelectorCache
from pycilium.agent.policy.selectors import CIDRSelector, EndpointSelector, LabelSelector, PolicyError

__all__ = [
    "CIDRSelector",
    "EndpointPolicy",
    "EndpointSelector",
    "EndpointStatus",
    "LabelSelector",
    "MemoryPolicyDatapath",
    "ParsedPolicy",
    "PinnedPolicyDatapath",
    "PolicyControlPlane",
    "PolicyDatapath",
    "PolicyEngine",
    "PolicyEntryView",
    "PolicyError",
    "PolicyMapKey",
    "SelectorCache",
    "Subject",
    "compile_endpoint",
    "dump_policy_map",
    "parse_network_policy",
    "range_to_prefixes",
]
