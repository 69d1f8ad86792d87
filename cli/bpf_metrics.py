"""`pycilium bpf metrics list`: forward/drop counters by reason and direction, summed over CPUs.

REASON                  DIRECTION   PACKETS   BYTES
CIDR prefilter denied   INGRESS     2         84
"""

from __future__ import annotations

import argparse
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d, reason_text
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import print_json, print_table

METRICS_MAP = "metrics"
DIRECTIONS = {
    d("METRIC_DIR_INGRESS"): "INGRESS",
    d("METRIC_DIR_EGRESS"): "EGRESS",
    d("METRIC_DIR_SERVICE"): "SERVICE",
    d("METRIC_DIR_CT_TCP"): "CT-TCP",
    d("METRIC_DIR_CT_ANY"): "CT-ANY",
    d("METRIC_DIR_OVERLAY_TX"): "OVERLAY-TX",
    d("METRIC_DIR_OVERLAY_RX"): "OVERLAY-RX",
}


def _rows(bpf_root: str) -> list[dict[str, Any]]:
    with open_map(METRICS_MAP, bpf_root) as m:
        try:
            items = list(m.items_percpu())
        except sc.BPFError as e:
            raise bpf_error(e, f"reading {METRICS_MAP}") from None
    out = []
    for k, per_cpu in items:
        if not any(v.count for v in per_cpu):
            continue  # an unused slot of the per-CPU array
        out.append({
            "reason": k.reason,
            "reason_text": reason_text(k.reason),
            "direction": DIRECTIONS.get(k.dir, f"UNKNOWN({k.dir})"),
            "packets": sum(v.count for v in per_cpu),
            "bytes": sum(v.bytes for v in per_cpu),
        })  # fmt: skip
    out.sort(key=lambda r: (r["reason"], r["direction"]))
    return out


def cmd_list(args: argparse.Namespace) -> int:
    rows = _rows(args.bpf_root)
    if args.output == "json":
        print_json(rows)
        return 0
    if not rows:
        print("No entries found.")
        return 0
    print_table([["REASON", "DIRECTION", "PACKETS", "BYTES"],
                 *([r["reason_text"], r["direction"], str(r["packets"]), str(r["bytes"])] for r in rows)])  # fmt: skip
    return 0
