"""End to end in one process: embedded API server -> reflectors -> service manager -> pinned maps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pycilium.agent.k8s import (
    ENDPOINTSLICE_SELECTOR,
    ENDPOINTSLICES,
    SERVICE_SELECTOR,
    SERVICES,
    Backoff,
    Reflector,
    new_api_client,
    request_json,
)
from pycilium.agent.services import ServiceManager, compact_endpoint_slice, compact_service
from pycilium.bpf import loader
from pycilium.bpf.maps import PinnedMap, lbmap
from pycilium.bpf.maps.util import be16_to_port, be32_to_ip
from pycilium.lab.apiserver import APIServerThread, write_kubeconfig

pytestmark = pytest.mark.kernel

Obj = dict[str, Any]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Agent:
    """The slice of the agent that load-balances services."""

    def __init__(self, api: Any, root: str, node: str = "n1") -> None:
        self.mgr = ServiceManager(
            node_name=node, bpf_root=root, registry=CollectorRegistry(), audit_interval=3600
        )
        bo = Backoff(base=0.05, cap=0.5)
        self.svc = Reflector(api, SERVICES, label_selector=SERVICE_SELECTOR, transform=compact_service,
                             store_objects=False, handlers=[self.mgr.service_handlers()], backoff=bo)  # fmt: skip
        self.eps = Reflector(api, ENDPOINTSLICES, label_selector=ENDPOINTSLICE_SELECTOR,
                             transform=compact_endpoint_slice, store_objects=False,
                             handlers=[self.mgr.endpointslice_handlers()], backoff=Backoff(base=0.05, cap=0.5))  # fmt: skip
        self.mgr.start(sources=[self.svc, self.eps])
        self.svc.start()
        self.eps.start()

    def stop(self) -> None:
        self.svc.stop()
        self.eps.stop()
        self.mgr.stop()


@pytest.fixture
def env(pin_root: str, tmp_path: Path) -> Iterator[tuple[APIServerThread, Any, str]]:
    sizes = loader.sizes_from_config(None)
    sizes.update({"CT_MAP_SIZE_TCP": 4096, "CT_MAP_SIZE_ANY": 4096, "NAT_MAP_SIZE": 4096})
    for fd in loader.open_pinned_maps(pin_root, sizes).values():
        os.close(fd)
    srv = APIServerThread(bookmark_interval=0.3)
    srv.start()
    api = new_api_client(kubeconfig=write_kubeconfig(tmp_path / "kc", srv.url))
    try:
        yield srv, api, pin_root
    finally:
        api.close()
        srv.stop()


def frontends(root: str) -> dict[tuple[str, int], tuple[int, list[str]]]:
    """(vip, port) -> (count, backend "ip:port" per slot)."""
    with PinnedMap(lbmap.SERVICES, root) as s, PinnedMap(lbmap.BACKENDS, root) as b:
        backends = {k.backend_id: f"{be32_to_ip(v.address)}:{be16_to_port(v.port)}" for k, v in b.items()}
        entries = {(be32_to_ip(k.address), be16_to_port(k.dport), k.backend_slot): v for k, v in s.items()}
    out: dict[tuple[str, int], tuple[int, list[str]]] = {}
    for (ip, port, slot), v in entries.items():
        if slot == 0:
            slots = [backends.get(entries[(ip, port, i)].backend_id, "?") for i in range(1, v.count + 1)]
            out[(ip, port)] = (v.count, slots)
    return out


def slice_body(name: str, svc: str, ips: list[str], port: int = 8080) -> Obj:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "n2"} for ip in ips],
    }


def test_service_lifecycle_reaches_the_maps(env: tuple[APIServerThread, Any, str]) -> None:
    srv, api, root = env
    ns = "default"
    svc = request_json(api, "POST", SERVICES.path(ns), body={
        "metadata": {"name": "web"}, "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80}]}})  # fmt: skip
    vip = svc["spec"]["clusterIP"]
    node_port = svc["spec"]["ports"][0]["nodePort"]
    request_json(
        api, "POST", ENDPOINTSLICES.path(ns), body=slice_body("web-1", "web", ["10.0.1.1", "10.0.1.2"])
    )
    # a headless service and one for another proxy are not ours
    request_json(api, "POST", SERVICES.path(ns), body={
        "metadata": {"name": "hl"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})  # fmt: skip
    request_json(api, "POST", SERVICES.path(ns), body={
        "metadata": {"name": "other", "labels": {"service.kubernetes.io/service-proxy-name": "x"}},
        "spec": {"ports": [{"port": 80}]}})  # fmt: skip

    agent = Agent(api, root)
    try:
        assert agent.mgr.flush(10)
        want = sorted(["10.0.1.1:8080", "10.0.1.2:8080"])
        assert wait_until(lambda: {k: (c, sorted(s)) for k, (c, s) in frontends(root).items()}
                          == {(vip, 80): (2, want), ("0.0.0.0", node_port): (2, want)})  # fmt: skip
        # scale: endpoint added
        request_json(api, "PUT", ENDPOINTSLICES.path(ns, "web-1"),
                     body=slice_body("web-1", "web", ["10.0.1.1", "10.0.1.2", "10.0.1.3"]))  # fmt: skip
        assert wait_until(lambda: frontends(root).get((vip, 80), (0, []))[0] == 3, 10)
        # service updated: a second port appears with its own frontend, no endpoints for it yet
        request_json(api, "PATCH", SERVICES.path(ns, "web"), content_type="application/merge-patch+json",
                     body={"spec": {"ports": [{"name": "http", "port": 80, "nodePort": node_port},
                                              {"name": "admin", "port": 81}]}})  # fmt: skip
        assert wait_until(lambda: frontends(root).get((vip, 81)) == (0, []))
        # watch cut: changes made meanwhile still arrive
        srv.cut_watches()
        request_json(api, "DELETE", ENDPOINTSLICES.path(ns, "web-1"))
        assert wait_until(lambda: frontends(root).get((vip, 80)) == (0, []), 5)
        # deleted: every entry goes
        request_json(api, "DELETE", SERVICES.path(ns, "web"))
        assert wait_until(lambda: frontends(root) == {})
        with PinnedMap(lbmap.BACKENDS, root) as b, PinnedMap(lbmap.REVERSE_NAT, root) as r:
            assert b.count() == 0 and r.count() == 0
        assert agent.mgr.audit() == 0
    finally:
        agent.stop()


def test_agent_restart_misses_a_delete_and_cleans_up_only_after_sync(
    env: tuple[APIServerThread, Any, str],
) -> None:
    srv, api, root = env
    ns = "default"
    vips = {}
    for name in ("keep", "drop"):
        s = request_json(api, "POST", SERVICES.path(ns), body={
            "metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80}]}})  # fmt: skip
        vips[name] = s["spec"]["clusterIP"]
        request_json(api, "POST", ENDPOINTSLICES.path(ns), body=slice_body(f"{name}-1", name, ["10.0.2.1"]))
    agent = Agent(api, root)
    assert agent.mgr.flush(10)
    assert wait_until(lambda: set(frontends(root)) == {(vips["keep"], 80), (vips["drop"], 80)})
    before = frontends(root)
    agent.stop()

    # While the agent is down, "drop" is deleted, and the API server is slow to answer.
    request_json(api, "DELETE", SERVICES.path(ns, "drop"))
    request_json(api, "DELETE", ENDPOINTSLICES.path(ns, "drop-1"))
    srv.set_delay(400)
    agent = Agent(api, root)
    try:
        time.sleep(0.2)
        assert frontends(root) == before  # nothing touched before the first full sync
        assert agent.mgr.flush(10)
        srv.set_delay(0)
        assert frontends(root) == {(vips["keep"], 80): before[(vips["keep"], 80)]}
    finally:
        srv.set_delay(0)
        agent.stop()
