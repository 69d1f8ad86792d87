"""Output helpers: Cilium-style aligned tables, JSON, and small formatters shared by commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

# Cilium's tables use Go's tabwriter with minwidth 5 and padding 3.
MIN_WIDTH = 5
PADDING = 3

PROTO_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
PROTO_NUMBERS = {"ANY": 0, "ICMP": 1, "TCP": 6, "UDP": 17, "SCTP": 132}


def proto_name(n: int) -> str:
    return PROTO_NAMES.get(n, str(n))


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns: each column as wide as its widest cell plus padding; the last
    cell of a row is not padded and trailing blanks are stripped."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [0] * ncols
    for r in rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell))
    widths = [max(w + PADDING, MIN_WIDTH) for w in widths]
    out = []
    for r in rows:
        parts = [cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])]
        if r:
            parts.append(r[-1])
        out.append("".join(parts).rstrip())
    return "\n".join(out) + "\n"


def print_table(rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    (out or sys.stdout).write(table(rows))


# Above this many items a list prints one compact object per line: the indenting encoder is pure
# Python and takes tens of seconds over 100,000 conntrack entries.
COMPACT_LIST_THRESHOLD = 1000


def print_json(obj: Any, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    if isinstance(obj, list) and len(obj) > COMPACT_LIST_THRESHOLD:
        stream.write("[\n")
        write_lines((json.dumps(item) + "," for item in obj[:-1]), stream)
        stream.write(json.dumps(obj[-1]) + "\n]\n")
        return
    stream.write(json.dumps(obj, indent=2))
    stream.write("\n")


def write_lines(lines: Iterable[str], out: TextIO | None = None, chunk: int = 4096) -> None:
    """Write many lines fast (one write per chunk)."""
    stream = out or sys.stdout
    buf: list[str] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= chunk:
            stream.write("\n".join(buf))
            stream.write("\n")
            buf.clear()
    if buf:
        stream.write("\n".join(buf))
        stream.write("\n")


def note(message: str) -> None:
    """An informational line on stderr (never mixed into tables or JSON)."""
    sys.stderr.write(message.rstrip("\n") + "\n")


TCP_FLAG_BITS = ((0x02, "SYN"), (0x10, "ACK"), (0x08, "PSH"), (0x04, "RST"), (0x01, "FIN"), (0x20, "URG"),
                 (0x40, "ECE"), (0x80, "CWR"))  # fmt: skip


def tcp_flags_text(flags: int) -> str:
    """TCP flags the way `monitor` prints them: "SYN", "SYN, ACK", "ACK, FIN"."""
    return ", ".join(name for bit, name in TCP_FLAG_BITS if flags & bit)
