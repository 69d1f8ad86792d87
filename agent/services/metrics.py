"""Prometheus metrics of the service load balancer (one set per registry)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class ServiceMetrics:
    sync_duration: Histogram
    drift_repairs: Counter
    services: Gauge
    frontends: Gauge
    backends: Gauge
    purged: Counter
    rejected: Counter


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, ServiceMetrics] = weakref.WeakKeyDictionary()


def service_metrics(registry: CollectorRegistry | None = None) -> ServiceMetrics:
    """The metrics registered in `registry` (default: the global one), created once per registry."""
    reg = REGISTRY if registry is None else registry
    with _lock:
        m = _by_registry.get(reg)
        if m is None:
            m = ServiceMetrics(
                sync_duration=Histogram(
                    "pycilium_services_sync_duration_seconds",
                    "Time to compute and write one batch of service changes into the datapath maps",
                    ["mode"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                    registry=reg,
                ),
                drift_repairs=Counter(
                    "pycilium_datapath_drift_repairs_total",
                    "Map entries the periodic audit found different from the desired state and repaired",
                    ["map"],
                    registry=reg,
                ),
                services=Gauge(
                    "pycilium_services",
                    "Kubernetes Services load-balanced by this node",
                    ["type"],
                    registry=reg,
                ),
                frontends=Gauge(
                    "pycilium_service_frontends",
                    "Service frontends (VIP:port/proto) in the datapath",
                    registry=reg,
                ),
                backends=Gauge(
                    "pycilium_service_backends", "Backends in the datapath", ["state"], registry=reg
                ),
                purged=Counter(
                    "pycilium_service_backend_purged_entries_total",
                    "Conntrack, NAT and affinity entries deleted because their backend went away",
                    ["map"],
                    registry=reg,
                ),
                rejected=Counter(
                    "pycilium_k8s_objects_rejected_total",
                    "Kubernetes objects (or fields of them) the service translation rejected",
                    ["kind"],
                    registry=reg,
                ),
            )
            _by_registry[reg] = m
        return m
