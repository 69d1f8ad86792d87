"""`pycilium lab up --kubeconfig`: the same kubelet and controller roles against an API server the lab
did not start (here a separate pycilium.lab.apiserver process on the host's loopback, which the
node namespaces reach through the lab's proxy in the underlay)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import LAB_NAME, Lab

pytestmark = pytest.mark.e2e

APP = """
apiVersion: v1
kind: Namespace
metadata: {name: ext}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: ext}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ext}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ext}
spec: {containers: [{name: c}]}
"""


def sock_programs_of(pin_root: str | None) -> set[int]:
    """Ids of the socket LB programs attached to the cgroup v2 root (only those using the maps pinned
    under `pin_root`, when given)."""
    from pycilium.bpf import cgroup

    root = cgroup.cgroup2_root()
    if root is None:
        return set()
    owner = cgroup.node_map_ids(pin_root) if pin_root else set()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    out: set[int] = set()
    try:
        for _fn, at in cgroup.SOCK_HOOKS:
            for prog_id in cgroup.attached_programs(fd, at):
                if not pin_root:
                    out.add(prog_id)
                    continue
                pfd = cgroup._prog_fd_by_id(prog_id)
                if pfd is None:
                    continue
                try:
                    if owner & set(cgroup._prog_info(pfd)[1]):
                        out.add(prog_id)
                finally:
                    os.close(pfd)
    finally:
        os.close(fd)
    return out


@pytest.fixture
def external() -> Iterator[tuple[Lab, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="pyc-e2e-ext-kc-"))
    kc = tmp / "kubeconfig"
    server = subprocess.Popen([sys.executable, "-m", "pycilium.lab.apiserver", "--host", "127.0.0.1", "--port", "0",
                               "--graceful-pod-deletion", "--kubeconfig", str(kc)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    lab = Lab()
    lab.env["PYCILIUM_LAB_NAME"] = f"{LAB_NAME}-ext"
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("http://127.0.0.1:")
        yield lab, str(kc)
    finally:
        lab.run("down", check=False, timeout=120)
        server.terminate()
        server.wait(10)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def test_lab_on_an_existing_api_server(external: tuple[Lab, str]) -> None:
    lab, kc = external
    t0 = time.monotonic()
    lab.run("up", "--nodes", "1", "--kubeconfig", kc, timeout=300)
    assert lab.run("kubeconfig").stdout.strip() == kc
    # `up` is idempotent (and keeps the lab's API server), and refuses to switch API servers under it
    lab.run("up", "--nodes", "1", "--kubeconfig", kc, timeout=60)
    lab.run("up", timeout=60)
    assert lab.run("kubeconfig").stdout.strip() == kc
    other = Path(kc).with_name("other")
    other.write_text(Path(kc).read_text())
    assert lab.run("up", "--kubeconfig", str(other), check=False).returncode == 1
    lab.apply(APP)
    vip = lab.cluster_ip("ext/web")
    results = lab.probe("ext/client", f"{vip}:80", count=10)
    assert {r["pod"].rsplit("-", 2)[0] for r in results} == {"web"}
    nodes = json.loads(subprocess.run(["kubectl", "--kubeconfig", kc, "get", "nodes", "-o", "json"],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert [n["metadata"]["name"] for n in nodes["items"]] == ["node1"]
    assert lab.get("pod", "client", "ext")["status"]["hostIP"] == "192.168.200.11"
    lab.delete(APP)  # graceful deletion on this server: the kubelet completes it
    ours = sock_programs_of(f"/sys/fs/bpf/{lab.env['PYCILIUM_LAB_NAME']}/node1")
    from pycilium.bpf.cgroup import cgroup2_root

    assert ours or cgroup2_root() is None  # the agent attached its socket LB (there is a cgroup v2)
    lab.run("down")
    # the agent's host-wide socket LB programs do not outlive the node
    assert not ours & sock_programs_of(None), "cgroup programs of the removed node still attached"
    nodes = json.loads(subprocess.run(["kubectl", "--kubeconfig", kc, "get", "nodes", "-o", "json"],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert nodes["items"] == []  # the lab's Node objects are removed from a server it does not own
    print(f"external-API lab cycle in {time.monotonic() - t0:.1f}s", file=sys.stderr)
