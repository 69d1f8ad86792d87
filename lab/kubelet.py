"""The lab's kubelet: turns the Pods bound to one node into network namespaces with a pod server.

For every Pod with spec.nodeName == NODE (watched with a field selector):

1. create a network namespace for it (`ip netns add`, named from the pod's uid: see `pod_netns`);
2. run the CNI plugins of the node's configuration exactly as a container runtime does: the first
   configuration file (by name) in the node's CNI conf dir; for each plugin of the list, the plugin
   entry with `cniVersion` and `name` (and `prevResult` when chained) on stdin, and only the CNI
   variables in the environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS with
   K8S_POD_NAMESPACE/K8S_POD_NAME/K8S_POD_INFRA_CONTAINER_ID/K8S_POD_UID, CNI_PATH; no PATH);
3. start `pycilium.lab.podserver` in the namespace with every declared containerPort (TCP, UDP);
4. once it listens, patch pods/status (phase Running, podIP(s), hostIP(s), conditions Ready ...).

A Pod with `spec.hostNetwork: true` gets no namespace and no CNI call: its server runs in the node's
own namespace (the kubelet's) on its containerPorts, and its podIP(s) and hostIP are the node IP.
Like the kubelet's NodePorts admission, a host-network pod whose port (and protocol) is already
used on the node, by another host-network pod or by anything listening there, is rejected: phase
Failed, reason `NodePorts`, and it is never started (the pod that got the port keeps it).

A Pod that goes away is stopped: the server is killed, CNI DEL runs (plugins in reverse order, with
the ADD result as prevResult), the namespace is deleted. A graceful deletion (the Pod gets a
deletionTimestamp) first lets the pod drain like an application that finishes its work after
SIGTERM: it keeps serving for `--drain-seconds` (default 1, at most the pod's
terminationGracePeriodSeconds) while its endpoints are `terminating`, then it is stopped and the
deletion is completed with gracePeriodSeconds=0.

What runs is recorded in `<state-dir>/kubelet.json`, so a restarted kubelet adopts its pods (and
restarts a dead pod server) instead of recreating them, and `lab down` can find every namespace
and process even when the kubelet is gone. Every pod is looked at again every 10 s besides its
watch events, so a pod server that died is restarted. SIGTERM stops the kubelet and leaves the pods running.

    python -m pycilium.lab.kubelet --node NODE --kubeconfig KC --node-ip IP --cni-conf-dir DIR
        --cni-bin-dir DIR --state-dir DIR --netns-prefix PREFIX [--drain-seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pycilium.agent.k8s.reflector import Handlers, Reflector
from pycilium.lab.cluster.kube import POD, APIError, Kube, Obj
from pycilium.lab.manifests import ContainerPort, container_ports

log = logging.getLogger("pycilium.lab.kubelet")

CONF_SUFFIXES = (".conflist", ".conf", ".json")
IFNAME = "eth0"


def pod_netns(prefix: str, uid: str) -> str:
    """The network namespace of a pod (lab-wide unique: pod uids are)."""
    return f"{prefix}-pod-{uid.replace('-', '')[:12]}"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- CNI, the way a runtime calls it -----------------------------------------------------------


class CNIError(RuntimeError):
    def __init__(self, msg: str, code: int | None = None):
        super().__init__(msg)
        self.code = code


def load_netconf(conf_dir: str) -> Obj | None:
    """The network configuration list a runtime would use: the first file (by name) in the dir;
    a single-plugin .conf becomes a one-plugin list. None when there is none yet."""
    d = Path(conf_dir)
    if not d.is_dir():
        return None
    for f in sorted(d.iterdir()):
        if f.suffix not in CONF_SUFFIXES or f.name.startswith(".") or not f.is_file():
            continue
        try:
            conf = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable CNI configuration %s: %s", f, e)
            continue
        if "plugins" in conf:
            return dict(conf)
        if "type" in conf:
            return {
                "cniVersion": conf.get("cniVersion", "1.0.0"),
                "name": conf.get("name", ""),
                "plugins": [conf],
            }
    return None


def cni_env(command: str, container_id: str, netns_path: str, pod: Obj, bin_dir: str) -> dict[str, str]:
    meta = pod.get("metadata") or {}
    args = (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={meta.get('namespace', 'default')};"
        f"K8S_POD_NAME={meta.get('name', '')};K8S_POD_INFRA_CONTAINER_ID={container_id};"
        f"K8S_POD_UID={meta.get('uid', '')}"
    )
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": IFNAME,
        "CNI_ARGS": args,
        "CNI_PATH": bin_dir,
    }


def plugin_config(netconf: Obj, plugin: Obj, prev_result: Obj | None) -> Obj:
    conf = dict(plugin)
    conf["cniVersion"] = netconf.get("cniVersion", "1.0.0")
    conf["name"] = netconf.get("name", "")
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


def exec_plugin(bin_dir: str, plugin_type: str, env: dict[str, str], conf: Obj, timeout: float = 60) -> Obj:
    """Run one plugin; its JSON result (empty dict for no output); CNIError on failure."""
    path = os.path.join(bin_dir, plugin_type)
    if not os.access(path, os.X_OK):
        raise CNIError(f"CNI plugin {plugin_type!r} not found in {bin_dir}")
    try:
        p = subprocess.run(
            [path], env=env, input=json.dumps(conf).encode(), capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise CNIError(
            f"CNI plugin {plugin_type} {env['CNI_COMMAND']} timed out after {timeout:.0f}s"
        ) from None
    out = p.stdout.decode(errors="replace").strip()
    try:
        res = json.loads(out) if out else {}
    except ValueError:
        res = {"msg": out[:500]}
    if p.returncode != 0:
        msg = res.get("msg") or p.stderr.decode(errors="replace").strip() or f"exit code {p.returncode}"
        details = f" ({res['details']})" if res.get("details") else ""
        raise CNIError(f"CNI {env['CNI_COMMAND']} failed: {msg}{details}", res.get("code"))
    return res if isinstance(res, dict) else {}


def cni_add(netconf: Obj, bin_dir: str, env: dict[str, str]) -> Obj:
    result: Obj | None = None
    for plugin in netconf.get("plugins") or []:
        result = exec_plugin(bin_dir, plugin["type"], env, plugin_config(netconf, plugin, result))
    return result or {}


def cni_del(netconf: Obj, bin_dir: str, env: dict[str, str], prev_result: Obj | None) -> None:
    errors = []
    for plugin in reversed(netconf.get("plugins") or []):
        try:
            exec_plugin(bin_dir, plugin["type"], env, plugin_config(netconf, plugin, prev_result))
        except CNIError as e:
            errors.append(str(e))
    if errors:
        raise CNIError("; ".join(errors))


def result_ipv4(result: Obj) -> str | None:
    for ipc in result.get("ips") or []:
        addr = str(ipc.get("address") or "")
        if addr and ":" not in addr:
            return addr.split("/")[0]
    return None


# ---- the pod server ----------------------------------------------------------------------------


def server_command(name: str, ports: list[ContainerPort]) -> list[str]:
    cmd = [sys.executable, "-m", "pycilium.lab.podserver", "--name", name]
    for p in sorted(set(ports), key=lambda p: (p.protocol, p.port)):
        if p.protocol == "TCP":
            cmd += ["--tcp", str(p.port)]
        elif p.protocol == "UDP":
            cmd += ["--udp", str(p.port)]
    return cmd


def listening_ports(proc_net: str, state: str) -> set[int]:
    """Local ports of the sockets in `state` ("0A": TCP LISTEN, "07": UDP unconnected) of a
    /proc/net/{tcp,udp} table."""
    ports: set[int] = set()
    for line in proc_net.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == state:
            ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def listening(pid: int) -> tuple[set[int], set[int]]:
    """TCP and UDP ports a process's network namespace listens on (from /proc/PID/net)."""
    out: list[set[int]] = []
    for table, state in (("tcp", "0A"), ("udp", "07")):
        try:
            text = Path(f"/proc/{pid}/net/{table}").read_text()
        except OSError:
            text = ""
        out.append(listening_ports(text, state))
    return out[0], out[1]


def alive(pid: int, marker: str) -> bool:
    """Is `pid` still the process we started (its command line contains `marker`)?"""
    try:
        cmdline = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") + " "
        )
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return marker in cmdline and ") Z" not in stat


def kill(pid: int, marker: str, timeout: float = 3.0) -> None:
    if not alive(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid, marker):
        time.sleep(0.05)
    if alive(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def netns_exists(name: str) -> bool:
    return bool(name) and os.path.exists(f"/var/run/netns/{name}")


def delete_netns(name: str) -> None:
    """Kill whatever still runs in the namespace, then delete it (no name: nothing to do)."""
    if not netns_exists(name):
        return
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def node_listening() -> tuple[set[int], set[int]]:
    """TCP and UDP ports (IPv4 and IPv6 sockets) listening in this process's network namespace."""
    out: list[set[int]] = []
    for tables, state in ((("tcp", "tcp6"), "0A"), (("udp", "udp6"), "07")):
        ports: set[int] = set()
        for table in tables:
            try:
                ports |= listening_ports(Path(f"/proc/self/net/{table}").read_text(), state)
            except OSError:
                pass
        out.append(ports)
    return out[0], out[1]


def host_port_conflict(
    ports: list[ContainerPort],
    others: list[PodRuntime],
    listening_tcp: set[int],
    listening_udp: set[int],
) -> str | None:
    """Why a host-network pod with `ports` cannot run on this node (None: it can). `others` are the
    node's host-network pods already admitted; `listening_*` what listens in the node's namespace."""
    for p in sorted(set(ports), key=lambda p: (p.protocol, p.port)):
        for o in others:
            if any(int(q[0]) == p.port and q[1] == p.protocol for q in o.ports):
                return f"{p.protocol}/{p.port} is used by pod {o.namespace}/{o.name}"
        if p.port in (listening_tcp if p.protocol == "TCP" else listening_udp if p.protocol == "UDP" else ()):
            return f"{p.protocol}/{p.port} is in use on the node"
    return None


# ---- state -------------------------------------------------------------------------------------


@dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    netns: str
    container_id: str
    ip: str = ""
    pid: int = 0
    ports: list[list[Any]] = field(default_factory=list)  # [port, protocol, name]
    result: Obj = field(default_factory=dict)
    started: str = ""
    host_network: bool = False  # no netns (netns ""), no CNI: the server runs in the node's namespace

    @property
    def marker(self) -> str:
        return f"pycilium.lab.podserver --name {self.name} "


def load_runtimes(path: Path) -> dict[str, PodRuntime]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {uid: PodRuntime(**r) for uid, r in (raw.get("pods") or {}).items()}


# ---- the kubelet -------------------------------------------------------------------------------


class Kubelet:
    def __init__(
        self,
        kube: Kube,
        node: str,
        node_ip: str,
        conf_dir: str,
        bin_dir: str,
        state_dir: str,
        netns_prefix: str,
        workers: int = 4,
        drain_seconds: float = 1.0,
        resync: float = 10.0,
    ) -> None:
        self.kube = kube
        self.node = node
        self.node_ip = node_ip
        self.conf_dir = conf_dir
        self.bin_dir = bin_dir
        self.state_dir = Path(state_dir)
        self.netns_prefix = netns_prefix
        self.drain_seconds = drain_seconds
        self.resync = resync
        self._terminating: dict[str, float] = {}
        self.state_file = self.state_dir / "kubelet.json"
        self.log_dir = self.state_dir / "pods"
        self.runtimes = load_runtimes(self.state_file)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._uid_locks: dict[str, threading.Lock] = {}
        self._queue: list[str] = []
        self._cv = threading.Condition()
        self._retry: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._admit_lock = threading.Lock()  # host ports: one host-network admission at a time
        self._rejected: set[str] = set()  # uids of pods refused at admission: never started
        self._threads: list[threading.Thread] = []
        self._workers = workers
        self.pods = Reflector(
            kube.api,
            POD,
            field_selector=f"spec.nodeName={node}",
            watch_timeout=(20.0, 40.0),
            name=f"kubelet-{node}-pods",
        )
        self.pods.add_handlers(
            Handlers(
                on_add=self._on_event, on_update=lambda _o, n: self._on_event(n), on_delete=self._on_event
            )
        )

    # -- queue -----------------------------------------------------------------------------------
    def _on_event(self, pod: Obj) -> None:
        uid = (pod.get("metadata") or {}).get("uid")
        if uid:
            self.enqueue(uid)

    def enqueue(self, uid: str, delay: float = 0.0) -> None:
        with self._cv:
            if delay > 0:
                self._retry[uid] = time.monotonic() + delay
            elif uid not in self._queue:
                self._queue.append(uid)
            self._cv.notify()

    def _next(self) -> str | None:
        with self._cv:
            while not self.stop_event.is_set():
                now = time.monotonic()
                for uid, t in list(self._retry.items()):
                    if t <= now:
                        del self._retry[uid]
                        if uid not in self._queue:
                            self._queue.append(uid)
                if self._queue:
                    return self._queue.pop(0)
                wait = min([t - now for t in self._retry.values()] + [1.0])
                self._cv.wait(max(0.01, wait))
            return None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pods.start()
        while not self.pods.wait_synced(5.0):
            if self.stop_event.is_set():
                return
            log.info("waiting for the API server")
        for uid in set(self.runtimes) | {self._uid(p) for p in self.pods.objects()}:
            self.enqueue(uid)
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"kubelet-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._resync, name="kubelet-resync", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("kubelet for %s started (%d pods adopted)", self.node, len(self.runtimes))

    def _resync(self) -> None:
        """Every `resync` seconds look at every pod again (a pod server that died is restarted)."""
        while not self.stop_event.wait(self.resync):
            for uid in set(self.runtimes) | {self._uid(p) for p in self.pods.objects()}:
                self.enqueue(uid)

    def stop(self) -> None:
        self.stop_event.set()
        with self._cv:
            self._cv.notify_all()
        self.pods.stop(timeout=2)
        for t in self._threads:
            t.join(5)

    @staticmethod
    def _uid(pod: Obj) -> str:
        return str((pod.get("metadata") or {}).get("uid") or "")

    def _work(self) -> None:
        while not self.stop_event.is_set():
            uid = self._next()
            if uid is None:
                return
            with self._lock:
                lock = self._uid_locks.setdefault(uid, threading.Lock())
            with lock:
                try:
                    self.sync(uid)
                    self._failures.pop(uid, None)
                except Exception as e:
                    n = self._failures.get(uid, 0) + 1
                    self._failures[uid] = n
                    delay = min(10.0, 0.5 * 2 ** min(n, 5))
                    if isinstance(e, (CNIError, APIError)):
                        log.warning("pod %s: %s; retrying in %.1fs", uid, e, delay)
                    else:
                        log.exception("pod %s: sync failed; retrying in %.1fs", uid, delay)
                    self.enqueue(uid, delay)

    def _pod_by_uid(self, uid: str) -> Obj | None:
        for p in self.pods.objects():
            if self._uid(p) == uid:
                return p
        return None

    def _save(self) -> None:
        with self._save_lock:  # workers save concurrently: one writer at a time
            with self._lock:
                data = {"node": self.node, "pods": {u: asdict(r) for u, r in self.runtimes.items()}}
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.state_file)

    # -- sync one pod ------------------------------------------------------------------------------
    def sync(self, uid: str) -> None:
        pod = self._pod_by_uid(uid)
        rt = self.runtimes.get(uid)
        meta = (pod or {}).get("metadata") or {}
        if pod is not None and meta.get("deletionTimestamp") and rt is not None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
            drain = self.drain_seconds if grace is None else min(self.drain_seconds, float(grace))
            first = self._terminating.setdefault(uid, time.monotonic())
            left = first + drain - time.monotonic()
            if left > 0:
                self.enqueue(uid, left)
                return
        if pod is None or meta.get("deletionTimestamp"):
            self._terminating.pop(uid, None)
            if rt is not None:
                self.teardown(rt)
            if pod is not None:
                # graceful deletion: the pod's processes are gone, let the object go
                self.kube.delete(POD, meta["name"], meta.get("namespace"), grace_period=0, uid=uid)
            return
        phase = (pod.get("status") or {}).get("phase")
        if rt is None:
            if phase in ("Succeeded", "Failed") or uid in self._rejected:
                return
            if (pod.get("spec") or {}).get("hostNetwork"):
                self.setup_host_network(pod)
            else:
                self.setup(pod)
            return
        if not rt.ip or (not rt.host_network and not netns_exists(rt.netns)):  # setup interrupted
            log.info("pod %s/%s: incomplete setup found; starting it again", rt.namespace, rt.name)
            self.teardown(rt)
            if rt.host_network:
                self.setup_host_network(pod)
            else:
                self.setup(pod)
            return
        # adopted or already running: restart a dead server, repair a status that lost our IP
        if rt.ports and not alive(rt.pid, rt.marker):
            log.info("pod %s/%s: server not running; restarting it", rt.namespace, rt.name)
            self._start_server(rt, pod)
            self._save()
        status = pod.get("status") or {}
        if status.get("podIP") != rt.ip or status.get("phase") != "Running":
            self._patch_running(pod, rt)

    def setup(self, pod: Obj) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta.get("namespace", "default"), meta["name"], meta["uid"]
        netconf = load_netconf(self.conf_dir)
        if netconf is None:
            self._patch_waiting(pod, "NetworkNotReady", "no CNI configuration yet (agent not ready?)")
            raise CNIError(f"no CNI configuration in {self.conf_dir} yet")
        ports = container_ports(pod)
        rt = PodRuntime(
            uid=uid,
            namespace=ns,
            name=name,
            netns=pod_netns(self.netns_prefix, uid),
            container_id=uuid.uuid4().hex + uuid.uuid4().hex,
            ports=[[p.port, p.protocol, p.name] for p in ports],
        )
        t0 = time.monotonic()
        if netns_exists(rt.netns):  # a leftover from a setup that did not complete
            delete_netns(rt.netns)
        subprocess.run(["ip", "netns", "add", rt.netns], check=True, capture_output=True)
        subprocess.run(
            ["ip", "netns", "exec", rt.netns, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
        )
        with self._lock:
            self.runtimes[uid] = rt
        self._save()
        env = cni_env("ADD", rt.container_id, f"/var/run/netns/{rt.netns}", pod, self.bin_dir)
        try:
            rt.result = cni_add(netconf, self.bin_dir, env)
            ip = result_ipv4(rt.result)
            if not ip:
                raise CNIError(f"CNI ADD returned no IPv4 address: {json.dumps(rt.result)[:300]}")
            rt.ip = ip
        except CNIError as e:
            self._patch_waiting(pod, "NetworkSetupFailed", str(e))
            self.teardown(rt)
            raise
        t_cni = time.monotonic() - t0
        self._start_server(rt, pod)
        rt.started = now_rfc3339()
        self._save()
        self._patch_running(pod, rt)
        log.info(
            "pod %s/%s running: %s in %s (cni %.0f ms, total %.0f ms)",
            ns,
            name,
            rt.ip,
            rt.netns,
            t_cni * 1000,
            (time.monotonic() - t0) * 1000,
        )

    def setup_host_network(self, pod: Obj) -> None:
        """A host-network pod: admitted if its ports are free on the node, then its server is
        started in the node's namespace; its IP is the node's."""
        meta = pod["metadata"]
        ns, name, uid = meta.get("namespace", "default"), meta["name"], meta["uid"]
        ports = container_ports(pod)
        rt = PodRuntime(
            uid=uid,
            namespace=ns,
            name=name,
            netns="",
            container_id=uuid.uuid4().hex + uuid.uuid4().hex,
            ports=[[p.port, p.protocol, p.name] for p in ports],
            host_network=True,
        )
        with self._admit_lock:
            with self._lock:
                others = [r for r in self.runtimes.values() if r.host_network and r.uid != uid]
            why = host_port_conflict(ports, others, *node_listening())
            if why is not None:
                message = (
                    f"Pod was rejected: node(s) didn't have free ports for the requested pod ports: {why}"
                )
                log.warning("pod %s/%s: %s", ns, name, message)
                self._patch_failed(pod, "NodePorts", message)
                self._rejected.add(uid)
                return
            rt.ip = self.node_ip
            with self._lock:
                self.runtimes[uid] = rt
        self._save()
        try:
            self._start_server(rt, pod)
        except Exception:
            self.teardown(rt)
            raise
        rt.started = now_rfc3339()
        self._save()
        self._patch_running(pod, rt)
        log.info("pod %s/%s running in the host network (%s)", ns, name, rt.ip)

    def _start_server(self, rt: PodRuntime, pod: Obj) -> None:
        ports = [ContainerPort(p[0], p[1], p[2]) for p in rt.ports]
        if not ports:
            rt.pid = 0
            return
        logf = open(self.log_dir / f"{rt.namespace}_{rt.name}.log", "ab")  # noqa: SIM115
        try:
            in_ns = [] if rt.host_network else ["ip", "netns", "exec", rt.netns]
            proc = subprocess.Popen(
                [*in_ns, *server_command(rt.name, ports)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
            )
        finally:
            logf.close()
        rt.pid = proc.pid
        want_tcp = {p.port for p in ports if p.protocol == "TCP"}
        want_udp = {p.port for p in ports if p.protocol == "UDP"}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pod server of {rt.namespace}/{rt.name} exited with {proc.returncode}")
            tcp, udp = listening(proc.pid)
            if want_tcp <= tcp and want_udp <= udp:
                return
            time.sleep(0.03)
        raise RuntimeError(f"pod server of {rt.namespace}/{rt.name} does not listen after 15s")

    def teardown(self, rt: PodRuntime) -> None:
        if rt.pid:
            kill(rt.pid, rt.marker)
        netconf = None if rt.host_network else load_netconf(self.conf_dir)
        if netconf is not None and rt.container_id:
            pod = {"metadata": {"namespace": rt.namespace, "name": rt.name, "uid": rt.uid}}
            env = cni_env("DEL", rt.container_id, f"/var/run/netns/{rt.netns}", pod, self.bin_dir)
            try:
                cni_del(netconf, self.bin_dir, env, rt.result or None)
            except CNIError as e:
                log.warning("pod %s/%s: %s (continuing)", rt.namespace, rt.name, e)
        delete_netns(rt.netns)
        with self._lock:
            self.runtimes.pop(rt.uid, None)
        self._save()
        log.info("pod %s/%s stopped (%s)", rt.namespace, rt.name, rt.ip or "no ip")

    # -- status ----------------------------------------------------------------------------------
    def _patch_running(self, pod: Obj, rt: PodRuntime) -> None:
        meta = pod["metadata"]
        ts = rt.started or now_rfc3339()
        conds = [
            {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": ts}
            for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        containers = (pod.get("spec") or {}).get("containers") or []
        statuses = [
            {
                "name": c.get("name", f"c{i}"),
                "image": c.get("image", ""),
                "imageID": "",
                "containerID": f"pycilium-lab://{rt.container_id}",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": ts}},
            }
            for i, c in enumerate(containers)
        ]
        status = {
            "phase": "Running",
            "podIP": rt.ip,
            "podIPs": [{"ip": rt.ip}],
            "hostIP": self.node_ip,
            "hostIPs": [{"ip": self.node_ip}],
            "startTime": ts,
            "conditions": conds,
            "containerStatuses": statuses,
        }
        try:
            self.kube.patch(POD, meta["name"], {"status": status}, meta.get("namespace"), status=True)
        except APIError as e:
            if e.status != 404:
                raise

    def _patch_failed(self, pod: Obj, reason: str, message: str) -> None:
        """A pod the kubelet refuses to run (admission): phase Failed with the reason, for good."""
        meta = pod["metadata"]
        ts = now_rfc3339()
        status = {
            "phase": "Failed",
            "reason": reason,
            "message": message[:500],
            "conditions": [
                {"type": "Ready", "status": "False", "reason": reason, "lastProbeTime": None,
                 "lastTransitionTime": ts},
                {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": ts},
            ],
        }  # fmt: skip
        try:
            self.kube.patch(POD, meta["name"], {"status": status}, meta.get("namespace"), status=True)
        except APIError as e:
            if e.status != 404:
                raise

    def _patch_waiting(self, pod: Obj, reason: str, message: str) -> None:
        meta = pod["metadata"]
        ts = now_rfc3339()
        conds = [
            {
                "type": "Ready",
                "status": "False",
                "reason": reason,
                "message": message[:500],
                "lastProbeTime": None,
                "lastTransitionTime": ts,
            },
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": ts},
        ]
        with contextlib.suppress(APIError):
            self.kube.patch(
                POD,
                meta["name"],
                {"status": {"phase": "Pending", "conditions": conds}},
                meta.get("namespace"),
                status=True,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pycilium.lab.kubelet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--node", required=True)
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--node-ip", required=True)
    ap.add_argument("--cni-conf-dir", required=True)
    ap.add_argument("--cni-bin-dir", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--netns-prefix", required=True)
    ap.add_argument("--drain-seconds", type=float, default=1.0, help="how long a deleted pod keeps serving")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    kube = Kube(a.kubeconfig, user_agent=f"pycilium-lab-kubelet/{a.node}")
    kubelet = Kubelet(
        kube,
        a.node,
        a.node_ip,
        a.cni_conf_dir,
        a.cni_bin_dir,
        a.state_dir,
        a.netns_prefix,
        drain_seconds=a.drain_seconds,
    )
    threading.Thread(target=kubelet.start, daemon=True).start()
    done.wait()
    kubelet.stop()
    kube.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
