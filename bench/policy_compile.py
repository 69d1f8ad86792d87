"""How fast NetworkPolicies become policy map entries (in memory: compile + diff, no kernel).

Builds a cluster of N pods in several namespaces (a fraction on this node as local endpoints) and
M NetworkPolicies mixing pod/namespace selectors, ipBlocks, port ranges and named ports; times
the initial sync (every local endpoint computed), then incremental events: a pod of a new
identity appearing, a policy update, a namespace relabel.

    .venv/bin/python -m bench.policy_compile [--pods 5000] [--policies 200] [--local 100]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from pycilium.agent.identity.backend import MemoryIdentityBackend
from pycilium.agent.ipcache.datapath import MemoryIPCacheDatapath
from pycilium.agent.policy.controlplane import PolicyControlPlane
from pycilium.agent.policy.datapath import MemoryPolicyDatapath

NODE = "bench-node"


def pod(i: int, ns: str, app: str, node: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": ns,
            "name": f"p{i}",
            "uid": f"u{i}",
            "labels": {"app": app, "tier": f"t{i % 3}"},
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", "phase": "Running"},
    }


def policy(j: int, ns: str, rnd: random.Random) -> dict[str, Any]:
    app = f"app{rnd.randrange(50)}"
    peers: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {"app": f"app{rnd.randrange(50)}"}}},
        {"namespaceSelector": {"matchLabels": {"team": f"team{rnd.randrange(5)}"}},
         "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0", "t1"]}]}},
        {"ipBlock": {"cidr": f"172.{16 + j % 16}.0.0/16", "except": [f"172.{16 + j % 16}.{j % 256}.0/24"]}},
    ]  # fmt: skip
    ports = [
        {"port": 80},
        {"port": 30000 + j, "endPort": 30000 + j + rnd.randrange(1, 2000)},
        {"port": "http"},
    ]
    return {
        "metadata": {"namespace": ns, "name": f"np{j}"},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": peers, "ports": ports}],
            "egress": [{"to": peers[:2], "ports": ports}],
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--policies", type=int, default=200)
    ap.add_argument("--local", type=int, default=100)
    ap.add_argument("--namespaces", type=int, default=10)
    args = ap.parse_args()
    rnd = random.Random(1)
    dp = MemoryPolicyDatapath()
    cp = PolicyControlPlane(node_name=NODE, identity_backend=MemoryIdentityBackend(), policy_datapath=dp,
                            ipcache_datapath=MemoryIPCacheDatapath())  # fmt: skip
    namespaces = [f"ns{k}" for k in range(args.namespaces)]
    t0 = time.perf_counter()
    for k, ns in enumerate(namespaces):
        cp.upsert_namespace({"metadata": {"name": ns, "labels": {"team": f"team{k % 5}"}}})
    local = []
    for i in range(args.pods):
        ns = namespaces[i % len(namespaces)]
        is_local = i < args.local
        obj = pod(i, ns, f"app{rnd.randrange(50)}", NODE if is_local else "other")
        cp.upsert_pod(obj)
        if is_local:
            local.append((i, obj))
    for j in range(args.policies):
        cp.upsert_policy(policy(j, namespaces[j % len(namespaces)], rnd))
    for i, obj in local:
        ip = obj["status"]["podIP"]
        dp.add_endpoint(ip)
        cp.endpoint_added(i + 1, ip, obj["metadata"]["namespace"], obj["metadata"]["name"])
    t1 = time.perf_counter()
    cp.mark_synced()
    t2 = time.perf_counter()
    entries = sum(len(v) for v in dp.entries.values())
    print(
        f"load {args.pods} pods, {args.policies} policies: {t1 - t0:.2f}s; identities {len(cp.identities())}"
    )
    print(f"initial sync of {len(local)} endpoints: {t2 - t1:.3f}s, {entries} policy entries")

    def timed(label: str, fn: Any) -> None:
        before = len(dp.ops)
        t = time.perf_counter()
        fn()
        print(f"{label}: {(time.perf_counter() - t) * 1000:.1f} ms, {len(dp.ops) - before} map ops")

    timed("new pod with a new identity", lambda: cp.upsert_pod(pod(10**6, "ns0", "app7-new", "other")))
    timed("policy update", lambda: cp.upsert_policy(policy(0, namespaces[0], random.Random(99))))
    timed(
        "namespace relabel",
        lambda: cp.upsert_namespace({"metadata": {"name": "ns1", "labels": {"team": "x"}}}),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
