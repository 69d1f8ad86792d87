"""Host-scope IPAM: reservations, persistence, exhaustion, GC, concurrency."""

from __future__ import annotations

import ipaddress
import json
import threading
from pathlib import Path

import pytest
from pycilium.agent.ipam import (
    ROUTER_OWNER,
    HostScopeIPAM,
    IPAMConflictError,
    IPAMError,
    IPAMExhaustedError,
    IPAMNotReadyError,
    owner_key,
)
from pycilium.cni import protocol as p


def test_reserves_network_broadcast_and_router(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/24")
    assert ipam.router_ip() == "10.0.1.1" and ipam.owner_of("10.0.1.1") == ROUTER_OWNER
    assert str(ipam.status()) == "IPv4: 1/254 allocated from 10.0.1.0/24"
    assert ipam.allocate("a/eth0", "default/a") == "10.0.1.2"
    assert ipam.allocate("b/eth0") == "10.0.1.3"
    assert str(ipam.status()) == "IPv4: 3/254 allocated from 10.0.1.0/24"
    assert ipam.status().to_dict() == {"cidr": "10.0.1.0/24", "allocated": 3, "total": 254, "free": 251}
    with pytest.raises(IPAMError):
        ipam.release(ROUTER_OWNER)


def test_allocation_is_idempotent_per_owner_and_release_is_idempotent(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/24")
    ip = ipam.allocate(owner_key("c1", "eth0"))
    assert ipam.allocate("c1/eth0") == ip and ipam.lookup("c1/eth0") == ip
    assert ipam.release("c1/eth0") == ip
    assert ipam.release("c1/eth0") is None
    assert ipam.lookup("c1/eth0") is None


def test_released_addresses_are_not_reused_at_once(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/29")  # .1 router, .2-.6 usable
    first = ipam.allocate("a")
    ipam.release("a")
    got = [ipam.allocate(o) for o in "bcde"]
    assert first not in got
    assert ipam.allocate("f") == first  # wraps around only when everything else is taken


def test_persistence_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ipam.json"
    ipam = HostScopeIPAM(path, "10.0.1.0/24")
    a, b = ipam.allocate("a", "ns/a"), ipam.allocate("b")
    ipam.release("b")
    raw = json.loads(path.read_text())
    assert raw["cidr"] == "10.0.1.0/24" and set(raw["allocations"]) == {"10.0.1.1", a}
    again = HostScopeIPAM(path)  # no cidr argument: comes from the file
    assert again.pod_cidr == "10.0.1.0/24" and again.lookup("a") == a
    assert again.allocations()[1].pod == "ns/a"
    c = again.allocate("c")
    assert c not in (a, b)  # neither the held address nor the one released just before the restart
    assert HostScopeIPAM(path, "10.0.1.0/24").lookup("c") == c
    assert not [x for x in path.parent.iterdir() if x.name.startswith(".tmp")]


def test_exhaustion_message(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/29")
    for i in range(5):
        ipam.allocate(f"pod{i}")
    with pytest.raises(IPAMExhaustedError) as ei:
        ipam.allocate("one-too-many")
    assert str(ei.value) == "IPAM: range 10.0.1.0/29 is full (6/6 allocated)"
    assert ei.value.cni_code == p.ERR_IPAM_EXHAUSTED >= 100
    assert ipam.is_full() and ipam.status().free == 0
    full24 = HostScopeIPAM(tmp_path / "b.json", "10.0.2.0/24")
    for i in range(253):
        full24.allocate(f"p{i}")
    with pytest.raises(
        IPAMExhaustedError, match=r"^IPAM: range 10\.0\.2\.0/24 is full \(254/254 allocated\)$"
    ):
        full24.allocate("x")


def test_no_pod_cidr_yet_then_set_later(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json")
    assert str(ipam.status()) == "IPv4: no PodCIDR assigned yet"
    with pytest.raises(IPAMNotReadyError) as ei:
        ipam.allocate("a")
    assert ei.value.cni_code == p.ERR_TRY_AGAIN_LATER
    ipam.set_pod_cidr("10.0.3.0/24")  # e.g. from Node.spec.podCIDR
    assert ipam.allocate("a") == "10.0.3.2"
    ipam.set_pod_cidr("10.0.3.0/24")  # same again: no change
    assert ipam.lookup("a") == "10.0.3.2"
    with pytest.raises(ValueError):
        ipam.set_pod_cidr("10.0.3.1/24")
    with pytest.raises(IPAMError):
        ipam.set_pod_cidr("10.0.3.0/31")


def test_changed_pod_cidr_keeps_existing_allocations(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.4.0/24")
    old = ipam.allocate("a")
    ipam.set_pod_cidr("10.0.5.0/24")
    assert ipam.lookup("a") == old and ipam.router_ip() == "10.0.5.1"
    assert ipaddress.IPv4Address(ipam.allocate("b")) in ipaddress.IPv4Network("10.0.5.0/24")
    assert str(ipam.status()) == "IPv4: 2/254 allocated from 10.0.5.0/24"


def test_gc_and_claim(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/24")
    a, b = ipam.allocate("a"), ipam.allocate("b")
    released = ipam.gc({"a"})
    assert [x.ip for x in released] == [b] and ipam.lookup("a") == a and ipam.router_ip() == "10.0.1.1"
    assert ipam.owner_of("10.0.1.1") == ROUTER_OWNER
    ipam.claim("10.0.1.50", "z")
    ipam.claim("10.0.1.50", "z")  # idempotent
    with pytest.raises(IPAMConflictError):
        ipam.claim("10.0.1.50", "other")
    with pytest.raises(IPAMConflictError):
        ipam.claim("10.0.1.51", "z")
    assert ipam.release_ip("10.0.1.50") == "z" and ipam.lookup("z") is None


def test_corrupt_state_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    path.write_text("{truncated")
    with pytest.raises(IPAMError, match="unreadable"):
        HostScopeIPAM(path, "10.0.1.0/24")


def test_concurrent_allocations_are_distinct(tmp_path: Path) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/24")
    got: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(5):
            ip = ipam.allocate(f"w{i}-{j}")
            with lock:
                got.append(ip)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 100 == len(set(got))
    assert HostScopeIPAM(tmp_path / "ipam.json").status().allocated == 101


def test_every_returned_address_is_on_disk_when_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: whatever thread wrote the file, an address is returned only once the file has it."""
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/24")
    real_write = p.atomic_write_json
    writes: list[int] = []

    def slow_write(path: Path, obj: object, **kw: object) -> None:
        writes.append(len(obj["allocations"]))  # type: ignore[index]
        threading.Event().wait(0.01)  # an fsync's worth: lets other threads queue up behind it
        real_write(path, obj, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(p, "atomic_write_json", slow_write)
    problems: list[str] = []

    def worker(i: int) -> None:
        for j in range(3):
            ip = ipam.allocate(f"g{i}-{j}")
            on_disk = json.loads((tmp_path / "ipam.json").read_text())["allocations"]
            if on_disk.get(ip, {}).get("owner") != f"g{i}-{j}":
                problems.append(f"{ip} returned before it was written")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems
    assert HostScopeIPAM(tmp_path / "ipam.json").status().allocated == 31
    assert len(writes) <= 31  # never more writes than changes (usually far fewer)


def test_a_failed_write_rolls_the_change_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ipam = HostScopeIPAM(tmp_path / "ipam.json", "10.0.1.0/24")
    kept = ipam.allocate("keep/eth0")

    def full_disk(*_a: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    real_write = p.atomic_write_json
    monkeypatch.setattr(p, "atomic_write_json", full_disk)
    with pytest.raises(OSError):
        ipam.allocate("new/eth0")
    assert ipam.lookup("new/eth0") is None
    with pytest.raises(OSError):
        ipam.release("keep/eth0")
    assert ipam.lookup("keep/eth0") == kept  # still allocated, as the file says
    monkeypatch.setattr(p, "atomic_write_json", real_write)
    assert ipam.release("keep/eth0") == kept
    assert HostScopeIPAM(tmp_path / "ipam.json").lookup("keep/eth0") is None
