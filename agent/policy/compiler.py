"""From NetworkPolicies to the policy map entries of one local endpoint.

Output per endpoint: which directions are enforced and the set of allow keys
``{direction, remote identity or 0 (any), protocol or 0 (any), port prefix}``. The datapath looks
up the exact remote identity and then identity 0, each by longest prefix over protocol and port;
an endpoint enforces a direction only when its EP_F_POLICY_* flag is set.

Enforcement (``enable-policy``):
- ``default``: a direction is enforced once any policy selecting the endpoint has that policy
  type; unselected directions allow everything;
- ``always``: both directions always enforced (no policy: deny all but the host);
- ``never``: nothing enforced.

When ingress is enforced the host (reserved:host) may always reach the endpoint (kubelet probes;
Kubernetes' allow-localhost). Replies of allowed connections pass by conntrack, not by entries.

Named ports resolve for ingress against the endpoint's own container ports, for egress against the
container ports of the pods of each destination identity (all pod identities when the rule has no
``to``). Pods sharing an identity share its resolved port numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from pycilium.agent.identity.labels import ID_HOST
from pycilium.agent.identity.pods import ContainerPort
from pycilium.agent.policy.k8s import PROTO_NAMES, ParsedPolicy, PeerRule
from pycilium.agent.policy.ports import prefix_range, range_to_prefixes
from pycilium.agent.policy.selectors import Selector
from pycilium.bpf.maps.defines import d

POLICY_STATIC_PREFIX = d("POLICY_STATIC_PREFIX")  # sec_label + ep_id + egress
POLICY_FULL_PREFIX = d("POLICY_FULL_PREFIX")
PROTO_BITS = 8
PORT_BITS = POLICY_FULL_PREFIX - POLICY_STATIC_PREFIX - PROTO_BITS

EnforcementMode = Literal["default", "always", "never"]


class PolicyMapKey(NamedTuple):
    """One allow entry of an endpoint. protocol 0 = any protocol and port; port_prefix = how many
    leading bits of `port` are significant (0 = any port, 16 = exactly `port`). A NamedTuple: sets
    of many thousands of keys are built and diffed on every regeneration."""

    egress: bool
    identity: int
    protocol: int = 0
    port: int = 0
    port_prefix: int = 0

    @property
    def prefixlen(self) -> int:
        if self.protocol == 0:
            return POLICY_STATIC_PREFIX
        return POLICY_STATIC_PREFIX + PROTO_BITS + self.port_prefix

    @property
    def direction(self) -> str:
        return "egress" if self.egress else "ingress"

    def port_range(self) -> tuple[int, int] | None:
        """Ports covered (first, last); None = any."""
        if self.protocol == 0 or self.port_prefix == 0:
            return None
        return prefix_range(self.port, self.port_prefix)

    def covers(self, protocol: int, port: int) -> bool:
        if self.protocol == 0:
            return True
        if self.protocol != protocol:
            return False
        r = self.port_range()
        return r is None or r[0] <= port <= r[1]

    def describe_port(self) -> str:
        if self.protocol == 0:
            return "ANY"
        proto = PROTO_NAMES.get(self.protocol, str(self.protocol))
        r = self.port_range()
        if r is None:
            return f"ANY/{proto}"
        return f"{r[0]}/{proto}" if r[0] == r[1] else f"{r[0]}-{r[1]}/{proto}"


@dataclass(frozen=True)
class EndpointPolicy:
    ingress_enforced: bool = False
    egress_enforced: bool = False
    keys: frozenset[PolicyMapKey] = frozenset()
    policies: tuple[str, ...] = field(default=(), compare=False)  # ns/name of the selecting policies

    def allows(self, egress: bool, identity: int, protocol: int, port: int) -> bool:
        """What the datapath decides for a new connection (used by tests and `policy trace`)."""
        if not (self.egress_enforced if egress else self.ingress_enforced):
            return True
        return any(
            k.egress == egress and k.identity in (identity, 0) and k.covers(protocol, port) for k in self.keys
        )


@dataclass(frozen=True)
class Subject:
    """The local endpoint a policy is computed for."""

    namespace: str
    labels: Mapping[str, str]
    ports: tuple[ContainerPort, ...] = ()

    def named_ports(self, name: str, protocol: str) -> set[int]:
        return {p.port for p in self.ports if p.name == name and p.protocol == protocol}


class CompileContext(Protocol):
    def selection(self, sel: Selector) -> AbstractSet[int]:
        """Identities a peer selector selects (not to be modified)."""
        ...

    def named_ports(self, identity: int, name: str, protocol: str) -> set[int]:
        """Port numbers named `name`/`protocol` in the pods of `identity`."""
        ...

    def pod_identities(self) -> Iterable[int]:
        """Identities that have pods (for egress named ports without `to`)."""
        ...


def _rule_keys(
    rule: PeerRule, egress: bool, subject: Subject, ctx: CompileContext, out: set[PolicyMapKey]
) -> None:
    peers: set[int] | None = None
    if rule.peers is not None:
        peers = set()
        for sel in rule.peers:
            peers |= ctx.selection(sel)
    ids: Iterable[int] = (0,) if peers is None else sorted(peers)
    if rule.ports is None:
        for i in ids:
            out.add(PolicyMapKey(egress, i))
        return
    for pr in rule.ports:
        if pr.name is None:
            if pr.port is None:
                blocks = [(0, 0)]
            else:
                blocks = range_to_prefixes(pr.port, pr.end_port if pr.end_port is not None else pr.port)
            for i in ids:
                for port, plen in blocks:
                    out.add(PolicyMapKey(egress, i, pr.protocol, port, plen))
        elif not egress:
            for port in sorted(subject.named_ports(pr.name, pr.protocol_name)):
                for i in ids:
                    out.add(PolicyMapKey(egress, i, pr.protocol, port, PORT_BITS))
        else:
            targets = sorted(peers) if peers is not None else sorted(ctx.pod_identities())
            for i in targets:
                if i == 0:
                    continue
                for port in sorted(ctx.named_ports(i, pr.name, pr.protocol_name)):
                    out.add(PolicyMapKey(egress, i, pr.protocol, port, PORT_BITS))


def selecting_policies(subject: Subject, policies: Iterable[ParsedPolicy]) -> list[ParsedPolicy]:
    return [p for p in policies if p.selects(subject.namespace, subject.labels)]


def compile_endpoint(
    subject: Subject,
    policies: Iterable[ParsedPolicy],
    ctx: CompileContext,
    mode: EnforcementMode = "default",
) -> EndpointPolicy:
    """The enforcement flags and allow keys of one endpoint under the given policies."""
    selecting = sorted(selecting_policies(subject, policies), key=lambda p: p.key)
    names = tuple(p.key for p in selecting)
    if mode == "never":
        return EndpointPolicy(False, False, frozenset(), names)
    ingress = mode == "always" or any(p.ingress is not None for p in selecting)
    egress = mode == "always" or any(p.egress is not None for p in selecting)
    keys: set[PolicyMapKey] = set()
    for p in selecting:
        if ingress:
            for r in p.ingress or ():
                _rule_keys(r, False, subject, ctx, keys)
        if egress:
            for r in p.egress or ():
                _rule_keys(r, True, subject, ctx, keys)
    if ingress:
        keys.add(PolicyMapKey(False, ID_HOST))
    return EndpointPolicy(ingress, egress, frozenset(keys), names)
