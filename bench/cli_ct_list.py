"""How long `pycilium bpf ct list global` takes over 100,000 conntrack entries (target: < 2 s).

Fills a private pinned ct4_global / ct_any4_global (under /sys/fs/bpf/pyc-bench-*, removed
afterwards) with N entries (90% TCP, 10% UDP), then runs the installed `pycilium` console script as
a subprocess, reading its whole output, a few times; prints the best and median wall time and the
line rate. Also times `-o json` and `ct flush global`. Needs root.

    .venv/bin/python -m bench.cli_ct_list [--entries 100000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pycilium.bpf import loader
from pycilium.bpf.maps import ALL_MAPS, BY_NAME, PinnedMap
from pycilium.bpf.maps.ctmap import Ct4Key, CtEntry
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16

PYCILIUM = str(Path(sys.executable).parent / "pycilium")


def fill(root: str, n: int) -> None:
    now = int(time.monotonic())
    tcp, udp = [], []
    for i in range(n):
        key = Ct4Key(ip_to_be32(f"10.{(i >> 16) & 0xFF}.{(i >> 8) & 0xFF}.{i & 0xFF}"), ip_to_be32("10.96.0.10"),
                     port_to_be16(32768 + i % 28000), port_to_be16(80 if i % 10 else 53), 6 if i % 10 else 17, 0)  # fmt: skip
        value = CtEntry(backend_id=i % 7, src_sec_id=12345, packets=i % 100, bytes=i * 60, lifetime=now + i % 8000,
                        flags=0x10, rev_nat_index=5, tx_flags_seen=0x1B, rx_flags_seen=0x1B)  # fmt: skip
        (tcp if i % 10 else udp).append((key, value))
    with PinnedMap(BY_NAME["ct4_global"], root) as m:
        m.update_batch(tcp)
    with PinnedMap(BY_NAME["ct_any4_global"], root) as m:
        m.update_batch(udp)


def timed(argv: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t, p.stdout.count(b"\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (pins maps under /sys/fs/bpf)", file=sys.stderr)
        return 2
    root = f"/sys/fs/bpf/pyc-bench-{uuid.uuid4().hex[:8]}"
    size = 1 << max(12, (args.entries * 2 - 1).bit_length())
    sizes = {spec.size_define: 4096 for spec in ALL_MAPS}
    sizes.update({"CT_MAP_SIZE_TCP": size, "CT_MAP_SIZE_ANY": size, "EVENTS_MAP_SIZE": 0})
    try:
        for fd in loader.open_pinned_maps(root, sizes).values():
            os.close(fd)
        t = time.perf_counter()
        fill(root, args.entries)
        print(f"filled {args.entries} entries in {time.perf_counter() - t:.2f} s")
        base = [PYCILIUM, "--bpf-root", root, "bpf", "ct"]
        results = [timed([*base, "list", "global"]) for _ in range(args.runs)]
        lines = results[0][1]
        assert lines == args.entries, f"expected {args.entries} lines, got {lines}"
        times = sorted(r[0] for r in results)
        print(f"pycilium bpf ct list global: {args.entries} entries: best {times[0]:.3f} s, "
              f"median {statistics.median(times):.3f} s ({args.entries / times[0]:,.0f} lines/s); "
              f"target < 2 s: {'OK' if times[0] < 2 else 'MISSED'}")  # fmt: skip
        jt, _ = timed([*base, "list", "global", "-d"])
        print(f"pycilium bpf ct list global -d: {jt:.3f} s")
        jt, _ = timed([*base, "list", "global", "-o", "json"])
        print(f"pycilium bpf ct list global -o json: {jt:.3f} s")
        ft, _ = timed([*base, "flush", "global"])
        print(f"pycilium bpf ct flush global: {ft:.3f} s")
    finally:
        loader.remove_pin_root(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
