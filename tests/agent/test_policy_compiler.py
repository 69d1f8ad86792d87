"""NetworkPolicy semantics end to end through the control plane, checked on the written datapath
state (in-memory policy map + endpoint flags, evaluated the way the BPF lookup does)."""

from __future__ import annotations

import ipaddress
import logging
import random
from typing import Any

import pytest
from pycilium.agent.identity.backend import MemoryIdentityBackend
from pycilium.agent.identity.labels import ID_HOST, ID_WORLD, LOCAL_ID_FLAG
from pycilium.agent.ipcache.datapath import MemoryIPCacheDatapath
from pycilium.agent.policy.compiler import PolicyMapKey
from pycilium.agent.policy.controlplane import PolicyControlPlane
from pycilium.agent.policy.datapath import EP_F_POLICY_EGRESS, EP_F_POLICY_INGRESS, MemoryPolicyDatapath
from pycilium.agent.policy.k8s import parse_network_policy
from pycilium.agent.policy.ports import prefix_range, range_to_prefixes

NODE = "node-a"
TCP, UDP = 6, 17


def pod_obj(
    ns: str,
    name: str,
    labels: dict[str, str] | None = None,
    ip: str | None = None,
    node: str = NODE,
    ports: list[tuple[str, int, str]] | None = None,
    host_network: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": f"uid-{ns}-{name}", "labels": labels or {}},
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [
                {
                    "name": "c",
                    "ports": [{"name": n, "containerPort": p, "protocol": pr} for n, p, pr in ports or []],
                }
            ],
        },
        "status": {"podIP": ip, "hostIP": "192.168.0.1", "phase": "Running"},
    }


def ns_obj(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}}


def np_obj(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "uid": f"np-{ns}-{name}"}, "spec": spec}


class World:
    """One node's control plane with in-memory backends; pods on NODE become local endpoints."""

    def __init__(self, mode: str = "default", synced: bool = True) -> None:
        self.backend = MemoryIdentityBackend()
        self.dp = MemoryPolicyDatapath()
        self.ipc = MemoryIPCacheDatapath()
        self.cp = PolicyControlPlane(
            node_name=NODE,
            identity_backend=self.backend,
            policy_datapath=self.dp,
            ipcache_datapath=self.ipc,
            mode=mode,  # type: ignore[arg-type]
        )
        self._next_ip = 10
        self._next_ep = 100
        self.eps: dict[str, tuple[int, str]] = {}  # ns/name -> (ep_id, ip)
        for n in ("default", "other", "prod", "dev"):
            self.cp.upsert_namespace(ns_obj(n, {"team": n}))
        if synced:
            self.cp.mark_synced()

    def pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str] | None = None,
        node: str = NODE,
        ports: list[tuple[str, int, str]] | None = None,
    ) -> str:
        key = f"{ns}/{name}"
        if key in self.eps:
            ip = self.eps[key][1]
        else:
            self._next_ip += 1
            ip = f"10.200.{0 if node == NODE else 1}.{self._next_ip}"
        self.cp.upsert_pod(pod_obj(ns, name, labels, ip, node, ports))
        if node == NODE and key not in self.eps:
            self._next_ep += 1
            self.eps[key] = (self._next_ep, ip)
            self.dp.add_endpoint(ip)
            self.cp.endpoint_added(self._next_ep, ip, ns, name)
        elif node != NODE:
            self.eps.setdefault(key, (0, ip))
        return ip

    def policy(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        self.cp.upsert_policy(np_obj(ns, name, spec))

    def ident(self, key: str) -> int:
        ns, name = key.split("/")
        p = self.cp.pods.get(ns, name)
        assert p is not None and p.identity is not None
        return p.identity

    def ip_identity(self, ip: str) -> int:
        """What the datapath's ipcache lookup yields (longest prefix; world if nothing matches)."""
        addr = ipaddress.IPv4Address(ip)
        best: tuple[int, int] | None = None
        for prefix, e in self.ipc.entries.items():
            if addr in prefix and (best is None or prefix.prefixlen > best[0]):
                best = (prefix.prefixlen, e.identity)
        return best[1] if best else ID_WORLD

    def dp_allows(self, key: str, egress: bool, remote: int, proto: int, port: int) -> bool:
        """The BPF decision for a new connection at local endpoint `key`."""
        ep_id, ip = self.eps[key]
        _, flags = self.dp.endpoint_entries[ip]
        if not flags & (EP_F_POLICY_EGRESS if egress else EP_F_POLICY_INGRESS):
            return True
        for k in self.dp.entries.get(ep_id, ()):
            if k.egress == egress and k.identity in (remote, 0) and k.covers(proto, port):
                return True
        return False

    def can(self, src: str, dst: str, port: int = 80, proto: int = TCP) -> bool:
        """src / dst: ns/name of pods, or an IP (outside the cluster)."""
        s_id = self.ident(src) if "/" in src else self.ip_identity(src)
        d_id = self.ident(dst) if "/" in dst else self.ip_identity(dst)
        ok = True
        if "/" in src and self.eps[src][0]:
            ok &= self.dp_allows(src, True, d_id, proto, port)
        if "/" in dst and self.eps[dst][0]:
            ok &= self.dp_allows(dst, False, s_id, proto, port)
        return ok

    def flags(self, key: str) -> int:
        return self.dp.endpoint_entries[self.eps[key][1]][1]


@pytest.fixture
def w() -> World:
    return World()


# ---- ports ---------------------------------------------------------------------------------------


def _covered(blocks: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for port, plen in blocks:
        lo, hi = prefix_range(port, plen)
        assert lo == port, "blocks must be aligned"
        out |= set(range(lo, hi + 1))
    return out


@pytest.mark.parametrize(
    "first,last",
    [(80, 80), (0, 65535), (1, 65535), (1000, 2000), (8000, 8063), (32768, 60999), (65535, 65535)],
)
def test_port_range_prefixes_cover_exactly(first: int, last: int) -> None:
    blocks = range_to_prefixes(first, last)
    assert _covered(blocks) == set(range(first, last + 1))
    # minimal: no two blocks can merge, and at most 2*16 blocks
    assert len(blocks) <= 32
    assert sum(1 << (16 - plen) for _, plen in blocks) == last - first + 1


def test_port_range_prefixes_random() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        a = rnd.randrange(1, 65536)
        b = rnd.randrange(a, min(65536, a + rnd.choice([1, 10, 300, 5000, 65535])))
        blocks = range_to_prefixes(a, b)
        cov = _covered(blocks)
        assert min(cov) == a and max(cov) == b and len(cov) == b - a + 1


def test_endport_range_in_datapath_exact(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    w.policy("default", "range", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"ports": [{"protocol": "TCP", "port": 1000, "endPort": 2000}]}],
    })  # fmt: skip
    allowed = {p for p in range(0, 65536) if w.can("default/cli", "default/srv", p)}
    assert allowed == set(range(1000, 2001))
    assert not w.can("default/cli", "default/srv", 1500, UDP)
    keys = [k for k in w.dp.entries[w.eps["default/srv"][0]] if k.identity == 0]
    assert {(k.port, k.port_prefix) for k in keys} == set(range_to_prefixes(1000, 2000))
    assert all(k.prefixlen == 64 + k.port_prefix for k in keys)


# ---- parsing -------------------------------------------------------------------------------------


def test_policy_types_defaults() -> None:
    p, errs = parse_network_policy(np_obj("default", "a", {"podSelector": {}, "ingress": [{}]}))
    assert p is not None and not errs and p.ingress is not None and p.egress is None
    p, _ = parse_network_policy(np_obj("default", "a", {"podSelector": {}, "egress": [{}]}))
    assert p is not None and p.ingress == () and p.egress is not None and len(p.egress) == 1
    p, _ = parse_network_policy(np_obj("default", "a", {"podSelector": {}, "egress": []}))
    assert p is not None and p.ingress == () and p.egress is None  # empty egress list: Ingress only
    p, _ = parse_network_policy(
        np_obj("default", "a", {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]})
    )
    assert p is not None and p.ingress is None and p.egress == ()


def test_parse_errors_name_fields() -> None:
    p, errs = parse_network_policy(np_obj("default", "bad", {
        "podSelector": {},
        "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]},
            {"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}}]},
            {"ports": [{"protocol": "ICMP", "port": 1}]},
            {"ports": [{"protocol": "SCTP", "port": 1}]},
            {"ports": [{"port": 80, "endPort": 70}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]},
            {"ports": [{"port": "http", "endPort": 90}]},
        ],
    }))  # fmt: skip
    assert p is not None and p.ingress == ()  # every rule was invalid: nothing allowed
    text = "\n".join(errs)
    for field in (
        "spec.ingress[0].from[0].ipBlock.cidr",
        "spec.ingress[1].from[0].podSelector.matchExpressions[0].operator",
        "spec.ingress[2].ports[0].protocol",
        "spec.ingress[3].ports[0].protocol: SCTP",
        "spec.ingress[4].ports[0].endPort",
        "spec.ingress[5].from[0].ipBlock.except[0]",
        "spec.ingress[6].ports[0].endPort",
    ):
        assert field in text, field
    p, errs = parse_network_policy(
        np_obj("default", "bad", {"podSelector": {"matchExpressions": [{"key": "a"}]}})
    )
    assert p is None and "spec.podSelector.matchExpressions[0].operator" in errs[0]


# ---- enforcement and default deny -----------------------------------------------------------------


def test_no_policy_allows_everything(w: World) -> None:
    w.pod("default", "a", {"app": "a"})
    w.pod("default", "b", {"app": "b"})
    assert w.can("default/a", "default/b") and w.can("8.8.8.8", "default/a") and w.can("default/a", "1.1.1.1")
    assert w.flags("default/a") == 0 and not w.dp.entries


def test_default_deny_ingress_selected_only(w: World) -> None:
    w.pod("default", "a", {"app": "a"})
    w.pod("default", "b", {"app": "b"})
    w.pod("other", "c", {"app": "a"})
    w.policy("default", "deny", {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"]})
    assert not w.can("default/b", "default/a")
    assert w.can("default/a", "default/b")  # egress not affected, b not selected
    assert w.can("default/a", "other/c")  # same labels, other namespace: not selected
    assert w.flags("default/a") == EP_F_POLICY_INGRESS and w.flags("default/b") == 0
    # the host may always reach a pod whose ingress is enforced
    assert w.dp_allows("default/a", False, ID_HOST, TCP, 8080)
    assert w.dp.entries[w.eps["default/a"][0]] == {PolicyMapKey(False, ID_HOST)}


def test_absent_vs_empty_vs_allow_all(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    sel = {"matchLabels": {"app": "srv"}}
    w.policy("default", "p", {"podSelector": sel, "policyTypes": ["Ingress"]})  # absent: deny
    assert not w.can("default/cli", "default/srv")
    w.policy("default", "p", {"podSelector": sel, "ingress": []})  # empty list: deny
    assert not w.can("default/cli", "default/srv")
    w.policy("default", "p", {"podSelector": sel, "ingress": [{}]})  # [{}]: allow all
    assert w.can("default/cli", "default/srv", 1) and w.can("9.9.9.9", "default/srv", 443, UDP)
    w.policy("default", "p", {"podSelector": sel, "ingress": [{"from": [], "ports": []}]})  # empty lists: all
    assert w.can("default/cli", "default/srv", 1234)
    assert w.flags("default/srv") == EP_F_POLICY_INGRESS


def test_egress_policy_types(w: World) -> None:
    w.pod("default", "a", {"app": "a"})
    w.pod("default", "b", {"app": "b"})
    w.policy("default", "eg", {
        "podSelector": {"matchLabels": {"app": "a"}},
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}],
    })  # fmt: skip
    # policyTypes defaulted to Ingress + Egress: ingress to a is denied too
    assert w.flags("default/a") == EP_F_POLICY_INGRESS | EP_F_POLICY_EGRESS
    assert w.can("default/a", "default/b") and not w.can("default/a", "8.8.8.8")
    assert not w.can("default/b", "default/a")
    w.policy("default", "eg", {
        "podSelector": {"matchLabels": {"app": "a"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nothing"}}}]}],
    })  # fmt: skip
    assert w.flags("default/a") == EP_F_POLICY_EGRESS
    assert w.can("default/b", "default/a")  # ingress rules ignored: ingress not in policyTypes


# ---- peers --------------------------------------------------------------------------------------


def test_pod_selector_is_namespace_local(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "web", {"app": "web"})
    w.pod("other", "web", {"app": "web"})
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
    })  # fmt: skip
    assert w.can("default/web", "default/srv")
    assert not w.can("other/web", "default/srv")


def test_namespace_selector_and_combined(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("prod", "web", {"app": "web"})
    w.pod("prod", "db", {"app": "db"})
    w.pod("dev", "web", {"app": "web"})
    w.policy("default", "ns-only", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "prod"}}}]}],
    })  # fmt: skip
    assert w.can("prod/web", "default/srv") and w.can("prod/db", "default/srv")
    assert not w.can("dev/web", "default/srv")
    # AND: web pods of prod namespaces only
    w.policy("default", "ns-only", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "prod"}},
                               "podSelector": {"matchLabels": {"app": "web"}}}]}],
    })  # fmt: skip
    assert w.can("prod/web", "default/srv")
    assert not w.can("prod/db", "default/srv") and not w.can("dev/web", "default/srv")
    # OR: two peers
    w.policy("default", "ns-only", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "prod"}}},
                              {"podSelector": {"matchLabels": {"app": "web"}}}]}],
    })  # fmt: skip
    assert w.can("prod/db", "default/srv")
    assert not w.can("dev/web", "default/srv")  # podSelector alone means the policy's namespace
    # namespaceSelector {} = every pod of every namespace, but not the outside world
    w.policy("default", "ns-only", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"namespaceSelector": {}}]}],
    })  # fmt: skip
    assert w.can("dev/web", "default/srv") and w.can("prod/db", "default/srv")
    assert not w.can("1.2.3.4", "default/srv")
    # by the automatic kubernetes.io/metadata.name label
    w.policy("default", "ns-only", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dev"}}}]}],
    })  # fmt: skip
    assert w.can("dev/web", "default/srv") and not w.can("prod/web", "default/srv")


def test_match_expressions(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "a", {"tier": "fe", "env": "prod"})
    w.pod("default", "b", {"tier": "be", "env": "prod"})
    w.pod("default", "c", {"tier": "fe"})
    w.pod("default", "d", {"other": "x"})

    def only(exprs: list[dict[str, Any]]) -> set[str]:
        w.policy("default", "p", {
            "podSelector": {"matchLabels": {"app": "srv"}},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": exprs}}]}],
        })  # fmt: skip
        return {n for n in "abcd" if w.can(f"default/{n}", "default/srv")}

    assert only([{"key": "tier", "operator": "In", "values": ["fe", "xx"]}]) == {"a", "c"}
    assert only([{"key": "tier", "operator": "NotIn", "values": ["fe"]}]) == {"b", "d"}
    assert only([{"key": "env", "operator": "Exists"}]) == {"a", "b"}
    assert only([{"key": "env", "operator": "DoesNotExist"}]) == {"c", "d"}
    assert only(
        [{"key": "tier", "operator": "In", "values": ["fe"]}, {"key": "env", "operator": "Exists"}]
    ) == {"a"}


def test_ip_block_with_except(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "172.16.0.0/12", "except": ["172.16.5.0/24"]}}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}],
    })  # fmt: skip
    assert w.can("172.20.1.1", "default/srv") and w.can("172.16.4.255", "default/srv")
    assert not w.can("172.16.5.7", "default/srv")  # except
    assert not w.can("8.8.8.8", "default/srv")
    assert not w.can("default/cli", "default/srv")  # ipBlock never matches pods
    assert w.can("default/srv", "8.8.8.8")  # world via 0.0.0.0/0
    assert not w.can("default/srv", "10.1.2.3")
    # the CIDR identities are node-local and in the ipcache
    ids = {p: e.identity for p, e in w.ipc.entries.items() if p.prefixlen < 32}
    assert set(map(str, ids)) == {"172.16.0.0/12", "172.16.5.0/24", "10.0.0.0/8"}
    assert all(i > LOCAL_ID_FLAG for i in ids.values())
    w.cp.delete_policy(np_obj("default", "p", {}))
    assert not {p for p in w.ipc.entries if p.prefixlen < 32}
    assert w.flags("default/srv") == 0 and not w.dp.entries


def test_nested_cidrs_across_policies(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.policy("default", "wide", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]}],
    })  # fmt: skip
    w.policy("default", "narrow", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"port": 443}]}],
    })  # fmt: skip
    # 10.1.2.3 resolves to the /16 identity: the /8 rule must still allow it on port 80
    assert w.can("10.1.2.3", "default/srv", 80) and w.can("10.1.2.3", "default/srv", 443)
    assert w.can("10.9.2.3", "default/srv", 80) and not w.can("10.9.2.3", "default/srv", 443)


# ---- ports --------------------------------------------------------------------------------------


def test_ports_and_protocols(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                     "ports": [{"port": 80}, {"protocol": "UDP", "port": 53}, {"protocol": "UDP"}]}],
    })  # fmt: skip
    assert w.can("default/cli", "default/srv", 80, TCP)
    assert not w.can("default/cli", "default/srv", 81, TCP)
    assert w.can("default/cli", "default/srv", 53, UDP) and w.can("default/cli", "default/srv", 9999, UDP)
    keys = w.dp.entries[w.eps["default/srv"][0]]
    cli = w.ident("default/cli")
    assert PolicyMapKey(False, cli, TCP, 80, 16) in keys
    assert PolicyMapKey(False, cli, UDP, 0, 0) in keys


def test_named_ports_ingress_per_selected_pod(w: World) -> None:
    w.pod("default", "s1", {"app": "srv"}, ports=[("http", 8080, "TCP")])
    w.pod("default", "s2", {"app": "srv"}, ports=[("http", 9090, "TCP"), ("dns", 53, "UDP")])
    w.pod("default", "cli", {"app": "cli"})
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}, {"port": "dns"}]}],
    })  # fmt: skip
    assert w.can("default/cli", "default/s1", 8080) and not w.can("default/cli", "default/s1", 9090)
    assert w.can("default/cli", "default/s2", 9090) and not w.can("default/cli", "default/s2", 8080)
    assert w.can("default/cli", "default/s2", 53, UDP) and not w.can("default/cli", "default/s2", 53, TCP)


def test_named_ports_egress_per_destination_identity(w: World) -> None:
    w.pod("default", "cli", {"app": "cli"})
    w.pod("default", "a", {"app": "a"}, node="node-b", ports=[("http", 8080, "TCP")])
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "cli"}},
        "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "http"}]}],
    })  # fmt: skip
    assert w.can("default/cli", "default/a", 8080) and not w.can("default/cli", "default/a", 9090)
    # a destination that appears later is resolved incrementally
    w.pod("default", "b", {"app": "b"}, node="node-b", ports=[("http", 9090, "TCP")])
    assert w.can("default/cli", "default/b", 9090) and not w.can("default/cli", "default/b", 8080)
    assert not w.can("default/cli", "default/a", 9090)
    assert not w.can("default/cli", "8.8.8.8", 8080)  # world has no named ports
    # with a `to`: only those peers
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "cli"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": "http"}]}],
    })  # fmt: skip
    assert w.can("default/cli", "default/b", 9090) and not w.can("default/cli", "default/a", 8080)


# ---- errors ---------------------------------------------------------------------------------------


def test_sctp_and_bad_fields_logged_and_fail_closed(w: World, caplog: pytest.LogCaptureFixture) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    caplog.set_level(logging.ERROR, logger="pycilium.agent.policy")
    w.policy("default", "mixed", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [
            {"ports": [{"protocol": "SCTP", "port": 5000}]},
            {"from": [{"ipBlock": {"cidr": "garbage"}}]},
            {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": 80}]},
        ],
    })  # fmt: skip
    text = caplog.text
    assert "default/mixed" in text and "SCTP" in text and "spec.ingress[1].from[0].ipBlock.cidr" in text
    assert w.can("default/cli", "default/srv", 80)
    assert not w.can("default/cli", "default/srv", 5000) and not w.can("1.1.1.1", "default/srv", 80)
    assert w.cp.policy_errors()["default/mixed"]
    # a policy with an unusable podSelector is skipped; others keep working
    w.policy("default", "broken", {"podSelector": {"matchExpressions": [{"key": "x", "operator": "Bad"}]}})
    assert "default/broken" not in w.cp.policy.policies()
    assert w.can("default/cli", "default/srv", 80)


# ---- modes ---------------------------------------------------------------------------------------


def test_mode_always_and_never() -> None:
    a = World(mode="always")
    a.pod("default", "x", {"app": "x"})
    a.pod("default", "y", {"app": "y"})
    assert a.flags("default/x") == EP_F_POLICY_INGRESS | EP_F_POLICY_EGRESS
    assert not a.can("default/x", "default/y") and a.dp_allows("default/x", False, ID_HOST, TCP, 1)
    n = World(mode="never")
    n.pod("default", "x", {"app": "x"})
    n.pod("default", "y", {"app": "y"})
    n.policy("default", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    assert n.flags("default/x") == 0 and n.can("default/x", "default/y") and not n.dp.entries


# ---- incremental behaviour --------------------------------------------------------------------------


def test_incremental_identity_and_namespace_changes(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}},
                              {"namespaceSelector": {"matchLabels": {"env": "trusted"}}}]}],
    })  # fmt: skip
    w.pod("default", "cli", {"role": "client"})
    assert w.can("default/cli", "default/srv")
    w.pod("default", "cli", {"role": "other"})  # label change: new identity, not selected
    assert not w.can("default/cli", "default/srv")
    w.pod("dev", "x", {"a": "b"})
    assert not w.can("dev/x", "default/srv")
    w.cp.upsert_namespace(ns_obj("dev", {"team": "dev", "env": "trusted"}))
    assert w.can("dev/x", "default/srv")
    w.cp.upsert_namespace(ns_obj("dev", {"team": "dev"}))
    assert not w.can("dev/x", "default/srv")


def test_policy_selecting_new_pod_and_label_change(w: World) -> None:
    w.policy("default", "deny", {"podSelector": {"matchLabels": {"locked": "yes"}}, "ingress": []})
    w.pod("default", "a", {"locked": "yes"})
    w.pod("default", "b", {})
    assert not w.can("default/b", "default/a")
    w.pod("default", "a", {"locked": "no"})
    assert w.can("default/b", "default/a") and w.flags("default/a") == 0
    assert w.eps["default/a"][0] not in w.dp.entries


def test_union_of_policies(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "a", {"app": "a"})
    w.pod("default", "b", {"app": "b"})
    for name, app, port in (("pa", "a", 80), ("pb", "b", 443)):
        w.policy("default", name, {
            "podSelector": {"matchLabels": {"app": "srv"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}], "ports": [{"port": port}]}],
        })  # fmt: skip
    assert w.can("default/a", "default/srv", 80) and not w.can("default/a", "default/srv", 443)
    assert w.can("default/b", "default/srv", 443) and not w.can("default/b", "default/srv", 80)
    st = w.cp.policy.endpoint_status(w.eps["default/srv"][0])
    assert st is not None and st.policies == ("default/pa", "default/pb") and st.ingress_enforced


def test_write_order_entries_before_flags_and_flags_off_before_delete(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    ep_id, ip = w.eps["default/srv"]
    w.dp.ops.clear()
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}],
    })  # fmt: skip
    ops = w.dp.ops
    first_write = next(i for i, o in enumerate(ops) if o[0] == "write" and o[1] == ep_id)
    flag_on = next(i for i, o in enumerate(ops) if o[0] == "endpoint" and o[1] == ip and o[2][1])  # type: ignore[index]
    assert first_write < flag_on
    w.dp.ops.clear()
    w.cp.delete_policy(np_obj("default", "p", {}))
    ops = w.dp.ops
    flag_off = next(i for i, o in enumerate(ops) if o[0] == "endpoint" and o[1] == ip)
    removal = next(i for i, o in enumerate(ops) if o[0] == "remove" and o[1] == ep_id)
    assert flag_off < removal and w.flags("default/srv") == 0
    assert ep_id not in w.dp.entries


def test_diff_writes_only_changes(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    spec = {"podSelector": {"matchLabels": {"app": "srv"}}, "ingress": [{"ports": [{"port": 80}]}]}
    w.policy("default", "p", spec)
    w.dp.ops.clear()
    w.policy("default", "p", spec)  # no change
    assert w.dp.ops == []
    spec2 = {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"ports": [{"port": 80}, {"port": 81}]}],
    }
    w.policy("default", "p", spec2)
    writes = [o for o in w.dp.ops if o[0] == "write"]
    assert writes == [("write", w.eps["default/srv"][0], frozenset({PolicyMapKey(False, 0, TCP, 81, 16)}))]
    assert not [o for o in w.dp.ops if o[0] == "remove"]


def test_endpoint_removed_clears_entries(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.policy("default", "p", {"podSelector": {}, "ingress": []})
    ep_id = w.eps["default/srv"][0]
    assert w.dp.entries[ep_id]
    w.cp.endpoint_removed(ep_id)
    assert ep_id not in w.dp.entries


def test_restart_keeps_old_state_until_sync() -> None:
    w = World(synced=False)
    w.dp.entries[555] = {PolicyMapKey(False, 1)}  # an endpoint that did not come back
    w.pod("default", "srv", {"app": "srv"})
    ep_id, ip = w.eps["default/srv"]
    w.dp.entries[ep_id] = {PolicyMapKey(False, ID_HOST), PolicyMapKey(False, 4242)}
    w.dp.endpoint_entries[ip] = (0, EP_F_POLICY_INGRESS)
    # the engine was built before these entries existed in this test: rebuild from the "map"
    cp2 = PolicyControlPlane(node_name=NODE, identity_backend=w.backend, policy_datapath=w.dp,
                             ipcache_datapath=w.ipc)  # fmt: skip
    for n in ("default",):
        cp2.upsert_namespace(ns_obj(n, {"team": n}))
    cp2.upsert_pod(pod_obj("default", "srv", {"app": "srv"}, ip))
    cp2.endpoint_added(ep_id, ip, "default", "srv")
    cp2.upsert_policy(np_obj("default", "p", {"podSelector": {}, "ingress": []}))
    assert w.dp.entries[555] and PolicyMapKey(False, 4242) in w.dp.entries[ep_id]  # untouched before sync
    cp2.mark_synced()
    assert 555 not in w.dp.entries
    assert w.dp.entries[ep_id] == {PolicyMapKey(False, ID_HOST)}
    assert w.dp.endpoint_entries[ip][1] == EP_F_POLICY_INGRESS


def test_queries_for_cli(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "cli", {"app": "cli"})
    w.policy("default", "p", {
        "podSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                     "ports": [{"port": 8000, "endPort": 8003}]}],
    })  # fmt: skip
    ep_id = w.eps["default/srv"][0]
    rows = w.cp.policy_entries(ep_id)
    assert [r.port for r in rows if r.identity != ID_HOST] == ["8000-8003/TCP"]
    cli_row = next(r for r in rows if r.identity == w.ident("default/cli"))
    assert "k8s:app=cli" in cli_row.labels and "k8s:io.kubernetes.pod.namespace=default" in cli_row.labels
    host_row = next(r for r in rows if r.identity == ID_HOST)
    assert host_row.labels == ("reserved:host",) and host_row.port == "ANY"
    eps = {e.name: e for e in w.cp.endpoints()}
    assert eps["srv"].ingress_enforced and not eps["srv"].egress_enforced and eps["srv"].datapath_synced
    assert not eps["cli"].ingress_enforced
    assert w.cp.identities()[ID_WORLD] == ["reserved:world"]


def test_endpoint_entry_missing_then_retry(w: World) -> None:
    w.cp.upsert_pod(pod_obj("default", "late", {"app": "late"}, "10.200.0.99"))
    w.policy("default", "p", {"podSelector": {"matchLabels": {"app": "late"}}, "ingress": []})
    w.cp.endpoint_added(300, "10.200.0.99", "default", "late")  # endpoints-map entry not written yet
    st = w.cp.policy.endpoint_status(300)
    assert st is not None and not st.datapath_synced and w.dp.entries[300]
    w.dp.add_endpoint("10.200.0.99")
    w.cp.retry()
    ident = w.cp.resolve_identity("default", "late")
    assert w.dp.endpoint_entries["10.200.0.99"] == (ident, EP_F_POLICY_INGRESS)
    st = w.cp.policy.endpoint_status(300)
    assert st is not None and st.datapath_synced
    assert w.cp.endpoint_datapath_state(300) == (ident, EP_F_POLICY_INGRESS)


def test_endpoint_manager_writer() -> None:
    from dataclasses import dataclass, replace

    from pycilium.agent.policy.datapath import EndpointManagerWriter

    @dataclass
    class Ep:
        id: int
        ipv4: str
        identity: int = 5
        flags: int = 0x8

    class FakeManager:
        def __init__(self) -> None:
            self.eps = {7: Ep(7, "10.0.0.7")}
            self.updates: list[tuple[int, int | None, int | None]] = []

        def get(self, ep_id: int) -> Ep | None:
            ep = self.eps.get(ep_id)
            return replace(ep) if ep else None

        def update(self, ep_id: int, *, identity: int | None = None, flags: int | None = None) -> Ep:
            self.updates.append((ep_id, identity, flags))
            ep = self.eps[ep_id]
            if identity is not None:
                ep.identity = identity
            if flags is not None:
                ep.flags = flags
            return replace(ep)

    m = FakeManager()
    wr = EndpointManagerWriter(m)
    assert wr.read_endpoint(7, "10.0.0.7") == (5, 0x8)
    assert wr.write_endpoint(
        7, "10.0.0.7", 300, EP_F_POLICY_INGRESS, EP_F_POLICY_INGRESS | EP_F_POLICY_EGRESS
    )
    assert m.eps[7].flags == 0x8 | EP_F_POLICY_INGRESS and m.eps[7].identity == 300
    assert not wr.write_endpoint(8, "10.0.0.8", 1, 0, 0)
    assert not wr.write_endpoint(7, "10.0.0.99", 1, 0, 0)  # endpoint id reused for another IP


def test_background_loop_starts_and_stops() -> None:
    w = World()
    w.cp.retry_interval = 0.01
    w.cp.start()
    w.cp.stop()
    assert w.cp._thread is None
