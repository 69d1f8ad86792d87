"""A one-node CNI test bed: a netns acting as the node, the agent's CNI API + endpoint manager in-process.

The agent's threads run inside the node netns (they inherit it from the thread that starts them),
so nothing is ever created in the host's own network namespace. Pods are network namespaces the
test creates; the real `pycilium-cni` (as installed by `install_cni_binary`) is run the way a
container runtime runs it: CNI_* variables only, the conflist entry on stdin.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycilium.agent.cniapi import CNIServer, conflist, install_cni_binary
from pycilium.agent.config import AgentConfig
from pycilium.agent.endpoint import EndpointDatapath, EndpointManager
from pycilium.agent.ipam import HostScopeIPAM
from pycilium.bpf.loader import open_pinned_maps, remove_pin_root
from pycilium.lab.netns import Topology, in_netns, run

__test__ = False


@dataclass
class CNIResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def code(self) -> int | None:
        j = self.json
        return j.get("code") if isinstance(j, dict) else None


def ip_json(netns: str, *args: str) -> Any:
    return json.loads(run(["ip", "-j", *args], netns=netns).stdout or "[]")


def ping(netns: str, dst: str) -> bool:
    return run(["ping", "-c1", "-W2", "-q", dst], netns=netns, check=False).returncode == 0


class Node:
    """Node netns + temp state + pinned maps + IPAM + EndpointManager + CNIServer + installed plugin."""

    def __init__(self, pod_cidr: str = "10.77.1.0/24", datapath: EndpointDatapath | None = None,
                 pin_root: str | None = None):  # fmt: skip
        self.topo = Topology()
        self.tag = uuid.uuid4().hex[:6]
        self.tmp = Path(tempfile.mkdtemp(prefix="pyc-cni-"))
        self.own_pin_root = pin_root is None
        self.pin_root = pin_root or f"/sys/fs/bpf/pyc-test-{self.tag}"
        self.name = f"pcnode{self.tag}"
        self.pod_cidr = pod_cidr
        self.datapath = datapath
        self.config = AgentConfig(
            state_dir=str(self.tmp / "state"),
            cni_socket_path=str(self.tmp / "run" / "cni.sock"),
            cni_bin_dir=str(self.tmp / "bin"),
            cni_conf_dir=str(self.tmp / "net.d"),
            cni_log_file=str(self.tmp / "cni.log"),
            bpf_root=self.pin_root,
            pod_cidr=pod_cidr,
            mtu=1450,
        )
        self.server: CNIServer | None = None
        self.manager: EndpointManager
        self.ipam: HostScopeIPAM
        self._pods: list[str] = []
        try:
            for fd in open_pinned_maps(self.pin_root, {}).values():
                os.close(fd)
            self.topo.add_netns(self.name)
            router = str(ipaddress.IPv4Network(pod_cidr)[1])
            run(["ip", "addr", "add", f"{router}/32", "dev", "lo"], netns=self.name)
            self.router_ip = router
            self.binary = str(install_cni_binary(self.config))
            net = conflist(self.config)
            self.netconf: dict[str, Any] = dict(
                net["plugins"][0], cniVersion=net["cniVersion"], name=net["name"]
            )
            self.start()
        except BaseException:
            self.close()
            raise

    # ---- agent lifecycle -----------------------------------------------------------------------
    def start(self, *, restore: bool = True) -> None:
        with in_netns(self.name):
            self.ipam = HostScopeIPAM(Path(self.config.state_dir) / "ipam.json", self.pod_cidr)
            self.manager = EndpointManager.from_config(self.config, self.ipam, self.datapath)
            if restore:
                self.manager.restore()
            self.server = CNIServer.from_config(self.config, self.manager)
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run manager calls made in this block inside the node netns."""
        with in_netns(self.name):
            yield

    # ---- pods and the plugin -------------------------------------------------------------------
    def pod(self) -> str:
        name = f"pcpod{uuid.uuid4().hex[:8]}"
        self.topo.add_netns(name)
        self._pods.append(name)
        return name

    def cni(self, command: str, container_id: str = "", netns: str | None = None, *, ifname: str = "eth0",
            conf: dict[str, Any] | None = None, stdin: bytes | None = None, env: dict[str, str] | None = None,
            pod_name: str = "", binary: str | None = None) -> CNIResult:  # fmt: skip
        e = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"}
        if container_id:
            e["CNI_CONTAINERID"] = container_id
            e["CNI_IFNAME"] = ifname
            e["CNI_ARGS"] = (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_name or container_id[:12]}"
            )
        if netns is not None:
            e["CNI_NETNS"] = netns if netns.startswith("/") else f"/var/run/netns/{netns}"
        e.update(env or {})
        data = stdin if stdin is not None else json.dumps(conf if conf is not None else self.netconf).encode()
        p = subprocess.run([binary or self.binary], env=e, input=data, capture_output=True, timeout=60)
        return CNIResult(p.returncode, p.stdout.decode(), p.stderr.decode())

    def node_links(self) -> list[str]:
        return [link["ifname"] for link in ip_json(self.name, "link")]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.topo.close()
        if self.own_pin_root:
            remove_pin_root(self.pin_root)
        shutil.rmtree(self.tmp, ignore_errors=True)


def new_container_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex
