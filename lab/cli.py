"""`pycilium lab`: a kind-like multi-node cluster on this machine, made of network namespaces.

Commands:
  up [--nodes N] [--kubeconfig PATH]   create (or complete) the lab; returns when every agent is healthy
  down                                 remove everything the lab created
  status [-o json]                     nodes, world, pods, services, API server
  kubeconfig                           print the path of a kubeconfig for the lab's API server
  apply -f FILE [--wait]               create/update the objects of a (multi-document) YAML file
  delete -f FILE [--wait]              delete them
  exec TARGET -- CMD...                run CMD in NS/POD, NODE or world (exit code passed through)
  probe --from NS/POD|world --to HOST:PORT [--proto tcp|udp] [--timeout S] [-o json]

Exit codes: 0 ok; 1 failed (probe: no reply; apply --wait: timed out); 2 bad usage or lab not up.
$PYCILIUM_LAB_NAME selects another lab instance (default pycilium-lab).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pycilium.lab.cluster.lab import (
    HEALTH_PORT,
    WORLD_IP,
    WORLD_PORT,
    Lab,
    LabError,
    agent_healthy,
    nsexec,
    progress,
)


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pycilium lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", help="create the lab (idempotent)")
    p.add_argument("--nodes", type=int, help="number of nodes (default: 2, or as many as the lab has)")
    p.add_argument(
        "--kubeconfig",
        help="use this existing API server instead of the embedded one "
        "(default: the embedded one, or the one the lab already uses)",
    )
    p.add_argument(
        "--routing-mode",
        choices=["native", "tunnel"],
        help="how pod traffic crosses nodes: routes via node IPs (native) or VXLAN (tunnel) "
        "(default: native, or what the lab already uses)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for healthy agents")
    sub.add_parser("down", help="remove everything the lab created")
    p = sub.add_parser("status", help="show the lab")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    sub.add_parser("kubeconfig", help="print the path of the lab's kubeconfig")
    for name in ("apply", "delete"):
        p = sub.add_parser(name, help=f"{name} the objects of a YAML file")
        p.add_argument("-f", "--filename", required=True, action="append", help="YAML file, directory or -")
        p.add_argument(
            "--wait",
            action="store_true",
            help="apply: until pods run and agents programmed them; delete: until pods are gone",
        )
        p.add_argument("--timeout", type=float, default=120.0)
    p = sub.add_parser("exec", help="run a command in NS/POD, NODE or world")
    p.add_argument("target")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("probe", help="connect from a pod (or world) and report ok/refused/timeout")
    p.add_argument("--from", dest="source", required=True, help="NS/POD, world or NODE")
    p.add_argument("--to", required=True, help="HOST:PORT")
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--count", type=int, default=1, help="attempts (each reported)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command](args))
    except UsageError as e:
        print(f"pycilium lab: {e}", file=sys.stderr)
        return 2
    except LabError as e:
        print(f"pycilium lab: {e}", file=sys.stderr)
        return 1 if args.command == "up" else 2
    except KeyboardInterrupt:
        return 130


def _up_lab() -> Lab:
    lab = Lab()
    if not lab.exists:
        raise UsageError("the lab is not up; run `pycilium lab up`")
    return lab


# ---- commands --------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab()
    try:
        lab.up(
            nodes=args.nodes, kubeconfig=args.kubeconfig, routing_mode=args.routing_mode, timeout=args.timeout
        )
    except LabError as e:
        print(f"pycilium lab up: {e}", file=sys.stderr)
        if lab.exists and not lab.state.complete:
            print("(what was created stays recorded: `pycilium lab down` removes it)", file=sys.stderr)
        return 1
    print(f"lab is up: {len(lab.state.nodes)} node(s), {lab.state.routing_mode} routing; world {WORLD_IP} "
          f"(TCP/UDP {WORLD_PORT})")  # fmt: skip
    print(f"  kubectl --kubeconfig {lab.host_kubeconfig()} get nodes")
    print("  pycilium lab status | apply -f FILE --wait | probe --from NS/POD --to HOST:PORT | down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = Lab()
    lab.down()
    progress("down")
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    lab = _up_lab()
    print(lab.host_kubeconfig())
    return 0


def _api_view(lab: Lab) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    from pycilium.lab.cluster.kube import POD, SERVICE

    try:
        kube = lab.kube()
    except LabError as e:
        return [], [], str(e)
    try:
        pods = [
            {
                "namespace": p["metadata"].get("namespace"),
                "name": p["metadata"]["name"],
                "node": (p.get("spec") or {}).get("nodeName") or "",
                "ip": (p.get("status") or {}).get("podIP") or "",
                "phase": "Terminating"
                if p["metadata"].get("deletionTimestamp")
                else (p.get("status") or {}).get("phase", "Pending"),
            }
            for p in kube.list(POD)
        ]
        services = []
        for s in kube.list(SERVICE):
            spec = s.get("spec") or {}
            ports = [
                {
                    "name": p.get("name") or "",
                    "port": p.get("port"),
                    "protocol": p.get("protocol") or "TCP",
                    "targetPort": p.get("targetPort"),
                    "nodePort": p.get("nodePort"),
                }
                for p in spec.get("ports") or []
            ]
            services.append(
                {
                    "namespace": s["metadata"].get("namespace"),
                    "name": s["metadata"]["name"],
                    "type": spec.get("type", "ClusterIP"),
                    "clusterIP": spec.get("clusterIP") or "",
                    "ports": ports,
                }
            )
        return pods, services, ""
    except Exception as e:
        return [], [], f"API server not reachable: {e}"
    finally:
        kube.close()


def cmd_status(args: argparse.Namespace) -> int:
    lab = _up_lab()
    st = lab.state
    pods, services, err = _api_view(lab)
    nodes: list[dict[str, Any]] = [
        {
            "name": n.name,
            "ip": n.ip,
            "podCIDR": n.pod_cidr,
            "netns": n.netns,
            "agent": {
                "healthy": agent_healthy(n.netns, HEALTH_PORT, 0.5),
                "pid": st.procs[f"agent-{n.name}"].pid if f"agent-{n.name}" in st.procs else None,
                "bpfRoot": lab.paths.node_bpf_root(n.name),
                "socket": lab.paths.agent_socket(n.name),
            },
        }
        for n in st.nodes
    ]
    data: dict[str, Any] = {
        "instance": st.instance,
        "complete": st.complete,
        "routingMode": st.routing_mode,
        "apiServer": {
            "url": st.host_url,
            "inNamespaces": st.api_url,
            "kubeconfig": lab.host_kubeconfig(),
            "external": st.external_kubeconfig is not None,
        },
        "nodes": nodes,
        "world": {"netns": lab.paths.netns("world"), "ip": WORLD_IP, "port": WORLD_PORT},
        "processes": {
            role: {"pid": p.pid, "running": p.alive(), "log": p.log} for role, p in st.procs.items()
        },
        "pods": pods,
        "services": services,
    }
    if err:
        data["error"] = err
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(f"lab {st.instance}{'' if st.complete else ' (incomplete: run `pycilium lab up` again)'}")
    print(f"API server   {st.host_url} (host), {st.api_url} (namespaces); kubeconfig {lab.host_kubeconfig()}")
    print(f"routing      {st.routing_mode}")
    _table(
        ["NODE", "NODE-IP", "POD-CIDR", "AGENT", "NETNS"],
        [
            [
                n["name"],
                n["ip"],
                n["podCIDR"],
                "healthy" if n["agent"]["healthy"] else "NOT HEALTHY",
                n["netns"],
            ]
            for n in nodes
        ],
    )
    print(f"world        {WORLD_IP} (netns {lab.paths.netns('world')}, TCP/UDP {WORLD_PORT})")
    dead = [r for r, p in data["processes"].items() if not p["running"]]
    if dead:
        print(f"NOT RUNNING: {', '.join(dead)}")
    if err:
        print(err)
        return 0
    print()
    _table(
        ["NAMESPACE", "POD", "NODE", "IP", "PHASE"],
        [[p["namespace"], p["name"], p["node"], p["ip"], p["phase"]] for p in pods],
    )
    print()
    _table(
        ["NAMESPACE", "SERVICE", "TYPE", "CLUSTER-IP", "PORTS"],
        [
            [
                s["namespace"],
                s["name"],
                s["type"],
                s["clusterIP"],
                ",".join(
                    f"{p['port']}{':' + str(p['nodePort']) if p['nodePort'] else ''}/{p['protocol']}"
                    for p in s["ports"]
                ),
            ]
            for s in services
        ],
    )
    return 0


def _table(head: list[str], rows: list[list[Any]]) -> None:
    cells = [head] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _apply_or_delete(args: argparse.Namespace) -> int:
    from pycilium.lab import manifests
    from pycilium.lab.cluster.wait import Targets, wait

    lab = _up_lab()
    objs = []
    try:
        for f in args.filename:
            objs.extend(manifests.load(f))
    except manifests.ManifestError as e:
        raise UsageError(str(e)) from None
    kube = lab.kube()
    try:
        try:
            outcomes = (manifests.apply if args.command == "apply" else manifests.delete)(kube, objs)
        except KeyError as e:
            raise UsageError(str(e.args[0])) from None
        except Exception as e:  # an API error: say which and stop
            print(f"pycilium lab {args.command}: {e}", file=sys.stderr)
            return 1
        for o in outcomes:
            print(o)
            for w in o.warnings:
                print(f"warning: {w}", file=sys.stderr)
        if not args.wait:
            return 0
        if args.command == "apply":
            roots = {n.name: lab.paths.node_bpf_root(n.name) for n in lab.state.nodes}
            ok = wait(kube, Targets.of([o.obj for o in outcomes]), roots, args.timeout, progress)
        else:
            ok = _wait_gone(kube, [o.obj for o in outcomes], args.timeout)
        return 0 if ok else 1
    finally:
        kube.close()


def _wait_gone(kube: Any, objs: list[dict[str, Any]], timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    for o in objs:
        res = kube.resource(o["apiVersion"], o["kind"])
        meta = o["metadata"]
        while kube.get(res, meta["name"], meta.get("namespace") if res.namespaced else None) is not None:
            if time.monotonic() > deadline:
                progress(f"timed out waiting for {o['kind']} {meta['name']} to go")
                return False
            time.sleep(0.2)
    return True


def resolve_target(lab: Lab, target: str) -> tuple[str, str]:
    """(kind, netns) of NS/POD, NODE or world."""
    from pycilium.lab.cluster.kube import POD
    from pycilium.lab.kubelet import pod_netns

    if target == "world":
        return "world", lab.paths.netns("world")
    if "/" not in target:
        n = lab.state.node(target)
        if n is None:
            names = ", ".join(n.name for n in lab.state.nodes)
            raise UsageError(f"unknown target {target!r}: want NAMESPACE/POD, world or a node ({names})")
        return "node", n.netns
    ns, _, name = target.partition("/")
    kube = lab.kube()
    try:
        pod = kube.get(POD, name, ns)
    finally:
        kube.close()
    if pod is None:
        raise UsageError(f"pod {ns}/{name} not found")
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if spec.get("hostNetwork"):  # its processes run in its node's namespace
        node = lab.state.node(str(spec.get("nodeName") or ""))
        if node is None or status.get("phase") != "Running":
            raise UsageError(f"pod {ns}/{name} is not running (phase {status.get('phase')})")
        return "pod", node.netns
    netns_name = pod_netns(lab.paths.pod_netns_prefix, pod["metadata"]["uid"])
    if not os.path.exists(f"/var/run/netns/{netns_name}"):
        raise UsageError(f"pod {ns}/{name} is not running (phase {(pod.get('status') or {}).get('phase')})")
    return "pod", netns_name


def exec_argv(
    lab: Lab, kind: str, ns: str, cmd: list[str], node: str = ""
) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = (
        bindir + ":" + env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    )
    if kind == "node":
        env["PYCILIUM_BPF_ROOT"] = lab.paths.node_bpf_root(node)
        env["PYCILIUM_SOCKET"] = lab.paths.agent_socket(node)
        env["KUBECONFIG"] = str(lab.paths.node_kubeconfig)
        return nsexec(ns, cmd), env
    return ["ip", "netns", "exec", ns, *cmd], env


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("usage: pycilium lab exec NS/POD|NODE|world -- CMD [ARG ...]")
    lab = _up_lab()
    kind, ns = resolve_target(lab, args.target)
    argv, env = exec_argv(lab, kind, ns, cmd, args.target)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 127  # not reached


def cmd_probe(args: argparse.Namespace) -> int:
    import subprocess

    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--to wants HOST:PORT, got {args.to!r}")
    lab = _up_lab()
    _, ns = resolve_target(lab, args.source)
    cmd = [
        sys.executable,
        "-m",
        "pycilium.lab.probe",
        host,
        port,
        "--proto",
        args.proto,
        "--timeout",
        str(args.timeout),
        "--count",
        str(max(1, args.count)),
    ]
    p = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd],
        capture_output=True,
        text=True,
        timeout=args.timeout * max(1, args.count) + 30,
    )
    results = []
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            pod, _, client = str(r.get("reply") or "").partition(" ")
            results.append(
                {
                    "result": r["result"],
                    "from": args.source,
                    "to": args.to,
                    "proto": args.proto,
                    "pod": pod if r["result"] == "ok" else "",
                    "client": client if r["result"] == "ok" else "",
                    "reply": r.get("reply", ""),
                }
            )
    if not results:
        print(f"pycilium lab probe: the probe failed: {p.stderr.strip()}", file=sys.stderr)
        return 1
    for r in results:
        if args.output == "json":
            print(json.dumps(r))
        elif r["result"] == "ok":
            print(f"ok: {r['pod']} answered, it saw the client as {r['client']}")
        else:
            print(r["result"])
    return 0 if all(r["result"] == "ok" for r in results) else 1


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "kubeconfig": cmd_kubeconfig,
    "apply": _apply_or_delete,
    "delete": _apply_or_delete,
    "exec": cmd_exec,
    "probe": cmd_probe,
}
