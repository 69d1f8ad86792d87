"""Prometheus metrics read from the datapath at scrape time, and the HTTP endpoints of the agent.

`/metrics` (prometheus-serve-port) exports drop and forward counters by reason and direction from
the per-CPU metrics map, map pressure (entries / max_entries) of the maps that can fill up, and the
counters the subsystems register. `/healthz` (health-port, 127.0.0.1 by default) answers 200 once the
agent is ready and 503 with the reason before that.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pycilium.agent.datapath.ctgc import map_pressure
from pycilium.bpf.maps import BY_NAME, MapNotPinnedError, PinnedMap
from pycilium.bpf.maps.defines import d, reason_text

log = logging.getLogger("pycilium.metrics")
DIRECTIONS = {
    d("METRIC_DIR_INGRESS"): "INGRESS",
    d("METRIC_DIR_EGRESS"): "EGRESS",
    d("METRIC_DIR_SERVICE"): "SERVICE",
    d("METRIC_DIR_CT_TCP"): "ct4_global",
    d("METRIC_DIR_CT_ANY"): "ct_any4_global",
    d("METRIC_DIR_OVERLAY_TX"): "OVERLAY_TX",
    d("METRIC_DIR_OVERLAY_RX"): "OVERLAY_RX",
}
POLICY_ALLOWED = d("REASON_POLICY_ALLOWED")
CT_CREATED = d("REASON_CT_CREATED")


class DatapathCollector(Collector):
    """Reads the pinned maps when Prometheus scrapes."""

    def __init__(self, bpf_root: str, evictions: Callable[[], dict[str, int]] | None = None):
        self.bpf_root = bpf_root
        self.evictions = evictions

    def collect(self) -> Iterator[Any]:
        drops = CounterMetricFamily(
            "pycilium_drop_count", "Packets dropped by the datapath", labels=["reason", "direction"]
        )
        drop_bytes = CounterMetricFamily(
            "pycilium_drop_bytes", "Bytes dropped by the datapath", labels=["reason", "direction"]
        )
        fwd = CounterMetricFamily(
            "pycilium_forward_count", "Packets forwarded by the datapath", labels=["direction"]
        )
        fwd_bytes = CounterMetricFamily(
            "pycilium_forward_bytes", "Bytes forwarded by the datapath", labels=["direction"]
        )
        allowed = CounterMetricFamily(
            "pycilium_policy_verdicts", "New connections allowed by an enforced policy", labels=["direction"]
        )
        ct_created = CounterMetricFamily(
            "pycilium_conntrack_created", "Conntrack entries created", labels=["map"]
        )
        try:
            with PinnedMap(BY_NAME["metrics"], self.bpf_root) as m:
                for k, vs in m.items_percpu():
                    count, nbytes = sum(v.count for v in vs), sum(v.bytes for v in vs)
                    if not count:
                        continue  # an unused slot of the per-CPU array
                    direction = DIRECTIONS.get(k.dir, str(k.dir))
                    if k.reason == 0:
                        fwd.add_metric([direction], count)
                        fwd_bytes.add_metric([direction], nbytes)
                    elif k.reason == POLICY_ALLOWED:
                        allowed.add_metric([direction], count)
                    elif k.reason == CT_CREATED:
                        ct_created.add_metric([direction], count)
                    else:
                        drops.add_metric([reason_text(k.reason), direction], count)
                        drop_bytes.add_metric([reason_text(k.reason), direction], nbytes)
        except MapNotPinnedError:
            pass
        yield from (drops, drop_bytes, fwd, fwd_bytes, allowed, ct_created)
        pressure = GaugeMetricFamily(
            "pycilium_bpf_map_pressure", "Fill level of a BPF map (0..1)", labels=["map_name"]
        )
        for name, value in map_pressure(self.bpf_root).items():
            pressure.add_metric([name], value)
        yield pressure
        if self.evictions is not None:
            ev = CounterMetricFamily("pycilium_conntrack_evictions_estimated",
                                     "Conntrack entries gone before expiry without GC (LRU eviction when full, "
                                     "or purged with a removed backend): an upper bound", labels=["map"])  # fmt: skip
            for name, n in self.evictions().items():
                ev.add_metric([name], n)
            yield ev


class HTTPEndpoints:
    """/healthz and /metrics on their own ports (each may be 0 = off)."""

    def __init__(self, *, health_bind: str, health_port: int, metrics_bind: str, metrics_port: int,
                 readiness: Callable[[], str | None], registry: CollectorRegistry = REGISTRY,
                 details: Callable[[], dict[str, Any]] | None = None) -> None:  # fmt: skip
        self.readiness = readiness
        self.registry = registry
        self.details = details
        self._servers: list[ThreadingHTTPServer] = []
        if health_port:
            self._servers.append(self._make(health_bind, health_port))
        if metrics_port and (metrics_port != health_port or metrics_bind != health_bind):
            self._servers.append(self._make(metrics_bind, metrics_port))

    def _make(self, bind: str, port: int) -> ThreadingHTTPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    why = owner.readiness()
                    body = {"status": "ok" if why is None else "not ready", "reason": why or ""}
                    if owner.details and why is None and "brief" not in self.headers:
                        body.update(owner.details())
                    self._send(200 if why is None else 503, json.dumps(body).encode(), "application/json")
                elif self.path.startswith("/metrics"):
                    self._send(200, generate_latest(owner.registry), "text/plain; version=0.0.4")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        srv = ThreadingHTTPServer((bind, port), Handler)
        srv.daemon_threads = True
        return srv

    def start(self) -> None:
        for srv in self._servers:
            threading.Thread(
                target=srv.serve_forever, name=f"http-{srv.server_address[1]}", daemon=True
            ).start()

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
