"""Label and field selectors in their query-string form, as kube-apiserver parses them.

Label selectors: comma-separated requirements `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
`k` (exists), `!k` (does not exist), `k>1` / `k<1` (integer comparison). `!=` and `notin` match
objects without the label, as in Kubernetes.

Field selectors: `path=v`, `path==v`, `path!=v` over dotted paths (`metadata.name`, `metadata.namespace`,
`spec.nodeName`, `status.phase`, ...). Unlike kube-apiserver we accept any path on any resource; a
missing field compares as the empty string. `\\,`, `\\=` and `\\\\` escape in values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import bad_request

_KEY_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        val = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and val in self.values
        if self.op in ("!=", "notin"):
            return not present or val not in self.values
        if self.op in (">", "<"):
            try:
                have, want = int(val or ""), int(self.values[0])
            except ValueError:
                return False
            return have > want if self.op == ">" else have < want
        return False


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise bad_request(f"unable to parse requirement: unbalanced parentheses in {s!r}")
    parts.append("".join(cur))
    return parts


def _check_key(key: str, whole: str) -> str:
    if not _KEY_RE.match(key):
        raise bad_request(f"unable to parse requirement: invalid label key {key!r} in {whole!r}")
    return key


_SET_RE = re.compile(r"^\s*(\S+?)\s+(in|notin)\s*\((.*)\)\s*$")
_CMP_RE = re.compile(r"^\s*([^=!<>\s]+)\s*(==|=|!=|>|<)\s*(\S*)\s*$")


def parse_label_selector(text: str | None) -> LabelSelector:
    if not text or not text.strip():
        return LabelSelector()
    reqs: list[Requirement] = []
    for raw in _split_top(text):
        part = raw.strip()
        if not part:
            raise bad_request(f"unable to parse requirement: empty requirement in {text!r}")
        if m := _SET_RE.match(part):
            key, op, vals = m.group(1), m.group(2), m.group(3)
            values = tuple(v.strip() for v in vals.split(",") if v.strip())
            if not values:
                raise bad_request(f"unable to parse requirement: {op} needs values in {part!r}")
            reqs.append(Requirement(_check_key(key, text), op, values))
        elif m := _CMP_RE.match(part):
            key, op, val = m.group(1), m.group(2), m.group(3)
            if op in (">", "<") and not re.fullmatch(r"-?\d+", val):
                raise bad_request(f"unable to parse requirement: {op} needs an integer in {part!r}")
            reqs.append(Requirement(_check_key(key, text), "=" if op == "==" else op, (val,)))
        elif part.startswith("!"):
            reqs.append(Requirement(_check_key(part[1:].strip(), text), "!"))
        else:
            reqs.append(Requirement(_check_key(part, text), "exists"))
    return LabelSelector(tuple(reqs))


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[str, bool, str], ...] = ()  # (path, equal?, value)

    def matches(self, obj: dict[str, Any]) -> bool:
        return all((field_value(obj, path) == value) == eq for path, eq, value in self.terms)

    @property
    def empty(self) -> bool:
        return not self.terms

    def value_of(self, path: str) -> str | None:
        """The value an equality term requires for `path` (used to narrow lists by namespace/name)."""
        for p, eq, v in self.terms:
            if p == path and eq:
                return v
        return None


def field_value(obj: dict[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _split_escaped(s: str, sep: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            i += 2
            continue
        if ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def parse_field_selector(text: str | None) -> FieldSelector:
    if not text or not text.strip():
        return FieldSelector()
    terms: list[tuple[str, bool, str]] = []
    for part in _split_escaped(text, ","):
        part = part.strip()
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)(.*)$", part)
        if not m:
            raise bad_request(f"invalid field selector: {part!r}")
        terms.append((m.group(1), m.group(2) != "!=", _unescape(m.group(3).strip())))
    return FieldSelector(tuple(terms))
