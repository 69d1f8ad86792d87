"""Identity allocation through a Kubernetes API (the embedded lab API server) with the official client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pycilium.agent.identity import allocator as allocmod
from pycilium.agent.identity.allocator import IdentityAllocator, probe_sequence
from pycilium.agent.identity.backend import (
    GROUP,
    PLURAL,
    SECURITY_LABELS,
    VERSION,
    AlreadyExistsError,
    BackendError,
    KubernetesIdentityBackend,
    identity_crd,
)
from pycilium.agent.identity.labels import MIN_GLOBAL_ID, labels_key, labels_to_map, pod_identity_labels

apiserver = pytest.importorskip("pycilium.lab.apiserver")

WEB = pod_identity_labels({"app": "web"}, "default")
DB = pod_identity_labels({"app": "db"}, "default")


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    srv = apiserver.APIServerThread()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: Any) -> Iterator[Any]:
    """A fresh ApiClient with the CRD registered and no identities."""
    from kubernetes import client, config

    api_client = config.new_client_from_config_dict(apiserver.kubeconfig_dict(server.url))
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(identity_crd())  # type: ignore[arg-type]
    except client.ApiException as e:
        if e.status != 409:
            raise
    co = client.CustomObjectsApi(api_client)
    listed: dict[str, Any] = co.list_cluster_custom_object(GROUP, VERSION, PLURAL)  # type: ignore[assignment]
    for o in listed["items"]:
        co.delete_cluster_custom_object(GROUP, VERSION, PLURAL, o["metadata"]["name"])
    yield api_client
    api_client.close()


def test_backend_roundtrip_and_conflict(api: Any) -> None:
    be = KubernetesIdentityBackend(api)
    obj = be.create(300, labels_to_map(WEB))
    assert obj["metadata"]["name"] == "300" and obj[SECURITY_LABELS] == labels_to_map(WEB)
    assert obj["metadata"]["labels"] == {"io.kubernetes.pod.namespace": "default"}
    with pytest.raises(AlreadyExistsError):
        be.create(300, labels_to_map(DB))
    got = be.get(300)
    assert got is not None and got[SECURITY_LABELS] == labels_to_map(WEB)
    assert be.get(301) is None
    assert [o["metadata"]["name"] for o in be.list()] == ["300"]
    # deletion carries preconditions: a stale resourceVersion does not delete
    assert not be.delete(300, got["metadata"]["uid"], "1")
    assert be.delete(300, got["metadata"]["uid"], got["metadata"]["resourceVersion"])
    assert not be.delete(300, got["metadata"]["uid"], got["metadata"]["resourceVersion"])  # gone


def test_two_agents_agree(api: Any) -> None:
    a = IdentityAllocator(KubernetesIdentityBackend(api))
    b = IdentityAllocator(KubernetesIdentityBackend(api))
    b.mark_synced()  # empty cache: must go through create -> 409 -> get
    ia = a.allocate(WEB)
    assert b.allocate(WEB) == ia
    idb = b.allocate(DB)
    assert idb != ia and a.allocate(DB) == idb
    c = IdentityAllocator(KubernetesIdentityBackend(api))
    c.resync()
    assert c.all()[ia] == WEB and c.lookup_labels(DB) == idb


def test_conflict_probes_next(api: Any) -> None:
    be = KubernetesIdentityBackend(api)
    first, second = list(probe_sequence(WEB, 2))
    be.create(first, labels_to_map(DB))
    a = IdentityAllocator(be)
    a.mark_synced()
    assert a.allocate(WEB) == second
    b = IdentityAllocator(KubernetesIdentityBackend(api))
    b.mark_synced()
    assert b.allocate(WEB) == second


def test_concurrent_allocation_distinct_ids(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocmod, "_probe_start", lambda key: MIN_GLOBAL_ID)  # all sets collide
    sets = [pod_identity_labels({"app": f"s{i}"}, "default") for i in range(8)]
    out: list[dict[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def agent(k: int) -> None:
        try:
            alloc = IdentityAllocator(KubernetesIdentityBackend(api))
            alloc.mark_synced()
            got = {labels_key(ls): alloc.allocate(ls) for ls in sets[k:] + sets[:k]}
            with lock:
                out.append(got)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(out) == 3
    assert out[0] == out[1] == out[2]
    assert len(set(out[0].values())) == len(sets)
    names = {o["metadata"]["name"] for o in KubernetesIdentityBackend(api).list()}
    assert names == {str(i) for i in out[0].values()}


def test_gc_deletes_unused_after_grace(api: Any) -> None:
    t = [0.0]
    a = IdentityAllocator(KubernetesIdentityBackend(api), clock=lambda: t[0])
    iw = a.allocate(WEB)
    idb = a.allocate(DB)
    a.release(DB)
    assert a.gc({labels_key(WEB)}, grace=5) == []
    t[0] = 6
    assert a.gc({labels_key(WEB)}, grace=5) == [idb]
    be = KubernetesIdentityBackend(api)
    assert be.get(idb) is None and be.get(iw) is not None


def test_backend_unreachable() -> None:
    from kubernetes import config

    api_client = config.new_client_from_config_dict(apiserver.kubeconfig_dict("http://127.0.0.1:9"))
    be = KubernetesIdentityBackend(api_client, request_timeout=2)
    with pytest.raises(BackendError):
        be.create(300, {"k8s:a": "b"})
    with pytest.raises(BackendError):
        be.list()
