"""The multi-node lab: namespaces, the API endpoint, agents, kubelets and controllers.

Layout (every address lives inside namespaces the lab creates; the host's network is not touched):

    <inst>-underlay   bridge br0 192.168.200.1/24; the API server listens here on :6443
      ├─ veth ─ <inst>-node1   eth0 192.168.200.11  agent + kubelet, pods 10.200.1.0/24
      ├─ veth ─ <inst>-node2   eth0 192.168.200.12  agent + kubelet, pods 10.200.2.0/24
      └─ veth ─ <inst>-world   eth0 192.168.200.100 answers on TCP/UDP 8080 (no route to pods)

`<inst>` is the instance name (`pycilium-lab`, or $PYCILIUM_LAB_NAME, which the e2e suite uses so it
never collides with a lab someone left running). What `up` creates is recorded in
/var/run/<inst>/state.json as it goes, so `down` removes exactly that, even after a failed `up`;
`down` also sweeps the namespaces that follow the lab's naming scheme.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pycilium.lab import netns
from pycilium.lab.apiserver import write_kubeconfig

DEFAULT_INSTANCE = "pycilium-lab"
RUN_DIR = Path("/var/run")
BPF_DIR = Path("/sys/fs/bpf")
UNDERLAY_NET = "192.168.200"
BRIDGE_IP = f"{UNDERLAY_NET}.1"
WORLD_IP = f"{UNDERLAY_NET}.100"
API_PORT = 6443
WORLD_PORT = 8080
CLUSTER_CIDR = "10.200.0.0/16"
HEALTH_PORT = 9879
PROMETHEUS_PORT = 9962
LAB_NODE_LABEL = "lab.pycilium.io/node"
MAX_NODES = 80


class LabError(RuntimeError):
    pass


def instance_name() -> str:
    name = os.environ.get("PYCILIUM_LAB_NAME") or DEFAULT_INSTANCE
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
        raise LabError(f"PYCILIUM_LAB_NAME must be lowercase letters, digits and '-': {name!r}")
    return name


def node_name(i: int) -> str:
    return f"node{i}"


def node_ip(i: int) -> str:
    return f"{UNDERLAY_NET}.{10 + i}"


def node_pod_cidr(i: int) -> str:
    return f"10.200.{i}.0/24"


def progress(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


# ---- paths and recorded state -------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    instance: str

    @property
    def root(self) -> Path:
        return RUN_DIR / self.instance

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def api_state(self) -> Path:
        return self.root / "apiserver-state.json"

    @property
    def api_info(self) -> Path:
        return self.root / "apiserver-info.json"

    @property
    def kubeconfig(self) -> Path:
        """For the host (kubectl, the lab CLI, the controllers)."""
        return self.root / "kubeconfig"

    @property
    def node_kubeconfig(self) -> Path:
        """For processes inside the node namespaces (agents, kubelets)."""
        return self.root / "kubeconfig.nodes"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def bpf_root(self) -> Path:
        return BPF_DIR / self.instance

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def node_bpf_root(self, node: str) -> str:
        return str(self.bpf_root / node)

    def agent_socket(self, node: str) -> str:
        return str(self.node_dir(node) / "pycilium.sock")

    def netns(self, role: str) -> str:
        return f"{self.instance}-{role}"

    @property
    def pod_netns_prefix(self) -> str:
        return self.instance

    def owns_netns(self, name: str) -> bool:
        pat = rf"{re.escape(self.instance)}-(underlay|world|node\d+|pod-[0-9a-f]{{12}})"
        return re.fullmatch(pat, name) is not None


@dataclass
class Proc:
    pid: int
    marker: str  # a substring of its command line, to never signal a recycled PID
    log: str = ""

    def alive(self) -> bool:
        return proc_alive(self.pid, self.marker)


@dataclass
class NodeState:
    name: str
    index: int
    ip: str
    pod_cidr: str
    netns: str


@dataclass
class LabState:
    instance: str
    nodes: list[NodeState] = field(default_factory=list)
    external_kubeconfig: str | None = None
    routing_mode: str = "native"  # the agents' routing-mode
    api_url: str = ""  # as reached from inside the namespaces
    host_url: str = ""  # as reached from the host
    netns: list[str] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    complete: bool = False

    def save(self, paths: Paths) -> None:
        paths.root.mkdir(parents=True, exist_ok=True)
        tmp = paths.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, paths.state_file)

    @classmethod
    def load(cls, paths: Paths) -> LabState | None:
        try:
            raw = json.loads(paths.state_file.read_text())
        except (OSError, ValueError):
            return None
        raw["nodes"] = [NodeState(**n) for n in raw.get("nodes") or []]
        raw["procs"] = {k: Proc(**v) for k, v in (raw.get("procs") or {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def node(self, name: str) -> NodeState | None:
        return next((n for n in self.nodes if n.name == name), None)


# ---- processes ----------------------------------------------------------------------------------


def proc_alive(pid: int, marker: str) -> bool:
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return marker in cmdline and ") Z" not in stat


def stop_proc(p: Proc, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only if the PID is still that process."""
    if not p.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.alive():
        time.sleep(0.05)
    if p.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        for _ in range(40):
            if not p.alive():
                break
            time.sleep(0.05)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the lab's processes: the caller's without PYCILIUM_* (an agent would read
    them as configuration) and without a KUBECONFIG of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCILIUM_") and k != "KUBECONFIG"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = (
        bindir + ":" + env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    )
    env.update(extra or {})
    return env


def spawn(cmd: list[str], log: Path, marker: str, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True, env=env or child_env()
        )
    return Proc(p.pid, marker, str(log))


def nsexec(ns: str, cmd: list[str], *, net_only: bool = False) -> list[str]:
    """`cmd` run in netns `ns` with the host's bpffs visible (see nsexec.py)."""
    return [
        sys.executable,
        "-m",
        "pycilium.lab.cluster.nsexec",
        *(["--net-only"] if net_only else []),
        ns,
        "--",
        *cmd,
    ]


def tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "pycilium-agent"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pycilium.agent.main import main; sys.exit(main())"]


def agent_healthy(ns: str, port: int = HEALTH_PORT, timeout: float = 1.0) -> bool:
    """GET http://127.0.0.1:<port>/healthz inside the node's namespace."""
    if not netns.netns_exists(ns):
        return False
    try:
        with (
            netns.in_netns(ns),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r,
        ):
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


# ---- kubeconfigs --------------------------------------------------------------------------------

_FILE_KEYS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


def external_target(kubeconfig: str) -> tuple[str, int, str, dict[str, Any]]:
    """(host, port, scheme, minified config) of a kubeconfig's current context."""
    cfg = yaml.safe_load(Path(kubeconfig).read_text()) or {}
    ctx_name = cfg.get("current-context")
    ctx = next((c["context"] for c in cfg.get("contexts") or [] if c.get("name") == ctx_name), None)
    if ctx is None:
        raise LabError(f"{kubeconfig}: no current context")
    cluster = next((c for c in cfg.get("clusters") or [] if c.get("name") == ctx.get("cluster")), None)
    no_user: dict[str, Any] = {"name": "none", "user": {}}
    user = next((u for u in cfg.get("users") or [] if u.get("name") == ctx.get("user")), no_user)
    if cluster is None:
        raise LabError(f"{kubeconfig}: context {ctx_name!r} names no known cluster")
    base = Path(kubeconfig).resolve().parent
    sections: list[dict[str, Any]] = [cluster.get("cluster") or {}, user.get("user") or {}]
    for section in sections:
        for key in _FILE_KEYS:
            if isinstance(section.get(key), str) and not os.path.isabs(section[key]):
                section[key] = str(base / section[key])
    server = str((cluster.get("cluster") or {}).get("server") or "")
    m = re.fullmatch(r"(https?)://(\[[^\]]+\]|[^:/]+)(?::(\d+))?/?", server)
    if not m:
        raise LabError(f"{kubeconfig}: cannot read the server URL {server!r}")
    scheme, host = m.group(1), m.group(2).strip("[]")
    port = int(m.group(3) or (443 if scheme == "https" else 80))
    mini: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [user],
        "contexts": [{"name": ctx_name, "context": ctx}],
        "current-context": ctx_name,
        "preferences": {},
    }
    return host, port, scheme, mini


def write_node_kubeconfig_for_external(kubeconfig: str, out: Path) -> tuple[str, int]:
    """A copy of the external kubeconfig whose server is the lab's proxy in the underlay."""
    host, port, scheme, mini = external_target(kubeconfig)
    c = mini["clusters"][0]["cluster"]
    c["server"] = f"{scheme}://{BRIDGE_IP}:{API_PORT}"
    if scheme == "https" and not c.get("tls-server-name") and not c.get("insecure-skip-tls-verify"):
        c["tls-server-name"] = host
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(mini, f, sort_keys=False)
    return host, port


# ---- the lab --------------------------------------------------------------------------------------


class Lab:
    def __init__(self, instance: str | None = None) -> None:
        self.paths = Paths(instance or instance_name())
        self.state = LabState.load(self.paths) or LabState(self.paths.instance)
        self._restart_controllers = False

    @property
    def exists(self) -> bool:
        return self.paths.state_file.exists()

    def host_kubeconfig(self) -> str:
        return self.state.external_kubeconfig or str(self.paths.kubeconfig)

    def kube(self) -> Any:
        from pycilium.lab.cluster.kube import Kube

        kc = self.host_kubeconfig()
        if not os.path.exists(kc):
            raise LabError("the lab is not up (no kubeconfig); run `pycilium lab up`")
        return Kube(kc)

    def _save(self) -> None:
        self.state.save(self.paths)

    # -- up ------------------------------------------------------------------------------------------
    def up(
        self,
        nodes: int | None = None,
        kubeconfig: str | None = None,
        timeout: float = 300.0,
        say: Callable[[str], None] = progress,
        routing_mode: str | None = None,
    ) -> None:
        """Create what is missing. Without `nodes`/`kubeconfig`, a lab that exists keeps its size and
        API server (2 nodes and the embedded server for a new one)."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, BPF)")
        st = self.state
        running = self.exists and bool(st.procs or st.netns)
        if nodes is None:
            nodes = max(len(st.nodes), 1) if running and st.nodes else 2
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be between 1 and {MAX_NODES}")
        ext = str(Path(kubeconfig).resolve()) if kubeconfig else (st.external_kubeconfig if running else None)
        if ext and not os.path.exists(ext):
            raise LabError(f"kubeconfig {ext} does not exist")
        if running and st.external_kubeconfig != ext:
            have = st.external_kubeconfig or "the embedded API server"
            raise LabError(f"the lab is up with {have}; run `pycilium lab down` first")
        if len(st.nodes) > nodes:
            raise LabError(f"the lab is up with {len(st.nodes)} nodes; run `pycilium lab down` to shrink it")
        mode = routing_mode or (st.routing_mode if running else "native")
        if mode not in ("native", "tunnel"):
            raise LabError(f"--routing-mode must be native or tunnel, not {mode!r}")
        if running and st.routing_mode != mode:
            raise LabError(f"the lab is up with {st.routing_mode} routing; run `pycilium lab down` first")
        st.routing_mode = mode
        st.external_kubeconfig = ext
        st.complete = False
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._save()
        t0 = time.monotonic()
        say(f"network: underlay bridge, {nodes} node namespace(s), world ({self.paths.instance}-*)")
        self._network(nodes)
        say("API server: " + ("proxy to " + ext if ext else "embedded"))
        self._api(say)
        kube = self.kube()
        try:
            self._wait_api(kube, 30.0)
            say("registering nodes")
            self._register_nodes(kube)
        finally:
            kube.close()
        self._world()
        say("controllers (scheduler, deployments, endpointslices)")
        self._controllers()
        say("starting agents and kubelets")
        for n in st.nodes:
            self._agent(n)
            self._kubelet(n)
        self._wait_agents(timeout - (time.monotonic() - t0), say)
        st.complete = True
        self._save()
        say(f"up in {time.monotonic() - t0:.1f}s; kubeconfig: {ext or self.paths.kubeconfig}")

    def _add_netns(self, name: str) -> None:
        if not netns.netns_exists(name):
            netns.ip("netns", "add", name)
        if name not in self.state.netns:
            self.state.netns.append(name)
            self._save()
        netns.ip("link", "set", "lo", "up", netns=name)

    def _network(self, nodes: int) -> None:
        ul = self.paths.netns("underlay")
        self._add_netns(ul)
        if not _has_link(ul, "br0"):
            netns.ip("link", "add", "br0", "type", "bridge", netns=ul)
            netns.ip("addr", "add", f"{BRIDGE_IP}/24", "dev", "br0", netns=ul)
            netns.ip("link", "set", "br0", "up", netns=ul)
        ends: list[tuple[str, str, str]] = [(self.paths.netns("world"), "world", WORLD_IP)]
        for i in range(1, nodes + 1):
            name = node_name(i)
            ns = self.paths.netns(name)
            if self.state.node(name) is None:
                self.state.nodes.append(NodeState(name, i, node_ip(i), node_pod_cidr(i), ns))
            ends.append((ns, f"n{i}", node_ip(i)))
        self._save()
        for ns, port, ip in ends:
            self._add_netns(ns)
            if _has_link(ns, "eth0"):
                continue
            netns.ip("link", "del", port, netns=ul, check=False)  # a half-created pair
            # created directly in the two namespaces: nothing ever appears in the host's
            netns.ip("link", "add", port, "netns", ul, "type", "veth", "peer", "name", "eth0", "netns", ns)
            netns.ip("link", "set", port, "master", "br0", "up", netns=ul)
            netns.ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=ns)
            netns.ip("link", "set", "eth0", "up", netns=ns)
            if ns != self.paths.netns("world"):
                netns.run(
                    [
                        "sysctl",
                        "-qw",
                        "net.ipv4.ip_forward=1",
                        "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.default.rp_filter=0",
                        "net.ipv4.conf.eth0.rp_filter=0",
                    ],
                    netns=ns,
                )

    def _api(self, say: Callable[[str], None]) -> None:
        st, paths = self.state, self.paths
        p = st.procs.get("apiserver")
        if p is not None and p.alive() and paths.api_info.exists():
            return
        paths.api_info.unlink(missing_ok=True)
        ul = paths.netns("underlay")
        if st.external_kubeconfig:
            host, port = write_node_kubeconfig_for_external(st.external_kubeconfig, paths.node_kubeconfig)
            cmd = [
                sys.executable,
                "-m",
                "pycilium.lab.cluster.apiproc",
                "proxy",
                "--netns",
                ul,
                "--listen",
                f"{BRIDGE_IP}:{API_PORT}",
                "--target",
                f"{host}:{port}",
                "--info",
                str(paths.api_info),
            ]
        else:
            # it advertises the address the nodes use: default/kubernetes -> 192.168.200.1:6443
            cmd = [sys.executable, "-m", "pycilium.lab.cluster.apiproc", "serve", "--netns", ul, "--listen",
                   f"{BRIDGE_IP}:{API_PORT}", "--advertise", f"{BRIDGE_IP}:{API_PORT}", "--state",
                   str(paths.api_state), "--info", str(paths.api_info)]  # fmt: skip
        # a restarted server keeps its loopback port when it can, so kubeconfigs out there stay valid
        old_port = st.host_url.rpartition(":")[2] if st.host_url and not st.external_kubeconfig else ""
        attempts = [[*cmd, "--loopback-port", old_port], cmd] if old_port.isdigit() else [cmd]
        for i, attempt in enumerate(attempts):
            st.procs["apiserver"] = proc = spawn(
                attempt, paths.logs / "apiserver.log", f"--info {paths.api_info}"
            )
            self._save()
            deadline = time.monotonic() + 30
            while not paths.api_info.exists():
                if not proc.alive() or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if paths.api_info.exists():
                break
            stop_proc(proc, 1.0)
            if i == len(attempts) - 1:
                raise LabError(f"the API endpoint did not start; log {proc.log}:\n{tail(proc.log)}")
        info = json.loads(paths.api_info.read_text())
        if st.host_url and info["host_url"] != st.host_url and not st.external_kubeconfig:
            self._restart_controllers = True
        if st.external_kubeconfig:
            st.api_url = f"(proxy {BRIDGE_IP}:{API_PORT})"
            st.host_url = info["host_url"]
        else:
            st.api_url, st.host_url = info["url"], info["host_url"]
            write_kubeconfig(paths.kubeconfig, st.host_url)
            write_kubeconfig(paths.node_kubeconfig, st.api_url)
        self._save()

    @staticmethod
    def _wait_api(kube: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                kube.request("GET", "/version")
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise LabError(f"the API server does not answer: {e}") from e
                time.sleep(0.2)

    def _register_nodes(self, kube: Any) -> None:
        from pycilium.lab.cluster.kube import NODE

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for n in self.state.nodes:
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": n.name,
                    "labels": {
                        LAB_NODE_LABEL: self.paths.instance,
                        "kubernetes.io/hostname": n.name,
                        "kubernetes.io/os": "linux",
                    },
                },
                "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
            }
            cur = kube.get(NODE, n.name)
            if cur is None:
                kube.create(NODE, body)
            elif (cur.get("spec") or {}).get("podCIDR") != n.pod_cidr:
                body["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                kube.replace(NODE, body)
            status = {
                "addresses": [
                    {"type": "InternalIP", "address": n.ip},
                    {"type": "Hostname", "address": n.name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "pycilium lab node",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.31.0-pycilium-lab",
                    "operatingSystem": "linux",
                    "architecture": os.uname().machine,
                },
            }
            kube.patch(NODE, n.name, {"status": status}, status=True)

    def _world(self) -> None:
        p = self.state.procs.get("world")
        if p is not None and p.alive():
            return
        ns = self.paths.netns("world")
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "pycilium.lab.podserver",
            "--name",
            "world",
            "--tcp",
            str(WORLD_PORT),
            "--udp",
            str(WORLD_PORT),
        ]
        self.state.procs["world"] = spawn(
            cmd, self.paths.logs / "world.log", "pycilium.lab.podserver --name world"
        )
        self._save()

    def _controllers(self) -> None:
        p = self.state.procs.get("controllers")
        if p is not None and p.alive():
            if not self._restart_controllers:
                return
            stop_proc(p)  # it was talking to the previous API endpoint
        self._restart_controllers = False
        kc = self.host_kubeconfig()
        cmd = [sys.executable, "-m", "pycilium.lab.controllers", "--kubeconfig", kc]
        self.state.procs["controllers"] = spawn(
            cmd, self.paths.logs / "controllers.log", f"pycilium.lab.controllers --kubeconfig {kc}"
        )
        self._save()

    def agent_settings(self, n: NodeState) -> dict[str, str]:
        d = self.paths.node_dir(n.name)
        return {
            "node-name": n.name,
            "kubeconfig": str(self.paths.node_kubeconfig),
            "bpf-root": self.paths.node_bpf_root(n.name),
            "state-dir": str(d),
            "socket-path": self.paths.agent_socket(n.name),
            "cni-socket-path": str(d / "cni.sock"),
            "cni-conf-dir": str(d / "net.d"),
            "cni-bin-dir": str(d / "bin"),
            "cni-log-file": str(d / "cni.log"),
            "devices": "eth0",
            "node-ip": n.ip,
            "routing-mode": self.state.routing_mode,
            "cluster-pool-ipv4-cidr": CLUSTER_CIDR,
            "ipam-mode": "kubernetes",
            "health-port": str(HEALTH_PORT),
            "prometheus-serve-port": str(PROMETHEUS_PORT),
        }

    def _agent(self, n: NodeState) -> None:
        role = f"agent-{n.name}"
        p = self.state.procs.get(role)
        if p is not None and p.alive():
            return
        settings = self.agent_settings(n)
        Path(settings["state-dir"]).mkdir(parents=True, exist_ok=True)
        # what a deployment's installer does (the Helm chart): put the plugin into the node's bin dir
        from types import SimpleNamespace

        from pycilium.agent.cniapi.install import install_cni_binary

        install_cni_binary(SimpleNamespace(cni_bin_dir=settings["cni-bin-dir"]))
        cmd = agent_command()
        for k, v in settings.items():
            cmd += ["--set", f"{k}={v}"]
        self.state.procs[role] = spawn(
            nsexec(n.netns, cmd),
            self.paths.logs / f"agent-{n.name}.log",
            f"state-dir={settings['state-dir']} ",
        )
        self._save()

    def _kubelet(self, n: NodeState) -> None:
        role = f"kubelet-{n.name}"
        p = self.state.procs.get(role)
        if p is not None and p.alive():
            return
        d = self.paths.node_dir(n.name)
        cmd = [
            sys.executable,
            "-m",
            "pycilium.lab.kubelet",
            "--node",
            n.name,
            "--kubeconfig",
            str(self.paths.node_kubeconfig),
            "--node-ip",
            n.ip,
            "--cni-conf-dir",
            str(d / "net.d"),
            "--cni-bin-dir",
            str(d / "bin"),
            "--state-dir",
            str(d / "kubelet"),
            "--netns-prefix",
            self.paths.pod_netns_prefix,
        ]
        self.state.procs[role] = spawn(
            nsexec(n.netns, cmd, net_only=True),
            self.paths.logs / f"kubelet-{n.name}.log",
            f"--state-dir {d / 'kubelet'} ",
        )
        self._save()

    def _wait_agents(self, timeout: float, say: Callable[[str], None]) -> None:
        deadline = time.monotonic() + max(timeout, 10.0)
        pending = [n.name for n in self.state.nodes]
        last = ""
        while pending:
            for name in list(pending):
                n = self.state.node(name)
                assert n is not None
                if agent_healthy(n.netns):
                    pending.remove(name)
                    say(f"agent on {name} is healthy")
                    continue
                p = self.state.procs.get(f"agent-{name}")
                if p is None or not p.alive():
                    log = p.log if p else "?"
                    raise LabError(f"the agent on {name} exited; last lines of {log}:\n{tail(log)}")
            if not pending:
                break
            msg = f"waiting for agents: {', '.join(pending)}"
            if msg != last:
                say(msg)
                last = msg
            if time.monotonic() > deadline:
                p = self.state.procs.get(f"agent-{pending[0]}")
                log = p.log if p else "?"
                raise LabError(
                    f"agents not healthy in time: {', '.join(pending)}; last lines of {log}:\n{tail(log)}"
                )
            time.sleep(0.3)

    # -- down ----------------------------------------------------------------------------------------
    def down(self, say: Callable[[str], None] = progress) -> None:
        st, paths = self.state, self.paths
        # external API server: remove the Node objects this lab registered (best effort)
        if st.external_kubeconfig and os.path.exists(st.external_kubeconfig):
            with contextlib.suppress(Exception):
                from pycilium.lab.cluster.kube import NODE, Kube

                kube = Kube(st.external_kubeconfig)
                for n in st.nodes:
                    kube.delete(NODE, n.name)
                kube.close()
        order = ["controllers"] + [r for r in st.procs if r.startswith("kubelet-")]
        order += [r for r in st.procs if r.startswith("agent-")] + ["world", "apiserver"]
        order += [r for r in st.procs if r not in order]
        for role in order:
            p = st.procs.get(role)
            if p is not None and p.alive():
                say(f"stopping {role} (pid {p.pid})")
                stop_proc(p)
        # pods: what the kubelets recorded, then anything named like a pod of this lab
        from pycilium.lab.kubelet import delete_netns, kill, load_runtimes

        for kf in sorted(paths.root.glob("*/kubelet/kubelet.json")):
            for rt in load_runtimes(kf).values():
                if rt.pid:
                    kill(rt.pid, rt.marker, timeout=1.0)
                delete_netns(rt.netns)
        existing = netns.run(["ip", "netns", "list"], check=False).stdout.split("\n")
        names = [line.split()[0] for line in existing if line.strip()]
        sweep = [n for n in names if paths.owns_netns(n)]
        recorded = [n for n in st.netns if netns.netns_exists(n)]
        todo = [n for n in sweep if "-pod-" in n] + [n for n in reversed(recorded) if n not in sweep]
        todo += [n for n in sweep if "-pod-" not in n and n not in todo]
        if todo:
            say(f"removing {len(todo)} network namespace(s)")
        for ns in todo:
            delete_netns(ns)
        detach_sock_programs(paths.bpf_root)
        remove_tree(paths.bpf_root)
        shutil.rmtree(paths.root, ignore_errors=True)
        self.state = LabState(paths.instance)

    # -- queries -------------------------------------------------------------------------------------
    def agent_health(self) -> dict[str, bool]:
        return {n.name: agent_healthy(n.netns, timeout=0.5) for n in self.state.nodes}


def detach_sock_programs(bpf_root: Path) -> None:
    """Detach each node's socket load-balancing programs from the cgroup v2 root. The agent leaves
    them attached when it stops (like its TC programs), but these are attached host-wide: without
    this they would outlive the node, holding its maps, after the pins are gone."""
    if not bpf_root.is_dir():
        return
    from pycilium.bpf.cgroup import detach_node_sock_programs

    for node_root in sorted(p for p in bpf_root.iterdir() if p.is_dir()):
        with contextlib.suppress(OSError):
            detach_node_sock_programs(str(node_root))


def _has_link(ns: str, dev: str) -> bool:
    return netns.ip("link", "show", "dev", dev, netns=ns, check=False).returncode == 0


def remove_tree(root: Path) -> None:
    """Remove a bpffs directory tree (pinned maps and programs, then the directories)."""
    if not root.exists():
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dirpath, f))
        for d in dirnames:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(dirpath, d))
    with contextlib.suppress(OSError):
        root.rmdir()
