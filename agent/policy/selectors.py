"""Label selectors (Kubernetes semantics) and the peer selectors of a policy.

- `LabelSelector`: matchLabels + matchExpressions (In, NotIn, Exists, DoesNotExist), ANDed; the
  empty selector matches everything.
- `EndpointSelector`: pods chosen by a podSelector in a fixed namespace, and/or by a
  namespaceSelector; evaluated against an identity's labels.
- `CIDRSelector`: an ipBlock; selects the CIDR identities whose prefix lies inside the block and
  outside every `except` prefix (the most specific prefix wins in the ipcache, so a block must
  also select the identities of narrower prefixes other policies created inside it), and
  reserved:world for 0.0.0.0/0.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pycilium.agent.identity.labels import IdentityView

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class PolicyError(ValueError):
    """One invalid field of a policy; the message names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, obj: Any, field: str) -> LabelSelector:
        """A metav1.LabelSelector dict; raises PolicyError naming the offending field."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise PolicyError(field, "must be an object")
        reqs: set[Requirement] = set()
        ml = obj.get("matchLabels") or {}
        if not isinstance(ml, dict):
            raise PolicyError(f"{field}.matchLabels", "must be a map")
        for k, v in ml.items():
            if not isinstance(k, str) or not k or not isinstance(v, str | int | float | bool):
                raise PolicyError(f"{field}.matchLabels", f"invalid label {k!r}: {v!r}")
            reqs.add(Requirement(k, "In", (str(v),)))
        exprs = obj.get("matchExpressions") or []
        if not isinstance(exprs, list):
            raise PolicyError(f"{field}.matchExpressions", "must be a list")
        for i, e in enumerate(exprs):
            f = f"{field}.matchExpressions[{i}]"
            if not isinstance(e, dict):
                raise PolicyError(f, "must be an object")
            key, op, values = e.get("key"), e.get("operator"), e.get("values")
            if not isinstance(key, str) or not key:
                raise PolicyError(f"{f}.key", "required")
            if op not in OPERATORS:
                raise PolicyError(
                    f"{f}.operator", f"unknown operator {op!r} (want one of {', '.join(OPERATORS)})"
                )
            vals = values or []
            if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
                raise PolicyError(f"{f}.values", "must be a list of strings")
            if op in ("In", "NotIn") and not vals:
                raise PolicyError(f"{f}.values", f"must be non-empty for {op}")
            if op in ("Exists", "DoesNotExist") and vals:
                raise PolicyError(f"{f}.values", f"must be empty for {op}")
            reqs.add(Requirement(key, op, tuple(sorted(set(vals)))))
        return cls(tuple(sorted(reqs)))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def keys(self) -> set[str]:
        return {r.key for r in self.requirements}

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        parts = []
        for r in self.requirements:
            if r.operator == "In" and len(r.values) == 1:
                parts.append(f"{r.key}={r.values[0]}")
            elif r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({','.join(r.values)})")
            elif r.operator == "Exists":
                parts.append(r.key)
            else:
                parts.append(f"!{r.key}")
        return ",".join(parts)


@dataclass(frozen=True)
class EndpointSelector:
    """Pods: `pods` in `namespace` (a podSelector alone) or in namespaces matching `namespaces`."""

    namespace: str | None
    namespaces: LabelSelector | None
    pods: LabelSelector

    def matches(self, v: IdentityView) -> bool:
        if not v.is_pod:
            return False
        if self.namespace is not None and v.namespace != self.namespace:
            return False
        if self.namespaces is not None and not self.namespaces.matches(v.namespace_labels):
            return False
        return self.pods.matches(v.pod_labels)

    def __str__(self) -> str:
        ns = f"ns={self.namespace}" if self.namespace is not None else f"nsSelector({self.namespaces})"
        return f"pods({self.pods}) {ns}"


@dataclass(frozen=True)
class CIDRSelector:
    cidr: ipaddress.IPv4Network
    excepts: tuple[ipaddress.IPv4Network, ...] = ()

    def matches(self, v: IdentityView) -> bool:
        if v.cidr is None:
            # reserved:world stands for every address no CIDR identity covers
            return (
                "world" in v.reserved
                and v.is_pod is False
                and self.cidr.prefixlen == 0
                and not any(e.prefixlen == 0 for e in self.excepts)
            )
        if not v.cidr.subnet_of(self.cidr):
            return False
        return not any(v.cidr.subnet_of(e) for e in self.excepts)

    def prefixes(self) -> tuple[ipaddress.IPv4Network, ...]:
        return (self.cidr, *self.excepts)

    def __str__(self) -> str:
        ex = f" except {','.join(map(str, self.excepts))}" if self.excepts else ""
        return f"cidr({self.cidr}{ex})"


Selector = EndpointSelector | CIDRSelector
