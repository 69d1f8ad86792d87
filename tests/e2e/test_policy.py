"""NetworkPolicy on a 2-node lab: default-deny ingress, then allows by podSelector,
namespaceSelector and ipBlock; egress deny. A denied connection is dropped (timeout), not refused."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import NODE_IPS, WORLD_IP, Lab, eventually

pytestmark = pytest.mark.e2e

SETUP = """
apiVersion: v1
kind: Namespace
metadata: {name: pol, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: pol-friends, labels: {team: friends}}
---
apiVersion: v1
kind: Namespace
metadata: {name: pol-strangers, labels: {team: strangers}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: pol, labels: {app: server}}
spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: pol, labels: {role: frontend}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: pol, labels: {role: other}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: friend, namespace: pol-friends, labels: {role: other}}
spec: {nodeName: node2, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: pol-strangers, labels: {role: frontend}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: pol}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
"""

DENY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: pol}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""


def allow(name: str, peer: str, ports: str = "") -> str:
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: pol}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{peer}]
    {ports}
"""


CLIENTS = ("pol/frontend", "pol/other", "pol-friends/friend", "pol-strangers/stranger", "world")


TARGETS: dict[str, str] = {}


@pytest.fixture(scope="module")
def pol(lab: Lab) -> Iterator[Lab]:
    lab.apply(SETUP)
    TARGETS["pod"] = f"{lab.pod_ip('pol/server')}:8080"
    TARGETS["world"] = f"{NODE_IPS['node2']}:{lab.node_port('pol/server')}"  # the Local NodePort
    yield lab
    lab.delete(SETUP, wait=False)


def reach(lab: Lab, src: str, proto: str = "tcp") -> str:
    """ok / refused / timeout from `src` to the server (world goes through the Local NodePort)."""
    return lab.probe1(src, TARGETS["world" if src == "world" else "pod"], proto, timeout=1.0)["result"]


def expect(lab: Lab, want: dict[str, str], proto: str = "tcp") -> None:
    def check() -> bool:
        with ThreadPoolExecutor(len(want)) as pool:
            got = dict(zip(want, pool.map(lambda src: reach(lab, src, proto), want), strict=True))
        check.last = got  # type: ignore[attr-defined]
        return got == want

    try:
        eventually(check, timeout=20, interval=0.3, what=f"reachability {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}\nlast seen: {getattr(check, 'last', None)}") from None


def test_without_policy_everyone_reaches_the_server(pol: Lab) -> None:
    expect(pol, dict.fromkeys(CLIENTS, "ok"))


def test_default_deny_ingress_drops_everything(pol: Lab) -> None:
    pol.apply(DENY, wait=False)
    try:
        expect(pol, dict.fromkeys(CLIENTS, "timeout"))
    finally:
        pol.delete(DENY, wait=False)


def test_allow_by_pod_selector_in_the_same_namespace(pol: Lab) -> None:
    pol_allow = allow("allow-frontend", "{podSelector: {matchLabels: {role: frontend}}}",
                      "ports: [{port: 8080, protocol: TCP}]")  # fmt: skip
    pol.apply(DENY + "---" + pol_allow, wait=False)
    try:
        # the stranger has role=frontend too, but in another namespace: a bare podSelector is this namespace
        expect(pol, {"pol/frontend": "ok", "pol/other": "timeout", "pol-strangers/stranger": "timeout"})
        expect(pol, {"pol/frontend": "timeout"}, proto="udp")  # only TCP 8080 is allowed
    finally:
        pol.delete(DENY + "---" + pol_allow, wait=False)


def test_allow_by_namespace_selector(pol: Lab) -> None:
    pol_allow = allow("allow-friends", "{namespaceSelector: {matchLabels: {team: friends}}}")
    pol.apply(DENY + "---" + pol_allow, wait=False)
    try:
        expect(
            pol, {"pol-friends/friend": "ok", "pol-strangers/stranger": "timeout", "pol/frontend": "timeout"}
        )
    finally:
        pol.delete(DENY + "---" + pol_allow, wait=False)


def test_allow_by_ip_block(pol: Lab) -> None:
    pol_allow = allow("allow-world", f"{{ipBlock: {{cidr: {WORLD_IP}/32}}}}")
    pol.apply(DENY + "---" + pol_allow, wait=False)
    try:
        expect(pol, {"world": "ok", "pol/frontend": "timeout", "pol-friends/friend": "timeout"})
    finally:
        pol.delete(DENY + "---" + pol_allow, wait=False)


def test_egress_deny(pol: Lab) -> None:
    deny_egress = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: other-no-egress, namespace: pol}
spec:
  podSelector: {matchLabels: {role: other}}
  policyTypes: [Egress]
"""
    pol.apply(deny_egress, wait=False)
    try:
        expect(pol, {"pol/other": "timeout", "pol/frontend": "ok", "pol-friends/friend": "ok"})

        def world_from(src: str) -> str:
            return pol.probe1(src, f"{WORLD_IP}:8080", timeout=1.0)["result"]

        assert world_from("pol/other") == "timeout"
        assert world_from("pol/frontend") == "ok"
    finally:
        pol.delete(deny_egress, wait=False)
    expect(pol, {"pol/other": "ok"})


def test_pycilium_network_policy_allows_one_namespace_on_one_port(pol: Lab) -> None:
    pcnp = """
apiVersion: pycilium.io/v1
kind: PyCiliumNetworkPolicy
metadata: {name: friends-only, namespace: pol}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: pol-friends}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
    pol.apply(pcnp, wait=False)
    try:
        expect(pol, {"pol-friends/friend": "ok", "pol/frontend": "timeout", "pol-strangers/stranger": "timeout",
                     "world": "timeout"})  # fmt: skip
        expect(pol, {"pol-friends/friend": "timeout"}, proto="udp")  # TCP 8080 only
        policies = pol.exec("node2", "pycilium", "bpf", "policy", "get", "--all").stdout
        assert "8080/TCP" in policies, policies
    finally:
        pol.delete(pcnp, wait=False)
    expect(pol, {"pol/frontend": "ok"})
