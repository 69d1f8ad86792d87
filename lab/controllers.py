"""The lab's controller roles in one process: a scheduler, Deployment -> Pods, and EndpointSlices.

- Scheduler: Pods without spec.nodeName (and with the default scheduler) are bound round-robin to
  the lab's Nodes (label `lab.pycilium.io/node`; every Node when none has it), through the
  pods/binding subresource (or by setting spec.nodeName on a server without it).
- Deployments: `spec.replicas` Pods (also when set through the deployments/scale subresource),
  named `<deployment>-<template hash>-<5 random>` with the template's labels plus
  `pod-template-hash`, owned by the Deployment; a changed template creates the new Pods first and
  removes the old ones once the new ones are Ready; status counts are kept up to date; Pods whose
  owning Deployment is gone are deleted (the lab server has no garbage collector).
- EndpointSlices: per Service with a selector, discovery.k8s.io/v1 slices labelled
  `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by: pycilium-lab`, one per
  distinct port mapping (named targetPorts resolve per pod through its containerPorts), endpoints
  with addresses, nodeName, targetRef and conditions ready/serving/terminating (terminating pods
  stay listed, not ready, while they drain). A Service with no pods gets one empty slice.

Level-triggered: every watch event marks keys dirty; one worker reconciles each key from the
reflector caches and writes only what differs. Writes that are not yet visible in the caches are
remembered for a while, so a Deployment is never scaled twice for the same gap.

    python -m pycilium.lab.controllers --kubeconfig KC
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pycilium.agent.k8s.reflector import Handlers, Reflector, wait_for_sync
from pycilium.lab.cluster.kube import DEPLOYMENT, ENDPOINTSLICE, NODE, POD, SERVICE, APIError, Kube, Obj
from pycilium.lab.manifests import match_labels, pod_ready, resolve_target_port, short_hash

log = logging.getLogger("pycilium.lab.controllers")

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "pycilium-lab"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
LAB_NODE_LABEL = "lab.pycilium.io/node"
TEMPLATE_HASH_LABEL = "pod-template-hash"
EXPECTATION_TTL = 30.0

Key = tuple[str, str, str]  # (role, namespace, name)


def _meta(obj: Obj) -> Obj:
    return obj.get("metadata") or {}


def _owner(pod: Obj, kind: str) -> Obj | None:
    for ref in _meta(pod).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller", True):
            return dict(ref)
    return None


def _rand(n: int = 5) -> str:
    return "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


# ---- EndpointSlice computation (pure) --------------------------------------------------------------


def endpoint_conditions(pod: Obj, publish_not_ready: bool = False) -> dict[str, bool]:
    terminating = bool(_meta(pod).get("deletionTimestamp"))
    serving = pod_ready(pod) or publish_not_ready
    return {"ready": serving and not terminating, "serving": serving, "terminating": terminating}


def slice_ports(svc: Obj, pod: Obj) -> list[Obj]:
    """The EndpointSlice ports of one pod for a Service (ports a pod cannot resolve are left out)."""
    out = []
    for sp in (svc.get("spec") or {}).get("ports") or []:
        proto = str(sp.get("protocol") or "TCP")
        target = resolve_target_port(pod, sp.get("targetPort"), int(sp["port"]), proto)
        if target is None:
            continue
        out.append({"name": str(sp.get("name") or ""), "protocol": proto, "port": target})
    return out


def desired_slices(svc: Obj, pods: list[Obj]) -> list[Obj]:
    """The EndpointSlices a Service should have, given every pod of its namespace."""
    meta, spec = _meta(svc), svc.get("spec") or {}
    selector = spec.get("selector") or {}
    ns, name = meta.get("namespace", "default"), meta["name"]
    publish = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[str, tuple[list[Obj], list[Obj]]] = {}
    for pod in sorted(pods, key=lambda p: str((p.get("status") or {}).get("podIP") or "")):
        pmeta, pspec, pstatus = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
        if pmeta.get("namespace", "default") != ns or not match_labels(selector, pmeta.get("labels")):
            continue
        ip = pstatus.get("podIP")
        if not ip or not pspec.get("nodeName") or pstatus.get("phase") in ("Succeeded", "Failed"):
            continue
        ports = slice_ports(svc, pod)
        gkey = short_hash(ports, 8)
        groups.setdefault(gkey, (ports, []))[1].append(
            {
                "addresses": [ip],
                "conditions": endpoint_conditions(pod, publish),
                "nodeName": pspec["nodeName"],
                "targetRef": {
                    "kind": "Pod",
                    "namespace": ns,
                    "name": pmeta["name"],
                    "uid": pmeta.get("uid", ""),
                },
            }
        )
    if not groups:
        groups[short_hash([], 8)] = ([], [])
    labels = dict(meta.get("labels") or {})
    labels.update({SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY})
    if spec.get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    out = []
    for gkey, (ports, endpoints) in sorted(groups.items()):
        owner = {
            "apiVersion": "v1",
            "kind": "Service",
            "name": name,
            "uid": meta.get("uid", ""),
            "controller": True,
            "blockOwnerDeletion": True,
        }
        out.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name[:52]}-{gkey}",
                    "namespace": ns,
                    "labels": labels,
                    "ownerReferences": [owner],
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            }
        )
    return out


def _slice_differs(cur: Obj, want: Obj) -> bool:
    def norm(s: Obj) -> tuple[Any, ...]:
        eps = [
            {k: e.get(k) for k in ("addresses", "conditions", "nodeName", "targetRef")}
            for e in s.get("endpoints") or []
        ]
        ports = [{k: p.get(k) for k in ("name", "protocol", "port")} for p in s.get("ports") or []]
        return (_meta(s).get("labels") or {}, eps, ports)

    return norm(cur) != norm(want)


# ---- the controller process ----------------------------------------------------------------------


class WorkQueue:
    """Dirty keys, deduplicated, in first-marked order; `retry` re-marks after a delay."""

    def __init__(self) -> None:
        self._keys: OrderedDict[Key, None] = OrderedDict()
        self._later: list[tuple[float, Key]] = []
        self._cv = threading.Condition()

    def add(self, key: Key) -> None:
        with self._cv:
            self._keys[key] = None
            self._cv.notify()

    def retry(self, key: Key, delay: float) -> None:
        with self._cv:
            self._later.append((time.monotonic() + delay, key))
            self._cv.notify()

    def get(self, stop: threading.Event, timeout: float = 1.0) -> Key | None:
        with self._cv:
            deadline = time.monotonic() + timeout
            while not stop.is_set():
                now = time.monotonic()
                due = [k for t, k in self._later if t <= now]
                if due:
                    self._later = [(t, k) for t, k in self._later if t > now]
                    for k in due:
                        self._keys[k] = None
                if self._keys:
                    key, _ = self._keys.popitem(last=False)
                    return key
                if now >= deadline:
                    return None
                nxt = min([t for t, _ in self._later] + [deadline])
                self._cv.wait(max(0.01, nxt - now))
            return None


class Controllers:
    def __init__(self, kube: Kube, *, resync: float = 30.0) -> None:
        self.kube = kube
        self.queue = WorkQueue()
        self.stop_event = threading.Event()
        self.resync = resync
        self._rr = 0
        self._thread: threading.Thread | None = None
        # deployment key -> {pod name: deadline} created / deleted but maybe not yet in the cache
        self._created: dict[tuple[str, str], dict[str, float]] = {}
        self._deleted: dict[tuple[str, str], dict[str, float]] = {}
        wt = (20.0, 40.0)
        self.pods = Reflector(kube.api, POD, watch_timeout=wt, name="lab-pods")
        self.services = Reflector(kube.api, SERVICE, watch_timeout=wt, name="lab-services")
        self.deployments = Reflector(kube.api, DEPLOYMENT, watch_timeout=wt, name="lab-deployments")
        self.slices = Reflector(
            kube.api,
            ENDPOINTSLICE,
            label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}",
            watch_timeout=wt,
            name="lab-endpointslices",
        )
        self.nodes = Reflector(kube.api, NODE, watch_timeout=wt, name="lab-nodes")
        self.pods.add_handlers(self._handlers(self._on_pod))
        self.services.add_handlers(self._handlers(lambda o: self.queue.add(("svc", *self._nn(o)))))
        self.deployments.add_handlers(self._handlers(lambda o: self.queue.add(("deploy", *self._nn(o)))))
        self.slices.add_handlers(self._handlers(self._on_slice))
        self.nodes.add_handlers(self._handlers(lambda o: self.queue.add(("resched", "", ""))))

    @staticmethod
    def _nn(obj: Obj) -> tuple[str, str]:
        m = _meta(obj)
        return str(m.get("namespace") or ""), str(m.get("name") or "")

    @staticmethod
    def _handlers(fn: Callable[[Obj], None]) -> Handlers:
        def update(old: Obj, new: Obj) -> None:
            if old:
                fn(old)
            fn(new)

        return Handlers(on_add=fn, on_update=update, on_delete=fn)

    def _on_pod(self, pod: Obj) -> None:
        ns, name = self._nn(pod)
        if not (pod.get("spec") or {}).get("nodeName"):
            self.queue.add(("sched", ns, name))
        for svc in self.services.objects():
            if self._nn(svc)[0] == ns:
                self.queue.add(("svc", *self._nn(svc)))
        ref = _owner(pod, "Deployment")
        if ref is not None:
            self.queue.add(("deploy", ns, str(ref.get("name"))))

    def _on_slice(self, sl: Obj) -> None:
        svc = (_meta(sl).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc:
            self.queue.add(("svc", self._nn(sl)[0], svc))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, sync_timeout: float | None = None) -> None:
        """Start the watches and, once every cache is filled, the worker."""
        refl = [self.nodes, self.services, self.slices, self.deployments, self.pods]
        for r in refl:
            r.start()
        deadline = None if sync_timeout is None else time.monotonic() + sync_timeout
        while not wait_for_sync(refl, 5.0):
            if self.stop_event.is_set():
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("controllers: caches did not sync")
            log.info("waiting for the API server (caches not synced yet)")
        self._thread = threading.Thread(target=self._run, name="lab-controllers", daemon=True)
        self._thread.start()
        log.info("controllers started")

    def stop(self) -> None:
        self.stop_event.set()
        for r in (self.pods, self.services, self.deployments, self.slices, self.nodes):
            r.stop(timeout=2)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        last_resync = time.monotonic()
        while not self.stop_event.is_set():
            if time.monotonic() - last_resync > self.resync:
                last_resync = time.monotonic()
                self.resync_all()
            key = self.queue.get(self.stop_event)
            if key is None:
                continue
            try:
                self.reconcile(key)
            except APIError as e:
                level = logging.INFO if e.status == 409 else logging.WARNING
                log.log(level, "%s %s/%s: %s; retrying", key[0], key[1], key[2], e)
                self.queue.retry(key, 0.5 if e.status == 409 else 2.0)
            except Exception:
                log.exception("%s %s/%s failed; retrying", *key)
                self.queue.retry(key, 2.0)

    def resync_all(self) -> None:
        for svc in self.services.objects():
            self.queue.add(("svc", *self._nn(svc)))
        for d in self.deployments.objects():
            self.queue.add(("deploy", *self._nn(d)))
        for pod in self.pods.objects():
            ref = _owner(pod, "Deployment")
            if ref is not None:
                self.queue.add(("deploy", self._nn(pod)[0], str(ref.get("name"))))
        self.queue.add(("resched", "", ""))

    def reconcile(self, key: Key) -> None:
        role, ns, name = key
        if role == "svc":
            self.sync_service(ns, name)
        elif role == "deploy":
            self.sync_deployment(ns, name)
        elif role == "sched":
            self.schedule(ns, name)
        elif role == "resched":
            for pod in self.pods.objects():
                if not (pod.get("spec") or {}).get("nodeName"):
                    self.queue.add(("sched", *self._nn(pod)))

    # -- scheduler ---------------------------------------------------------------------------------
    def schedulable_nodes(self) -> list[str]:
        nodes = [n for n in self.nodes.objects() if not (n.get("spec") or {}).get("unschedulable")]
        lab = [n for n in nodes if LAB_NODE_LABEL in (_meta(n).get("labels") or {})]
        return sorted(_meta(n)["name"] for n in (lab or nodes))

    def schedule(self, ns: str, name: str) -> None:
        pod = self.pods.get(ns, name)
        if pod is None or _meta(pod).get("deletionTimestamp"):
            return
        spec = pod.get("spec") or {}
        if spec.get("nodeName") or spec.get("schedulerName") not in (None, "", "default-scheduler"):
            return
        nodes = self.schedulable_nodes()
        if not nodes:
            log.info("pod %s/%s: no node to schedule on yet", ns, name)
            self.queue.retry(("sched", ns, name), 2.0)
            return
        node = nodes[self._rr % len(nodes)]
        self._rr += 1
        self.bind(pod, node)
        log.info("pod %s/%s scheduled on %s", ns, name, node)

    def bind(self, pod: Obj, node: str) -> None:
        ns, name = self._nn(pod)
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": _meta(pod).get("uid")},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            self.kube.request("POST", POD.path(ns, name) + "/binding", body=binding)
            return
        except APIError as e:
            if e.status not in (404, 405):
                raise
        # a server without the binding subresource: set spec.nodeName instead
        self.kube.patch(POD, name, {"spec": {"nodeName": node}}, ns)

    # -- deployments -------------------------------------------------------------------------------
    def _pending(
        self, table: dict[tuple[str, str], dict[str, float]], key: tuple[str, str]
    ) -> dict[str, float]:
        now = time.monotonic()
        d = {n: t for n, t in table.get(key, {}).items() if t > now}
        table[key] = d
        return d

    def sync_deployment(self, ns: str, name: str) -> None:
        dep = self.deployments.get(ns, name)
        owned = [
            p
            for p in self.pods.objects()
            if self._nn(p)[0] == ns and (_owner(p, "Deployment") or {}).get("name") == name
        ]
        if dep is None:  # garbage-collect the pods of a deleted Deployment
            for p in owned:
                if not _meta(p).get("deletionTimestamp"):
                    self.kube.delete(POD, self._nn(p)[1], ns, uid=_meta(p).get("uid"))
            return
        uid = _meta(dep).get("uid")
        owned = [p for p in owned if (_owner(p, "Deployment") or {}).get("uid") in (None, "", uid)]
        spec = dep.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        thash = short_hash(template, 10)
        created = self._pending(self._created, (ns, name))
        deleted = self._pending(self._deleted, (ns, name))
        live = [p for p in owned if not _meta(p).get("deletionTimestamp") and self._nn(p)[1] not in deleted]
        seen = {self._nn(p)[1] for p in owned}
        for n in list(created):
            if n in seen:
                del created[n]
        current = [p for p in live if (_meta(p).get("labels") or {}).get(TEMPLATE_HASH_LABEL) == thash]
        old = [p for p in live if p not in current]
        have = len(current) + len(created)
        if have < replicas:
            for _ in range(replicas - have):
                pod_name = f"{name[:42]}-{thash}-{_rand()}"
                self.kube.create(POD, self._pod_for(dep, template, thash, pod_name), ns)
                created[pod_name] = time.monotonic() + EXPECTATION_TTL
                log.info("deployment %s/%s: created pod %s", ns, name, pod_name)
        elif have > replicas:
            # not-ready ones first, then the newest
            surplus = sorted(current, key=lambda p: (pod_ready(p), _meta(p).get("creationTimestamp") or ""))
            for p in surplus[: have - replicas]:
                self._delete_pod(ns, name, p, deleted)
        ready_current = sum(1 for p in current if pod_ready(p))
        if old and (ready_current >= replicas or replicas == 0):
            for p in old:
                self._delete_pod(ns, name, p, deleted)
        self._deployment_status(dep, live, current, thash)

    def _delete_pod(self, ns: str, dep: str, pod: Obj, deleted: dict[str, float]) -> None:
        pname = self._nn(pod)[1]
        self.kube.delete(POD, pname, ns, uid=_meta(pod).get("uid"))
        deleted[pname] = time.monotonic() + EXPECTATION_TTL
        log.info("deployment %s/%s: deleted pod %s", ns, dep, pname)

    @staticmethod
    def _pod_for(dep: Obj, template: Obj, thash: str, pod_name: str) -> Obj:
        tmeta = template.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        labels[TEMPLATE_HASH_LABEL] = thash
        meta = _meta(dep)
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": meta.get("namespace", "default"),
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": meta["name"],
                        "uid": meta.get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": dict(template.get("spec") or {}),
        }
        if tmeta.get("annotations"):
            pod["metadata"]["annotations"] = dict(tmeta["annotations"])
        return pod

    def _deployment_status(self, dep: Obj, live: list[Obj], current: list[Obj], thash: str) -> None:
        want = {
            "observedGeneration": _meta(dep).get("generation", 1),
            "replicas": len(live),
            "updatedReplicas": len(current),
            "readyReplicas": sum(1 for p in live if pod_ready(p)),
            "availableReplicas": sum(1 for p in live if pod_ready(p)),
        }
        want["unavailableReplicas"] = max(
            0, int((dep.get("spec") or {}).get("replicas", 1)) - want["readyReplicas"]
        )
        cur = dep.get("status") or {}
        if all(cur.get(k, 0) == v for k, v in want.items()):
            return
        ns, name = self._nn(dep)
        try:
            self.kube.patch(DEPLOYMENT, name, {"status": want}, ns, status=True)
        except APIError as e:
            if e.status != 404:
                raise

    # -- endpointslices ----------------------------------------------------------------------------
    def sync_service(self, ns: str, name: str) -> None:
        svc = self.services.get(ns, name)
        existing = {
            self._nn(s)[1]: s
            for s in self.slices.objects()
            if self._nn(s)[0] == ns and (_meta(s).get("labels") or {}).get(SERVICE_NAME_LABEL) == name
        }
        spec = (svc or {}).get("spec") or {}
        want: list[Obj] = []
        if svc is not None and spec.get("selector") and spec.get("type") != "ExternalName":
            pods = [p for p in self.pods.objects() if self._nn(p)[0] == ns]
            want = desired_slices(svc, pods)
        wanted_names = {_meta(s)["name"] for s in want}
        # create/update first, delete after: endpoints moving between slices never vanish in between
        for s in want:
            sname = _meta(s)["name"]
            cur = existing.get(sname)
            if cur is None:
                try:
                    self.kube.create(ENDPOINTSLICE, s, ns)
                except APIError as e:
                    if e.status != 409:
                        raise
                    fresh = self.kube.get(ENDPOINTSLICE, sname, ns)
                    if fresh is None:
                        raise
                    s["metadata"]["resourceVersion"] = _meta(fresh).get("resourceVersion")
                    self.kube.replace(ENDPOINTSLICE, s, ns)
                log.info(
                    "service %s/%s: endpointslice %s created (%d endpoints)",
                    ns,
                    name,
                    sname,
                    len(s["endpoints"]),
                )
            elif _slice_differs(cur, s):
                s["metadata"]["resourceVersion"] = _meta(cur).get("resourceVersion")
                self.kube.replace(ENDPOINTSLICE, s, ns)
                log.info(
                    "service %s/%s: endpointslice %s updated (%d endpoints)",
                    ns,
                    name,
                    sname,
                    len(s["endpoints"]),
                )
        for sname in existing:
            if sname not in wanted_names:
                self.kube.delete(ENDPOINTSLICE, sname, ns)
                log.info("service %s/%s: endpointslice %s deleted", ns, name, sname)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pycilium.lab.controllers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    kube = Kube(a.kubeconfig, user_agent="pycilium-lab-controllers")
    ctl = Controllers(kube)
    starter = threading.Thread(target=ctl.start, daemon=True)
    starter.start()
    done.wait()
    ctl.stop()
    kube.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
