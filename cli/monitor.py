"""`pycilium monitor`: live drop, trace and policy-verdict events from the datapath.

Reads the pinned perf event array `events` directly (see perf.py): no agent needed. Lines follow
Cilium's monitor::

    xx drop (Policy denied) flow 0x0 to endpoint 0, ifindex 29, file bpf_lxc.c:1350, , identity 12345->2: 10.0.0.5:43210 -> 10.0.1.9:80 tcp SYN
    -> endpoint 229 flow 0x0 , identity 38829->27638 state new ifindex lxc9c41458319d9 orig-ip 10.0.0.3: 10.0.0.3:59428 -> 10.0.0.7:15020 tcp SYN
    Policy verdict log: flow 0x0, local EP ID 229, remote ID 38829, proto 6, ingress, action allow, 10.0.0.3:59428 -> 10.0.0.7:15020 tcp SYN

Our events carry no flow hash, so `flow` is always 0x0. `-o json` prints one JSON object per line.
Only one monitor can read a node's events at a time (the perf slots are per CPU); a second one is
refused. On exit the slots are removed again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pycilium.bpf.maps.defines import d, reason_text
from pycilium.bpf.maps.events import MonitorEvent
from pycilium.bpf.maps.packing import packer
from pycilium.cli.errors import CliError
from pycilium.cli.maps import open_map
from pycilium.cli.output import note, proto_name, tcp_flags_text

EVENTS_MAP = "events"
EVENT = packer(MonitorEvent, {"saddr": "4s", "daddr": "4s"}, skip=("pad",))

EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT = d("EVENT_DROP"), d("EVENT_TRACE"), d("EVENT_POLICY_VERDICT")
TYPE_NAMES = {EVENT_DROP: "drop", EVENT_TRACE: "trace", EVENT_POLICY_VERDICT: "policy-verdict"}
# Source file ids (FILE_* in bpf/lib/common.h; a test keeps them in sync).
FILES = {1: "bpf_lxc.c", 2: "bpf_host.c", 3: "bpf_xdp.c", 4: "bpf_sock.c", 5: "bpf_overlay.c"}
CT_STATES = {d("CT_NEW"): "new", d("CT_ESTABLISHED"): "established", d("CT_REPLY"): "reply",
             d("CT_RELATED"): "related", d("CT_REOPENED"): "reopened"}  # fmt: skip
TRACE_POINTS = {
    d("TRACE_FROM_LXC"): "<- endpoint {ep}",
    d("TRACE_TO_LXC"): "-> endpoint {ep}",
    d("TRACE_FROM_NETDEV"): "<- network",
    d("TRACE_TO_NETDEV"): "-> network",
    d("TRACE_TO_STACK"): "-> stack",
}
POLICY_ALLOWED = d("REASON_POLICY_ALLOWED")
ICMP = 1


def decode(raw: bytes, cpu: int = 0) -> dict[str, Any] | None:
    """A monitor_event as a dict (None when the sample is too short to be one)."""
    if len(raw) < EVENT.size:
        return None
    (etype, subtype, source, ifindex, src_label, dst_label, orig_len, saddr, daddr, sport, dport, proto,
     tcp_flags, ct_state, egress, line, file_id, ktime_ns) = EVENT.unpack_from(raw)  # fmt: skip
    ev: dict[str, Any] = {
        "type": TYPE_NAMES.get(etype, f"type-{etype}"),
        "cpu": cpu,
        "subtype": subtype,
        "source": source,
        "ifindex": ifindex,
        "src_label": src_label,
        "dst_label": dst_label,
        "orig_len": orig_len,
        "src": socket.inet_ntoa(saddr),
        "sport": socket.ntohs(sport),
        "dst": socket.inet_ntoa(daddr),
        "dport": socket.ntohs(dport),
        "proto": proto,
        "proto_name": proto_name(proto),
        "tcp_flags": tcp_flags,
        "tcp_flags_text": tcp_flags_text(tcp_flags) if proto == 6 else "",
        "ct_state": CT_STATES.get(ct_state, str(ct_state)),
        "direction": "egress" if egress else "ingress",
        "file": FILES.get(file_id, f"file-{file_id}"),
        "line": line,
        "ktime_ns": ktime_ns,
    }
    if etype == EVENT_DROP:
        ev["reason"] = reason_text(subtype)
    elif etype == EVENT_POLICY_VERDICT:
        ev["action"] = "allow" if subtype == POLICY_ALLOWED else "deny"
        if subtype != POLICY_ALLOWED:
            ev["reason"] = reason_text(subtype)
        ev["remote_identity"] = dst_label if egress else src_label
    elif etype == EVENT_TRACE:
        ev["observation_point"] = TRACE_POINTS.get(subtype, f"trace-point-{subtype}").format(ep=source)
    ev["summary"] = format_event(ev)
    return ev


def _tuple(ev: dict[str, Any]) -> str:
    p = ev["proto"]
    if p == ICMP:
        return f"{ev['src']} -> {ev['dst']} icmp"
    text = f"{ev['src']}:{ev['sport']} -> {ev['dst']}:{ev['dport']} {proto_name(p).lower()}"
    if ev["tcp_flags_text"]:
        text += f" {ev['tcp_flags_text']}"
    return text


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)


def format_event(ev: dict[str, Any]) -> str:
    t = ev["type"]
    ident = f"identity {ev['src_label']}->{ev['dst_label']}"
    if t == "drop":
        return (
            f"xx drop ({ev['reason']}) flow 0x0 to endpoint {ev['source']}, ifindex {ev['ifindex']}, "
            f"file {ev['file']}:{ev['line']}, , {ident}: {_tuple(ev)}"
        )
    if t == "trace":
        where = f" ifindex {_ifname(ev['ifindex'])}" if ev["ifindex"] else ""
        return (
            f"{ev['observation_point']} flow 0x0 , {ident} state {ev['ct_state']}{where} "
            f"orig-ip {ev['src']}: {_tuple(ev)}"
        )
    if t == "policy-verdict":
        action = ev["action"] + (f" ({ev['reason']})" if ev.get("reason") else "")
        return (
            f"Policy verdict log: flow 0x0, local EP ID {ev['source']}, remote ID {ev['remote_identity']}, "
            f"proto {ev['proto']}, {ev['direction']}, action {action}, {_tuple(ev)}"
        )
    return f"{t}: {ident}: {_tuple(ev)}"


@contextlib.contextmanager
def _monitor_lock(bpf_root: str) -> Iterator[None]:
    """One monitor per node (per bpf root): the perf slots are per CPU, a second reader would steal them."""
    tag = hashlib.sha1(os.path.abspath(bpf_root).encode()).hexdigest()[:12]
    lock_dir = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(tempfile.gettempdir())
    path = lock_dir / f"pycilium-monitor-{tag}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CliError(
                f"another pycilium monitor (pid {other}) is reading the events of {bpf_root}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class _Stop(Exception):
    pass


def _wanted(ev: dict[str, Any], types: set[str] | None, related: set[int] | None) -> bool:
    if types is not None and ev["type"] not in types:
        return False
    return related is None or ev["source"] in related


def cmd_monitor(args: argparse.Namespace) -> int:
    from pycilium.cli.perf import PerfError, PerfReader

    types = set(args.types) if args.types else None
    related = set(args.related_to) if args.related_to else None
    as_json = args.output == "json"
    out: TextIO = sys.stdout
    limit = args.count
    seen = 0

    def on_sample(cpu: int, raw: bytes) -> None:
        nonlocal seen
        ev = decode(raw, cpu)
        if ev is None or not _wanted(ev, types, related):
            return
        out.write((json.dumps(ev) if as_json else ev["summary"]) + "\n")
        out.flush()
        seen += 1
        if limit and seen >= limit:
            raise _Stop

    def on_lost(cpu: int, lost: int) -> None:
        note(f"CPU {cpu:02d}: lost {lost} events")

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    events = open_map(EVENTS_MAP, args.bpf_root)
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with _monitor_lock(args.bpf_root):
            try:
                reader = PerfReader(events.fd)
            except (PerfError, OSError) as e:
                raise CliError(f"cannot open perf buffers for {events.path}: {e.strerror or e}") from None
            try:
                note(f"Listening for events on {len(reader.rings)} CPUs with {reader.pages}x{reader.page} "
                     "of shared memory")  # fmt: skip
                note("Press Ctrl-C to quit")
                while not stopping:
                    reader.poll(on_sample, on_lost, timeout=0.25)
            except (_Stop, KeyboardInterrupt):
                pass
            except BrokenPipeError:
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            finally:
                reader.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
        events.close()
    return 0
