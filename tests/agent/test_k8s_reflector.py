"""The reflector, client factory and CRD installer against the lab's embedded API server, with its
fault injection: 410 re-list diffing, cut watches, refused connections, bookmarks, delays."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycilium.agent.k8s import (
    AGENT_CRDS,
    SERVICE_SELECTOR,
    SERVICES,
    APIError,
    Backoff,
    ClientConfigError,
    Handlers,
    Reflector,
    install_crds,
    make_configuration,
    new_api_client,
    request_json,
    wait_for_sync,
)
from pycilium.agent.k8s.resources import CONFIGMAPS, CRDS
from pycilium.lab.apiserver import APIServerThread, write_kubeconfig

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[APIServerThread]:
    srv = APIServerThread(bookmark_interval=0.2, history_size=200)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def api(server: APIServerThread, tmp_path: Path) -> Iterator[Any]:
    server.clear_faults()
    kc = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    client = new_api_client(kubeconfig=kc)
    yield client
    server.clear_faults()
    client.close()


@pytest.fixture
def ns(api: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    name = (
        "t-"
        + request.node.name.lower().replace("_", "-")[:40].strip("-")
        + f"-{int(time.time() * 1000) % 100000}"
    )
    request_json(api, "POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    yield name
    request_json(api, "DELETE", f"/api/v1/namespaces/{name}")


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.objects: list[Obj] = []
        self.lock = threading.Lock()

    def handlers(self) -> Handlers:
        return Handlers(on_add=lambda o: self._rec("ADDED", o), on_update=lambda _a, o: self._rec("MODIFIED", o),
                        on_delete=lambda o: self._rec("DELETED", o))  # fmt: skip

    def _rec(self, kind: str, obj: Obj) -> None:
        with self.lock:
            self.events.append((kind, obj["metadata"]["name"]))
            self.objects.append(obj)

    def of(self, name: str) -> list[str]:
        with self.lock:
            return [k for k, n in self.events if n == name]


def cm(api: Any, ns: str, name: str, data: str = "1", labels: dict[str, str] | None = None) -> Obj:
    body: Obj = {"metadata": {"name": name, "labels": labels or {}}, "data": {"v": data}}
    return request_json(api, "POST", CONFIGMAPS.path(ns), body=body)


def reflector(api: Any, ns: str, rec: Recorder, **kw: Any) -> Reflector:
    kw.setdefault("backoff", Backoff(base=0.05, cap=0.5))
    kw.setdefault("watch_timeout", (20, 30))
    return Reflector(api, CONFIGMAPS, namespace=ns, handlers=[rec.handlers()], **kw)


# --- client factory ---------------------------------------------------------------------------------


def test_client_factory_sources(tmp_path: Path, server: APIServerThread) -> None:
    kc = write_kubeconfig(tmp_path / "kc", server.url)
    assert make_configuration(kubeconfig=kc).host == server.url
    # explicit host override wins over the kubeconfig
    assert make_configuration(kubeconfig=kc, k8s_service_host="10.0.0.1", k8s_service_port=6443).host == (
        "http://10.0.0.1:6443"
    )
    # host only (no kubeconfig, no service account): plain URL
    none = str(tmp_path / "no-token")
    assert make_configuration(k8s_service_host="127.0.0.1", k8s_service_port=8080, token_file=none).host == (
        "http://127.0.0.1:8080"
    )
    # in-cluster: token and CA from the service-account files, host/port override honoured
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sekrit")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    c = make_configuration(environ=env, token_file=str(token), cert_file=str(ca))
    assert c.host == "https://10.96.0.1:443" and c.ssl_ca_cert == str(ca)
    assert "sekrit" in str(c.api_key)
    c = make_configuration(environ=env, token_file=str(token), cert_file=str(ca), k8s_service_host="192.168.5.5",
                           k8s_service_port=6443)  # fmt: skip
    assert c.host == "https://192.168.5.5:6443"
    with pytest.raises(ClientConfigError):
        make_configuration(environ={}, token_file=none)
    with pytest.raises(ClientConfigError):
        make_configuration(kubeconfig=str(tmp_path / "missing"))
    # from an AgentConfig-like object
    from pycilium.agent.config import AgentConfig

    api = new_api_client(AgentConfig(kubeconfig=kc))
    assert request_json(api, "GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"
    with pytest.raises(APIError) as e:
        request_json(api, "GET", "/api/v1/namespaces/nope-nope")
    assert e.value.status == 404 and e.value.reason == "NotFound"
    api.close()


# --- reflector --------------------------------------------------------------------------------------


def test_paginated_list_sync_then_watch(api: Any, ns: str, server: APIServerThread) -> None:
    for i in range(12):
        cm(api, ns, f"c{i:02d}")
    rec = Recorder()
    r = reflector(api, ns, rec, page_size=5)
    r.start()
    try:
        assert r.wait_synced(5)
        assert sorted(n for k, n in rec.events) == [f"c{i:02d}" for i in range(12)]
        assert all(k == "ADDED" for k, _ in rec.events)
        assert r.stats.lists == 1 and len(r) == 12
        cm(api, ns, "late")
        request_json(api, "PATCH", CONFIGMAPS.path(ns, "c00"), body={"data": {"v": "2"}},
                     content_type="application/merge-patch+json")  # fmt: skip
        request_json(api, "DELETE", CONFIGMAPS.path(ns, "c01"))
        assert wait_until(lambda: rec.of("c01") == ["ADDED", "DELETED"])
        assert rec.of("late") == ["ADDED"] and rec.of("c00") == ["ADDED", "MODIFIED"]
        assert r.get(ns, "c00")["data"] == {"v": "2"}  # type: ignore[index]
        assert "managedFields" not in rec.objects[-1]["metadata"]
    finally:
        r.stop()


def test_relist_after_410_synthesizes_deletes_for_objects_removed_meanwhile(api: Any, ns: str,
                                                                           server: APIServerThread) -> None:  # fmt: skip
    for i in range(4):
        cm(api, ns, f"c{i}")
    rec = Recorder()
    r = reflector(api, ns, rec)
    r.start()
    try:
        assert r.wait_synced(5)
        # Watches go down and new connections are refused; meanwhile objects change and the watch
        # history is trimmed, so the re-watch from the old resourceVersion answers 410.
        server.refuse(1.0, mode="close")
        rt = server.call(lambda: server.server.registry.find("configmaps"))
        server.call(lambda: server.server.api.delete(rt, ns, "c1"))
        server.call(lambda: server.server.api.delete(rt, ns, "c2"))
        server.call(lambda: server.server.api.create(rt, ns, {"metadata": {"name": "c9"}, "data": {}}))
        server.trim_history("configmaps")
        assert wait_until(lambda: rec.of("c2") == ["ADDED", "DELETED"] and rec.of("c9") == ["ADDED"], 8)
        assert rec.of("c1") == ["ADDED", "DELETED"]
        assert rec.of("c0") == ["ADDED"] and rec.of("c3") == ["ADDED"]  # unchanged: no event on re-list
        assert r.stats.relists_410 >= 1 and r.stats.synthesized_deletes == 2 and r.stats.lists == 2
        assert r.stats.watch_errors >= 1  # the refused reconnects were backed off
        # and it watches again afterwards
        cm(api, ns, "after")
        assert wait_until(lambda: rec.of("after") == ["ADDED"])
    finally:
        r.stop()


def test_forced_410_relists(api: Any, ns: str, server: APIServerThread) -> None:
    cm(api, ns, "a")
    rec = Recorder()
    r = reflector(api, ns, rec)
    r.start()
    try:
        assert r.wait_synced(5)
        server.force_gone("configmaps")
        server.cut_watches(graceful=True)
        assert wait_until(lambda: r.stats.relists_410 == 1)
        cm(api, ns, "b")
        assert wait_until(lambda: rec.of("b") == ["ADDED"])
        assert rec.of("a") == ["ADDED"]
    finally:
        r.stop()


def test_watch_cut_reconnects_with_backoff_and_keeps_the_cache(
    api: Any, ns: str, server: APIServerThread
) -> None:
    cm(api, ns, "a")
    rec = Recorder()
    r = reflector(api, ns, rec, backoff=Backoff(base=0.1, cap=2.0))
    r.start()
    try:
        assert r.wait_synced(5)
        assert wait_until(lambda: server.active_watches >= 1)
        server.cut_watches(graceful=False)
        assert wait_until(lambda: r.stats.watch_errors == 1)
        cm(api, ns, "b")  # written while the reflector backs off: delivered by the re-watch
        assert wait_until(lambda: rec.of("b") == ["ADDED"])
        assert r.stats.relists_410 == 0 and r.stats.lists == 1 and len(r) == 2
        # Refused connections for a while: backoff grows, nothing is deleted, it recovers.
        server.refuse(1.5, mode="close")
        refused_until = time.monotonic() + 1.6
        assert wait_until(lambda: r.stats.watch_errors >= 3, 5)
        waits = r.stats.backoff_waits
        assert len(waits) >= 3 and max(waits[1:]) > min(waits)
        assert all(w <= 2.0 for w in waits)
        assert not any(k == "DELETED" for k, _ in rec.events) and len(r) == 2
        time.sleep(max(0.0, refused_until - time.monotonic()))
        cm(api, ns, "c")
        assert wait_until(lambda: rec.of("c") == ["ADDED"], 8)
    finally:
        r.stop()


def test_bookmarks_advance_the_resource_version(api: Any, ns: str, server: APIServerThread) -> None:
    rec = Recorder()
    r = reflector(api, ns, rec)
    r.start()
    try:
        assert r.wait_synced(5)
        rv0 = int(r.resource_version)
        other = cm(api, "default", f"other-{ns}")  # moves the global resourceVersion, not this watch
        assert wait_until(lambda: int(r.resource_version) >= int(other["metadata"]["resourceVersion"]), 3)
        assert r.stats.bookmarks >= 1 and int(r.resource_version) > rv0 and rec.events == []
        request_json(api, "DELETE", CONFIGMAPS.path("default", f"other-{ns}"))
    finally:
        r.stop()


def test_watch_timeout_reopens_without_relisting(api: Any, ns: str, server: APIServerThread) -> None:
    rec = Recorder()
    r = reflector(api, ns, rec, watch_timeout=(1, 1))
    r.start()
    try:
        assert r.wait_synced(5)
        assert wait_until(lambda: r.stats.watches >= 3, 5)
        cm(api, ns, "x")
        assert wait_until(lambda: rec.of("x") == ["ADDED"])
        assert r.stats.lists == 1 and r.stats.watch_errors == 0
    finally:
        r.stop()


def test_delayed_responses_and_stop_interrupts_a_blocked_watch(
    api: Any, ns: str, server: APIServerThread
) -> None:
    cm(api, ns, "a")
    server.set_delay(300)
    rec = Recorder()
    r = reflector(api, ns, rec)
    t0 = time.monotonic()
    r.start()
    try:
        assert r.wait_synced(5)
        assert time.monotonic() - t0 >= 0.3
        cm(api, ns, "b")
        assert wait_until(lambda: rec.of("b") == ["ADDED"], 5)
    finally:
        server.set_delay(0)
        thread = r._thread
        r.stop(timeout=30)  # the watch's own timeout is far longer: stop must end it itself
        assert thread is not None and not thread.is_alive()


def test_bad_objects_are_isolated_in_handlers(api: Any, ns: str, caplog: Any) -> None:
    for n in ("good1", "bad", "good2"):
        cm(api, ns, n)
    seen: list[str] = []

    def on_add(o: Obj) -> None:
        if o["metadata"]["name"] == "bad":
            raise ValueError("boom")
        seen.append(o["metadata"]["name"])

    r = Reflector(api, CONFIGMAPS, namespace=ns, handlers=[Handlers(on_add=on_add)])
    r.start()
    try:
        assert r.wait_synced(5)
        assert wait_until(lambda: sorted(seen) == ["good1", "good2"])
        assert r.stats.handler_errors == 1
        assert any(f"ConfigMap {ns}/bad" in rec.getMessage() for rec in caplog.records)
        cm(api, ns, "good3")
        assert wait_until(lambda: "good3" in seen)
    finally:
        r.stop()


def test_service_label_selector_like_kube_proxy(api: Any, ns: str) -> None:
    def mk(name: str, labels: dict[str, str]) -> None:
        request_json(api, "POST", SERVICES.path(ns), body={"metadata": {"name": name, "labels": labels},
                                                           "spec": {"ports": [{"port": 80}]}})  # fmt: skip

    mk("mine", {})
    mk("other-proxy", {"service.kubernetes.io/service-proxy-name": "someone-else"})
    rec = Recorder()
    r = Reflector(api, SERVICES, namespace=ns, label_selector=SERVICE_SELECTOR, handlers=[rec.handlers()],
                  store_objects=False)  # fmt: skip
    r.start()
    try:
        assert wait_for_sync([r], 5)
        assert rec.events == [("ADDED", "mine")]
        assert r.get(ns, "mine") is None and r.keys() == [(ns, "mine")]  # only versions are kept
        # label added later: the watch turns it into a delete
        request_json(api, "PATCH", SERVICES.path(ns, "mine"),
                     body={"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "x"}}},
                     content_type="application/merge-patch+json")  # fmt: skip
        assert wait_until(lambda: rec.of("mine") == ["ADDED", "DELETED"])
    finally:
        r.stop()


# --- CRDs -------------------------------------------------------------------------------------------


def test_crd_installer_creates_updates_and_is_idempotent(api: Any) -> None:
    changed = install_crds(api)
    names = [c["metadata"]["name"] for c in AGENT_CRDS]
    assert set(changed) <= set(names)
    assert install_crds(api) == []
    # someone edited the definition: the agent puts its own back
    cur = request_json(api, "GET", CRDS.path(name="pyciliumidentities.pycilium.io"))
    cur["spec"]["names"]["shortNames"] = ["zzz"]
    request_json(api, "PUT", CRDS.path(name="pyciliumidentities.pycilium.io"), body=cur)
    assert install_crds(api) == ["pyciliumidentities.pycilium.io"]
    cur = request_json(api, "GET", CRDS.path(name="pyciliumidentities.pycilium.io"))
    assert cur["spec"]["names"]["shortNames"] == ["pcid"]
    # and the resources are served
    body = {"apiVersion": "pycilium.io/v1", "kind": "PyCiliumIdentity", "metadata": {"name": "70001"},
            "security-labels": {"k8s:app": "web"}}  # fmt: skip
    request_json(api, "POST", "/apis/pycilium.io/v1/pyciliumidentities", body=body)
    got = request_json(api, "GET", "/apis/pycilium.io/v1/pyciliumidentities/70001")
    assert got["security-labels"] == {"k8s:app": "web"}
    request_json(api, "DELETE", "/apis/pycilium.io/v1/pyciliumidentities/70001")
    pol = {"apiVersion": "pycilium.io/v1", "kind": "PyCiliumNetworkPolicy", "metadata": {"name": "p"},
           "spec": {"endpointSelector": {}}}  # fmt: skip
    request_json(api, "POST", "/apis/pycilium.io/v1/namespaces/default/pyciliumnetworkpolicies", body=pol)
    request_json(api, "DELETE", "/apis/pycilium.io/v1/namespaces/default/pyciliumnetworkpolicies/p")


def test_crds_match_the_helm_chart() -> None:
    crd_dir = REPO / "deploy" / "helm" / "pycilium" / "crds"
    files = sorted(crd_dir.glob("*.yaml"))
    assert files, f"no CRDs in {crd_dir}"
    chart = {}
    for f in files:
        doc = yaml.safe_load(f.read_text())
        chart[doc["metadata"]["name"]] = doc
    ours = {c["metadata"]["name"]: c for c in AGENT_CRDS}
    assert set(ours) <= set(chart)
    for name, crd in ours.items():
        assert crd["spec"] == chart[name]["spec"], name
