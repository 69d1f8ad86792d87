"""Security identities: label sets, their cluster-wide numbers, and every pod's identity.

- labels: the security-relevant label set of a pod / CIDR, reserved identities;
- backend: PyCiliumIdentity custom resources (Kubernetes) or memory;
- allocator: `IdentityAllocator` (allocate / release / lookup / all, CIDR identities, GC);
- pods: `PodTracker`, all pods of the cluster with their identities.
"""

from pycilium.agent.identity.allocator import (
    Identity,
    IdentityAllocationError,
    IdentityAllocator,
    IdentityListener,
    probe_sequence,
)
from pycilium.agent.identity.backend import (
    AlreadyExistsError,
    BackendError,
    IdentityBackend,
    KubernetesIdentityBackend,
    MemoryIdentityBackend,
    identity_crd,
)
from pycilium.agent.identity.labels import Labels, cidr_labels, labels_key, pod_identity_labels
from pycilium.agent.identity.pods import ContainerPort, PodInfo, PodListener, PodTracker, pod_from_object

__all__ = [
    "AlreadyExistsError",
    "BackendError",
    "ContainerPort",
    "Identity",
    "IdentityAllocationError",
    "IdentityAllocator",
    "IdentityBackend",
    "IdentityListener",
    "KubernetesIdentityBackend",
    "Labels",
    "MemoryIdentityBackend",
    "PodInfo",
    "PodListener",
    "PodTracker",
    "cidr_labels",
    "identity_crd",
    "labels_key",
    "pod_from_object",
    "pod_identity_labels",
    "probe_sequence",
]
