"""Connection-rate client for the datapath benchmarks: open, request, read, close, in timed rounds.

`python -m bench.connrate --round-seconds S --rounds R HOST[,HOST...]:PORT ...` measures each
target for S seconds, round after round, alternating the order of the targets every round, and
prints {"rates": [[conn/s of target 0, target 1, ...] per round], "errors": [per target]}. A target
with several hosts spreads its connections over them in turn (a direct baseline over the same
backends a VIP spreads over, so both sides keep the same number of server processes busy).

Measuring the targets of a comparison interleaved in short rounds, in one process, makes the
per-round ratios immune to slow drifts of a shared machine's load (a neighbour's job starting in
the middle of a long sequential run would otherwise land entirely on one side of the ratio).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time

# Close with RST (SO_LINGER 0): no TIME_WAIT on either side, so later runs reusing client ports
# through a NAT never collide with a backend's TIME_WAIT socket of an earlier run.
_LINGER0 = struct.pack("ii", 1, 0)


Target = tuple[list[str], int]


def one_round(target: Target, seconds: float) -> tuple[float, int]:
    """Connections per second to `target` for `seconds`, and the failed attempts."""
    hosts, port = target
    addrs = [(h, port) for h in hosts]
    conns = errors = i = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        addr = addrs[i % len(addrs)]
        i += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        s.settimeout(2)
        try:
            s.connect(addr)
            s.sendall(b"x")
            if s.recv(256):
                conns += 1
            else:
                errors += 1
        except OSError:
            errors += 1
        finally:
            s.close()
    return conns / (time.monotonic() - t0), errors


def run(targets: list[Target], round_seconds: float, rounds: int) -> dict[str, list]:  # type: ignore[type-arg]
    rates: list[list[float]] = []
    errors = [0] * len(targets)
    for r in range(rounds):
        row = [0.0] * len(targets)
        order = list(range(len(targets)))
        if r % 2:
            order.reverse()  # neither side always runs first in a round
        for i in order:
            row[i], e = one_round(targets[i], round_seconds)
            errors[i] += e
        rates.append(row)
    return {"rates": rates, "errors": errors}


def _target(s: str) -> Target:
    hosts, _, port = s.rpartition(":")
    return hosts.split(","), int(port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("targets", nargs="+", type=_target, metavar="HOST[,HOST...]:PORT")
    a = ap.parse_args()
    print(json.dumps(run(a.targets, a.round_seconds, a.rounds)))
