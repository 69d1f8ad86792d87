"""Pure pieces of the lab API server: selectors, patches, allocators, store history, protobuf bodies,
the Scale view's selector string."""

from __future__ import annotations

import pytest
from pycilium.lab.apiserver.allocators import AllocationError, ClusterIPAllocator, NodePortAllocator
from pycilium.lab.apiserver.errors import APIError
from pycilium.lab.apiserver.patch import json_patch, merge_patch, strategic_merge_patch
from pycilium.lab.apiserver.protobuf import DecodeError, decode
from pycilium.lab.apiserver.selectors import parse_field_selector, parse_label_selector
from pycilium.lab.apiserver.store import RV_RESTART_GAP, Expired, Store
from pycilium.lab.apiserver.subresources import selector_string

LABELS = {"app": "web", "tier": "fe", "n": "5"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app = web", True),
        ("app=db", False),
        ("app!=db", True),
        ("missing!=x", True),
        ("app in (db, web)", True),
        ("app notin (db,web)", False),
        ("missing notin (x)", True),
        ("tier", True),
        ("!tier", False),
        ("!missing", True),
        ("app=web,tier in (fe),!missing", True),
        ("app=web,tier=be", False),
        ("n>4", True),
        ("n<5", False),
        ("example.com/role", False),
    ],
)
def test_label_selector(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


@pytest.mark.parametrize("bad", ["app in (a", "a=b,,c=d", "=x", "bad key=1", "n>x"])
def test_label_selector_errors(bad: str) -> None:
    with pytest.raises(APIError) as ei:
        parse_label_selector(bad)
    assert ei.value.code == 400


def test_field_selector() -> None:
    obj = {"metadata": {"name": "a,b", "namespace": "ns"}, "spec": {"nodeName": "n1", "unschedulable": True}}
    assert parse_field_selector(r"metadata.name=a\,b,metadata.namespace==ns").matches(obj)
    assert parse_field_selector("spec.nodeName!=n2").matches(obj)
    assert not parse_field_selector("spec.nodeName!=n1").matches(obj)
    assert parse_field_selector("spec.unschedulable=true").matches(obj)
    assert parse_field_selector("status.phase=").matches(obj)  # missing compares as ""
    assert parse_field_selector("metadata.namespace=ns").value_of("metadata.namespace") == "ns"
    with pytest.raises(APIError):
        parse_field_selector("no-operator")


def test_merge_and_json_patch() -> None:
    doc = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert merge_patch(doc, {"a": {"b": None, "c": [3]}, "e": 1}) == {"a": {"c": [3]}, "d": "x", "e": 1}
    assert doc == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}  # not mutated
    out = json_patch(
        doc,
        [
            {"op": "add", "path": "/a/c/-", "value": 9},
            {"op": "add", "path": "/a/c/0", "value": 0},
            {"op": "replace", "path": "/d", "value": "y"},
            {"op": "move", "from": "/a/b", "path": "/b"},
            {"op": "copy", "from": "/d", "path": "/a~1x"},
            {"op": "test", "path": "/b", "value": 1},
            {"op": "remove", "path": "/a/c/1"},
        ],
    )
    assert out == {"a": {"c": [0, 2, 9]}, "d": "y", "b": 1, "a/x": "y"}
    for bad in ([{"op": "remove", "path": "/nope"}], [{"op": "test", "path": "/d", "value": "z"}]):
        with pytest.raises(APIError) as ei:
            json_patch(doc, bad)
        assert ei.value.code == 422


def test_strategic_merge_patch() -> None:
    pod = {
        "metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
        "spec": {
            "containers": [
                {"name": "a", "image": "a:1", "ports": [{"containerPort": 80, "protocol": "TCP"}]},
                {"name": "b", "image": "b:1"},
            ],
            "tolerations": [{"key": "k"}],
        },
    }
    patch = {
        "metadata": {"finalizers": ["b"], "labels": {"x": None}},
        "spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [
                {"name": "a", "ports": [{"containerPort": 81}]},
                {"name": "c", "$patch": "delete"},
            ],
            "tolerations": [{"key": "other"}],
        },
    }
    out = strategic_merge_patch(pod, patch)
    assert out["metadata"] == {"finalizers": ["a", "b"], "labels": {}}
    assert [c["name"] for c in out["spec"]["containers"]] == ["b", "a"]
    a = out["spec"]["containers"][1]
    assert a["image"] == "a:1" and a["ports"] == [
        {"containerPort": 80, "protocol": "TCP"},
        {"containerPort": 81},
    ]
    assert out["spec"]["tolerations"] == [{"key": "other"}]  # no merge key: replaced
    out = strategic_merge_patch(out, {"spec": {"containers": [{"name": "b", "$patch": "delete"}]}})
    assert [c["name"] for c in out["spec"]["containers"]] == ["a"]
    out = strategic_merge_patch(out, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}})
    assert out["metadata"]["finalizers"] == ["b"]
    out = strategic_merge_patch(out, {"spec": {"$patch": "replace", "containers": []}})
    assert out["spec"] == {"containers": []}


def test_cluster_ip_allocator() -> None:
    alloc = ClusterIPAllocator("10.0.0.0/29")  # hosts .1-.6, .1 reserved for `kubernetes`
    got = [alloc.allocate() for _ in range(5)]
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(AllocationError, match="range is full"):
        alloc.allocate()
    assert alloc.allocate("10.0.0.1") == "10.0.0.1"
    alloc.release("10.0.0.4")
    assert alloc.allocate() == "10.0.0.4"
    for bad in ("10.0.0.3", "10.0.1.1", "10.0.0.7", "nonsense"):
        with pytest.raises(AllocationError):
            alloc.allocate(bad)


def test_node_port_allocator() -> None:
    alloc = NodePortAllocator(30000, 30002)
    assert [alloc.allocate(), alloc.allocate(30002)] == [30000, 30002]
    assert alloc.allocate() == 30001
    with pytest.raises(AllocationError, match="range is full"):
        alloc.allocate()
    with pytest.raises(AllocationError, match="already allocated"):
        alloc.allocate(30001)
    with pytest.raises(AllocationError, match="valid range"):
        alloc.allocate(8080)
    alloc.release(30001)
    assert alloc.allocate(30001) == 30001


def test_store_history_and_restart() -> None:
    store = Store(history_size=2)
    for i in range(3):
        store.put("/configmaps", {"metadata": {"name": f"c{i}", "namespace": "d"}})
    assert store.rv == 3
    assert [e.obj["metadata"]["name"] for e in store.events_since("/configmaps", 1)] == ["c1", "c2"]
    with pytest.raises(Expired):
        store.events_since("/configmaps", 0)  # event 1 was dropped from the ring
    with pytest.raises(Expired):
        store.events_since("/configmaps", 99)  # from the future
    gone = store.remove("/configmaps", "d", "c0")
    assert gone is not None and gone["metadata"]["resourceVersion"] == "4"
    restarted = Store()
    restarted.load(store.dump())
    assert restarted.rv == 4 + RV_RESTART_GAP
    assert [o["metadata"]["name"] for o in restarted.list_objects("/configmaps")] == ["c1", "c2"]
    with pytest.raises(Expired):
        restarted.events_since("/configmaps", 4)


def _pb(field: int, value: bytes) -> bytes:
    assert len(value) < 128
    return bytes([field << 3 | 2, len(value)]) + value


def test_protobuf_configmap_body() -> None:
    meta = _pb(1, b"cm") + _pb(2, b"") + _pb(3, b"ns") + _pb(11, _pb(1, b"k") + _pb(2, b"v"))
    raw = _pb(1, meta) + _pb(2, _pb(1, b"a") + _pb(2, b"1"))
    body = b"k8s\x00" + _pb(1, _pb(1, b"v1") + _pb(2, b"ConfigMap")) + _pb(2, raw)
    assert decode(body) == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cm", "namespace": "ns", "labels": {"k": "v"}},
        "data": {"a": "1"},
    }
    with pytest.raises(DecodeError):
        decode(b"k8s\x00" + _pb(1, _pb(1, b"apps/v1") + _pb(2, b"Deployment")))
    with pytest.raises(DecodeError):
        decode(b'{"json": true}')


def test_scale_selector_string_parses_back_to_the_same_selection() -> None:
    selector = {
        "matchLabels": {"tier": "fe", "app": "web"},
        "matchExpressions": [
            {"key": "n", "operator": "NotIn", "values": ["7", "6"]},
            {"key": "zone", "operator": "DoesNotExist"},
            {"key": "app", "operator": "Exists"},
            {"key": "tier", "operator": "In", "values": ["fe", "be"]},
        ],
    }
    text = selector_string(selector)
    assert text == "app=web,app,n notin (6,7),tier=fe,tier in (be,fe),!zone"
    parsed = parse_label_selector(text)
    assert parsed.matches(LABELS)
    assert not parsed.matches({**LABELS, "n": "6"}) and not parsed.matches({**LABELS, "zone": "a"})
    assert selector_string({}) == selector_string(None) == ""
