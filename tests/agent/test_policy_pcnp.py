"""PyCiliumNetworkPolicy semantics through the control plane (same harness as NetworkPolicy), its
parse errors, and that both kinds coexist under one name."""

from __future__ import annotations

from typing import Any

import pytest
from pycilium.agent.policy.pycilium_crd import parse_pycilium_network_policy

from tests.agent.test_policy_compiler import TCP, UDP, World, np_obj


def pcnp(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "pycilium.io/v1", "kind": "PyCiliumNetworkPolicy",
            "metadata": {"namespace": ns, "name": name, "uid": f"pcnp-{ns}-{name}"}, "spec": spec}  # fmt: skip


@pytest.fixture
def w() -> World:
    return World()


def test_endpoints_and_ports(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "web", {"app": "web"})
    w.pod("other", "web", {"app": "web"})
    w.cp.upsert_pycilium_policy(pcnp("default", "p", {
        "endpointSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"k8s:app": "web"}}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}, {"port": "53"}]}]}],
    }))  # fmt: skip
    assert w.can("default/web", "default/srv", 80, TCP)
    assert not w.can("default/web", "default/srv", 80, UDP)  # TCP only
    assert w.can("default/web", "default/srv", 53, TCP) and w.can(
        "default/web", "default/srv", 53, UDP
    )  # ANY
    assert not w.can("default/web", "default/srv", 81, TCP)
    assert not w.can("other/web", "default/srv", 80, TCP)  # endpoints of the policy's namespace only
    assert w.cp.policy.policies() == ["pcnp:default/p"]


def test_namespaces_by_name_and_by_labels(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("prod", "web", {"app": "web"})
    w.pod("dev", "web", {"app": "web"})
    w.cp.upsert_pycilium_policy(pcnp("default", "p", {
        "endpointSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "prod", "app": "web"}}]}],
    }))  # fmt: skip
    assert w.can("prod/web", "default/srv") and not w.can("dev/web", "default/srv")
    w.cp.upsert_pycilium_policy(pcnp("default", "p", {
        "endpointSelector": {"matchLabels": {"app": "srv"}},
        "ingress": [{"fromEndpoints": [{"matchExpressions": [
            {"key": "io.cilium.k8s.namespace.labels.team", "operator": "In", "values": ["dev"]}]}]}],
    }))  # fmt: skip
    assert w.can("dev/web", "default/srv") and not w.can("prod/web", "default/srv")


def test_cidrs_egress_and_l4_only_rules(w: World) -> None:
    w.pod("default", "cli", {"app": "cli"})
    w.pod("default", "srv", {"app": "srv"})
    w.cp.upsert_pycilium_policy(pcnp("default", "egress", {
        "endpointSelector": {"matchLabels": {"app": "cli"}},
        "egress": [{"toCIDRSet": [{"cidr": "172.16.0.0/12", "except": ["172.16.5.0/24"]}]},
                   {"toCIDR": ["8.8.8.8/32"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]},
                   {"toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}],  # any peer, one port
    }))  # fmt: skip
    assert w.can("default/cli", "172.20.0.1") and not w.can("default/cli", "172.16.5.1")
    assert w.can("default/cli", "8.8.8.8", 53, UDP) and not w.can("default/cli", "8.8.8.8", 53, TCP)
    assert w.can("default/cli", "default/srv", 8080) and not w.can("default/cli", "default/srv", 80)
    assert w.can("default/cli", "9.9.9.9", 8080)


def test_absent_vs_empty_and_coexistence_with_networkpolicy(w: World) -> None:
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "web", {"app": "web"})
    w.cp.upsert_pycilium_policy(pcnp("default", "same", {"endpointSelector": {}, "egress": []}))
    assert not w.can("default/srv", "default/web")  # egress: [] = default deny
    assert w.can("1.2.3.4", "default/srv")  # ingress absent: not affected
    # a NetworkPolicy of the same name is a different policy; both apply (union)
    w.policy("default", "same", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]})
    assert w.can("default/srv", "default/web")
    assert sorted(w.cp.policy.policies()) == ["default/same", "pcnp:default/same"]
    w.cp.delete_policy(np_obj("default", "same", {}))
    assert not w.can("default/srv", "default/web")
    w.cp.delete_pycilium_policy(pcnp("default", "same", {}))
    assert w.can("default/srv", "default/web") and w.flags("default/srv") == 0


def test_parse_errors_name_fields_and_fail_closed(w: World) -> None:
    assert parse_pycilium_network_policy(pcnp("d", "p", {"ingress": []}))[1] == [
        "spec.endpointSelector: required"
    ]
    pol, errors = parse_pycilium_network_policy(pcnp("d", "p", {
        "endpointSelector": {},
        "ingress": [{"fromCIDR": ["10.0.0.0/33"]},
                    {"fromEndpoints": [{"matchLabels": {"app": "x"}}], "toPorts": [{"ports": [{"port": "http!"}]}]},
                    {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}]},
                    {"toPorts": [{"ports": [{"port": "80", "protocol": "SCTP"}]}]}],
    }))  # fmt: skip
    assert pol is not None and pol.ingress == ()  # every rule broken: allows nothing, still enforced
    assert "spec.ingress[0].fromCIDR[0]: invalid CIDR '10.0.0.0/33'" in errors
    assert "spec.ingress[1].toPorts[0].ports[0].port: invalid port name 'http!'" in errors
    assert "spec.ingress[2].fromCIDRSet[0].except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8" in errors
    assert any(e.startswith("spec.ingress[3].toPorts[0].ports[0].protocol: unknown protocol") for e in errors)
    bad_ns = pcnp("d", "p", {"endpointSelector": {"matchLabels": {"io.kubernetes.pod.namespace": "other"}}})
    assert parse_pycilium_network_policy(bad_ns)[0] is None
    # through the control plane: reported under the policy's name, the pod is default-deny
    w.pod("default", "srv", {"app": "srv"})
    w.pod("default", "web", {"app": "web"})
    w.cp.upsert_pycilium_policy(pcnp("default", "broken", {
        "endpointSelector": {"matchLabels": {"app": "srv"}}, "ingress": [{"fromCIDR": ["nope"]}]}))  # fmt: skip
    assert not w.can("default/web", "default/srv")
    assert w.cp.policy.policy_errors() == {
        "pcnp:default/broken": ["spec.ingress[0].fromCIDR[0]: invalid CIDR 'nope'"]
    }
