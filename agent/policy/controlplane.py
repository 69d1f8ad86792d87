"""Identity, ipcache and policy wired together for one agent: what the agent's main talks to.

    em = EndpointManager.from_config(config, ipam, datapath,
                                     identity_resolver=lambda ns, name: cp.resolve_identity(ns, name))
    cp = PolicyControlPlane.from_config(config, api_client, endpoint_manager=em)
    # reflector handlers (raw dicts):
    pods            -> cp.upsert_pod / cp.delete_pod
    namespaces      -> cp.upsert_namespace / cp.delete_namespace
    nodes           -> cp.upsert_node / cp.delete_node
    networkpolicies -> cp.upsert_policy / cp.delete_policy
    pyciliumnetworkpolicies -> cp.upsert_pycilium_policy / cp.delete_pycilium_policy
    pyciliumidentities -> cp.upsert_identity / cp.delete_identity
    # endpoint manager: identity and EP_F_POLICY_* flags are set through em.update()
    em.subscribe(lambda ep: cp.endpoint_added(ep.id, ep.ipv4, ep.pod_namespace, ep.pod_name),
                 lambda ep: cp.endpoint_removed(ep.id))
    # once every reflector above reports synced:
    cp.mark_synced()
    cp.start()   # background: identity GC every identity_gc_interval, retries every few seconds
    ...
    cp.stop()

All inputs are serialized by one lock shared by every component, and each input is one batch:
endpoints are regenerated once at its end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pycilium.agent.identity.allocator import IdentityAllocator
from pycilium.agent.identity.backend import IdentityBackend, KubernetesIdentityBackend
from pycilium.agent.identity.pods import PodTracker
from pycilium.agent.ipcache.datapath import IPCacheDatapath, PinnedIPCacheDatapath
from pycilium.agent.ipcache.manager import IPCacheManager
from pycilium.agent.policy.compiler import EnforcementMode
from pycilium.agent.policy.datapath import (
    EndpointManagerWriter,
    EndpointWriter,
    PinnedPolicyDatapath,
    PolicyDatapath,
)
from pycilium.agent.policy.engine import EndpointStatus, PolicyEngine, PolicyEntryView

log = logging.getLogger("pycilium.agent.policy")

Obj = dict[str, Any]


class PolicyControlPlane:
    def __init__(
        self,
        *,
        node_name: str,
        identity_backend: IdentityBackend | None,
        policy_datapath: PolicyDatapath,
        ipcache_datapath: IPCacheDatapath,
        endpoint_writer: EndpointWriter | None = None,
        mode: EnforcementMode = "default",
        gc_grace: float = 300.0,
        gc_interval: float = 900.0,
        retry_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lock = threading.RLock()
        self.node_name = node_name
        self.gc_grace = gc_grace
        self.gc_interval = gc_interval
        self.retry_interval = retry_interval
        self.clock = clock
        self.allocator = IdentityAllocator(identity_backend, lock=self.lock, clock=clock)
        self.ipcache = IPCacheManager(ipcache_datapath, node_name, lock=self.lock)
        for prefix, ident in self.ipcache.restored_cidr_identities().items():
            self.allocator.restore_cidr(prefix, ident)
        self.pods = PodTracker(self.allocator, node_name, lock=self.lock)
        self.pods.subscribe(self.ipcache)
        self.policy = PolicyEngine(
            self.allocator,
            self.pods,
            policy_datapath,
            endpoints=endpoint_writer,
            ipcache=self.ipcache,
            mode=mode,
            lock=self.lock,
        )
        self.synced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closers: list[Callable[[], None]] = []

    @classmethod
    def from_config(
        cls, config: Any, api_client: Any, endpoint_manager: Any = None, identity_version: str = "v1"
    ) -> PolicyControlPlane:
        """From an AgentConfig and a kubernetes ApiClient; opens the node's pinned maps. With the
        agent's EndpointManager, endpoint identity and policy flags go through its update();
        without, the endpoints map entries are changed in place (read-modify-write)."""
        pdp = PinnedPolicyDatapath(config.bpf_root)
        idp = PinnedIPCacheDatapath(config.bpf_root)
        cp = cls(
            node_name=config.node_name,
            identity_backend=KubernetesIdentityBackend(api_client, version=identity_version),
            policy_datapath=pdp,
            ipcache_datapath=idp,
            endpoint_writer=EndpointManagerWriter(endpoint_manager) if endpoint_manager is not None else None,
            mode=config.policy_enforcement_mode,
            gc_grace=config.identity_gc_grace,
            gc_interval=config.identity_gc_interval,
        )
        cp._closers += [pdp.close, idp.close]
        return cp

    # ---- reflector handlers --------------------------------------------------------------------
    def _run(self, fn: Callable[[Obj], None], obj: Obj) -> None:
        with self.policy.batch():
            fn(obj)

    def upsert_pod(self, obj: Obj) -> None:
        self._run(self.pods.upsert_pod, obj)

    def delete_pod(self, obj: Obj) -> None:
        self._run(self.pods.delete_pod, obj)

    def upsert_namespace(self, obj: Obj) -> None:
        self._run(self.pods.upsert_namespace, obj)

    def delete_namespace(self, obj: Obj) -> None:
        self._run(self.pods.delete_namespace, obj)

    def upsert_node(self, obj: Obj) -> None:
        self._run(self.ipcache.upsert_node, obj)

    def delete_node(self, obj: Obj) -> None:
        self._run(self.ipcache.delete_node, obj)

    def upsert_policy(self, obj: Obj) -> None:
        self._run(self.policy.upsert_policy, obj)

    def delete_policy(self, obj: Obj) -> None:
        self._run(self.policy.delete_policy, obj)

    def upsert_pycilium_policy(self, obj: Obj) -> None:
        self._run(self.policy.upsert_pycilium_policy, obj)

    def delete_pycilium_policy(self, obj: Obj) -> None:
        self._run(self.policy.delete_pycilium_policy, obj)

    def upsert_identity(self, obj: Obj) -> None:
        self._run(self.allocator.upsert_identity, obj)

    def delete_identity(self, obj: Obj) -> None:
        self._run(self.allocator.delete_identity, obj)

    # ---- endpoint manager ----------------------------------------------------------------------
    def endpoint_added(self, ep_id: int, ip: str, namespace: str, name: str) -> None:
        self.policy.endpoint_added(ep_id, ip, namespace, name)

    def endpoint_removed(self, ep_id: int) -> None:
        self.policy.endpoint_removed(ep_id)

    def endpoint_datapath_state(self, ep_id: int) -> tuple[int | None, int]:
        return self.policy.endpoint_datapath_state(ep_id)

    def resolve_identity(self, namespace: str, name: str) -> int | None:
        """The identity of a pod, if known (the endpoint manager's identity_resolver). Lock-free so
        that it can be called from any thread without lock-order concerns."""
        pod = self.pods.peek(namespace, name)
        return pod.identity if pod is not None else None

    # ---- lifecycle -----------------------------------------------------------------------------
    def mark_synced(self) -> None:
        """Pods, namespaces, nodes, NetworkPolicies and identities have all been listed."""
        with self.policy.batch():
            self.allocator.mark_synced()
            self.pods.retry_pending()
            self.policy.mark_synced()
            self.ipcache.mark_synced()
            for p in self.allocator.drop_unused_restored():
                self.ipcache.delete_cidr(p)
            self.synced = True

    def run_gc(self, now: float | None = None) -> list[int]:
        """One identity GC round (only once synced: before that every identity looks unused)."""
        with self.lock:
            if not self.synced:
                return []
            return self.allocator.gc(self.pods.in_use_label_keys(), self.gc_grace, now)

    def retry(self) -> None:
        """Retry identity allocations and endpoint writes that failed."""
        with self.policy.batch():
            self.pods.retry_pending()
            if self.synced:
                self.policy.retry()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pycilium-policy", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_gc = self.clock() + self.gc_interval
        while not self._stop.wait(self.retry_interval):
            try:
                self.retry()
                if self.clock() >= next_gc:
                    next_gc = self.clock() + self.gc_interval
                    self.run_gc()
            except Exception:
                log.exception("policy control plane background round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for close in self._closers:
            close()
        self._closers.clear()

    # ---- queries (CLI / API) -------------------------------------------------------------------
    def identities(self) -> dict[int, list[str]]:
        """`pycilium identity list`."""
        return {i: sorted(ls) for i, ls in self.allocator.all().items()}

    def identity_labels(self, identity: int) -> list[str]:
        return self.policy.identity_labels(identity)

    def endpoints(self) -> list[EndpointStatus]:
        return self.policy.endpoints()

    def policy_entries(self, ep_id: int) -> list[PolicyEntryView]:
        return self.policy.policy_entries(ep_id)

    def policy_errors(self) -> dict[str, list[str]]:
        return self.policy.policy_errors()
