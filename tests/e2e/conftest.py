"""End-to-end fixtures: one 2-node lab for the whole session, driven through `pycilium lab`.

The lab runs as its own instance (PYCILIUM_LAB_NAME=pyc-e2e-<pid>: its own namespaces, bpf root and
state dir), so it never collides with a lab someone left running or with another test session on
the same machine, and it is torn down at the end of the session whatever happened (also when `up`
failed halfway). Labs of earlier sessions that were killed before their teardown (their API server
is gone) are removed first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

LAB_PREFIX = "pyc-e2e-"
LAB_NAME = f"{LAB_PREFIX}{os.getpid()}"
PYCILIUM = str(Path(sys.executable).parent / "pycilium")
HERE = Path(__file__).resolve().parent
NODE_IPS = {"node1": "192.168.200.11", "node2": "192.168.200.12"}
WORLD_IP = "192.168.200.100"


def eventually(
    fn: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class Lab:
    """`pycilium lab ...` for the e2e instance."""

    def __init__(self) -> None:
        self.env = dict(os.environ, PYCILIUM_LAB_NAME=LAB_NAME)
        self.env.pop("PYCILIUM_BPF_ROOT", None)
        self.env.pop("PYCILIUM_SOCKET", None)

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        p = subprocess.run([PYCILIUM, "lab", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                           input=input)  # fmt: skip
        if check and p.returncode != 0:
            raise AssertionError(f"pycilium lab {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def apply(self, yaml_text: str, wait: bool = True, timeout: float = 90) -> str:
        args = ["apply", "-f", "-"] + (["--wait", "--timeout", str(timeout)] if wait else [])
        return self.run(*args, input=yaml_text, timeout=timeout + 30).stdout

    def delete(self, yaml_text: str, wait: bool = True) -> str:
        return self.run("delete", "-f", "-", *(["--wait"] if wait else []), input=yaml_text).stdout

    def probe(
        self, src: str, to: str, proto: str = "tcp", count: int = 1, timeout: float = 2.0
    ) -> list[dict[str, str]]:
        p = self.run("probe", "--from", src, "--to", to, "--proto", proto, "--count", str(count), "--timeout",
                     str(timeout), "-o", "json", check=False, timeout=count * timeout + 60)  # fmt: skip
        out = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        assert len(out) == count, f"probe gave {p.returncode}: {p.stdout}\n{p.stderr}"
        assert p.returncode == (0 if all(r["result"] == "ok" for r in out) else 1)
        return out

    def probe1(self, src: str, to: str, proto: str = "tcp", timeout: float = 2.0) -> dict[str, str]:
        return self.probe(src, to, proto, 1, timeout)[0]

    def exec(
        self, target: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.run("exec", target, "--", *cmd, check=check, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.run("status", "-o", "json").stdout))

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kc = self.run("kubeconfig").stdout.strip()
        p = subprocess.run(["kubectl", "--kubeconfig", kc, *args], capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {p.stderr}")
        return p

    def get(self, kind: str, name: str, ns: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("-n", ns, "get", kind, name, "-o", "json").stdout))

    def pod_ip(self, ns_name: str) -> str:
        ns, name = ns_name.split("/")
        return str(self.get("pod", name, ns)["status"]["podIP"])

    def cluster_ip(self, ns_name: str) -> str:
        ns, name = ns_name.split("/")
        return str(self.get("service", name, ns)["spec"]["clusterIP"])

    def node_port(self, ns_name: str, index: int = 0) -> int:
        ns, name = ns_name.split("/")
        return int(self.get("service", name, ns)["spec"]["ports"][index]["nodePort"])


def remove_stale_labs() -> None:
    """`down` every e2e lab whose session died without its teardown (its API server is not running)."""
    from pycilium.lab.cluster.lab import Paths

    names = {p.name for p in Path("/var/run").glob(f"{LAB_PREFIX}*")}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    names |= {
        m.group(1) for n in netns if (m := re.match(rf"({re.escape(LAB_PREFIX)}\d+(?:-ext|-tun)?)-", n))
    }
    for name in sorted(names):
        if not re.fullmatch(rf"{re.escape(LAB_PREFIX)}\d+(-ext|-tun)?", name):
            continue
        state = Paths(name).state_file
        try:
            api = json.loads(state.read_text())["procs"]["apiserver"]
            alive = (
                Path(f"/proc/{api['pid']}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .find(api["marker"].encode())
                >= 0
            )
        except (OSError, KeyError, ValueError):
            alive = False
        if not alive:
            subprocess.run(
                [PYCILIUM, "lab", "down"],
                env=dict(os.environ, PYCILIUM_LAB_NAME=name),
                capture_output=True,
                timeout=120,
            )


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's lab, for tests marked `e2e` (root; tests/conftest.py skips them only without root)."""
    remove_stale_labs()
    lab = Lab()
    try:
        t0 = time.monotonic()
        p = lab.run("up", "--nodes", "2", check=False, timeout=400)
        if p.returncode != 0:
            raise AssertionError(f"pycilium lab up failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        print(f"\nlab up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield lab
    finally:
        lab.run("down", check=False, timeout=120)


# The application most tests use: two backends per node, a client per node, Services of each kind.
APP = """
apiVersion: v1
kind: Namespace
metadata: {name: e2e, labels: {purpose: e2e}}
---
apiVersion: v1
kind: Pod
metadata: {name: be-1a, namespace: e2e, labels: {app: echo}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: be-1b, namespace: e2e, labels: {app: echo}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: be-2a, namespace: e2e, labels: {app: echo}}
spec: {nodeName: node2, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: be-2b, namespace: e2e, labels: {app: echo}}
spec: {nodeName: node2, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client1, namespace: e2e, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client2, namespace: e2e, labels: {app: client}}
spec: {nodeName: node2, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: e2e}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: e2e}
spec:
  selector: {app: echo}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky-short, namespace: e2e}
spec:
  selector: {app: echo}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: e2e}
spec:
  selector: {app: nobody}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: np-cluster, namespace: e2e}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: np-local, namespace: e2e}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: np-udp, namespace: e2e}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{port: 53, targetPort: dns, protocol: UDP}]
"""

BACKENDS = {"be-1a": "node1", "be-1b": "node1", "be-2a": "node2", "be-2b": "node2"}


@pytest.fixture(scope="session")
def app(lab: Lab) -> Lab:
    out = lab.apply(APP)
    assert "pod/e2e/be-1a created" in out
    return lab
