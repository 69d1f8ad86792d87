"""`pycilium lab` plumbing that needs no agent: argument handling when no lab is up, kubeconfigs for
an external API server, the namespace launcher, and the API endpoint process (serve and proxy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pycilium.lab import cli
from pycilium.lab.apiserver import APIServerThread, write_kubeconfig
from pycilium.lab.cluster.lab import (
    LabState,
    Paths,
    Proc,
    external_target,
    write_node_kubeconfig_for_external,
)
from pycilium.lab.netns import Topology, in_netns


@pytest.fixture
def no_lab(monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"pyc-t-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("PYCILIUM_LAB_NAME", name)
    return name


@pytest.mark.parametrize(
    "argv",
    [["status"], ["status", "-o", "json"], ["kubeconfig"], ["exec", "node1", "--", "true"],
     ["probe", "--from", "world", "--to", "1.2.3.4:80"], ["apply", "-f", "examples/echo.yaml"]],
)  # fmt: skip
def test_commands_need_a_lab(no_lab: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "not up" in capsys.readouterr().err


def test_usage_errors(no_lab: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--from", "world", "--to", "nocolon"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert cli.main(["exec", "world"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bogus"])


def test_down_without_a_lab_is_fine(no_lab: str) -> None:
    assert cli.main(["down"]) == 0


def test_state_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pycilium.lab.cluster.lab.RUN_DIR", tmp_path)
    paths = Paths("x")
    st = LabState("x", netns=["x-underlay"], procs={"world": Proc(1, "m", "log")}, api_url="u")
    st.save(paths)
    back = LabState.load(paths)
    assert back == st
    assert not Proc(os.getpid(), "no such marker in this command line").alive()
    assert Proc(os.getpid(), "python").alive() or Proc(os.getpid(), "pytest").alive()


def test_node_kubeconfig_for_an_external_server(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "b",
        "contexts": [{"name": "a", "context": {"cluster": "ca", "user": "ua"}},
                     {"name": "b", "context": {"cluster": "cb", "user": "ub", "namespace": "x"}}],
        "clusters": [{"name": "ca", "cluster": {"server": "https://a:1"}},
                     {"name": "cb", "cluster": {"server": "https://api.example:6443",
                                                "certificate-authority": "ca.crt"}}],
        "users": [{"name": "ua", "user": {"token": "a"}}, {"name": "ub", "user": {"token": "b"}}],
    }  # fmt: skip
    src = tmp_path / "kc"
    src.write_text(yaml.safe_dump(cfg))
    host, port, scheme, _ = external_target(str(src))
    assert (host, port, scheme) == ("api.example", 6443, "https")
    out = tmp_path / "nodes.kc"
    assert write_node_kubeconfig_for_external(str(src), out) == ("api.example", 6443)
    got = yaml.safe_load(out.read_text())
    cluster = got["clusters"][0]["cluster"]
    assert cluster["server"] == "https://192.168.200.1:6443"
    assert cluster["tls-server-name"] == "api.example"
    assert cluster["certificate-authority"] == str(tmp_path / "ca.crt")
    assert got["users"] == [{"name": "ub", "user": {"token": "b"}}]
    assert oct(out.stat().st_mode & 0o777) == "0o600"


# ---- in network namespaces ------------------------------------------------------------------------


@pytest.fixture
def topo() -> Iterator[Topology]:
    """Namespaces for tests marked `kernel` (root; tests/conftest.py skips them only without root)."""
    t = Topology()
    try:
        yield t
    finally:
        t.close()


def _nsexec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pycilium.lab.cluster.nsexec", *args], capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.mark.kernel
def test_nsexec_shows_the_namespace_and_keeps_bpffs(topo: Topology) -> None:
    ns = topo.add_netns(f"pyct{uuid.uuid4().hex[:6]}")
    script = "ls /sys/class/net; grep ' /sys/fs/bpf ' /proc/self/mounts; readlink /proc/self/ns/net"
    p = _nsexec(ns, "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert lines[0] == "lo" and "bpf" in p.stdout
    want = subprocess.run(["ip", "netns", "exec", ns, "readlink", "/proc/self/ns/net"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    assert lines[-1] == want
    p = _nsexec("--net-only", ns, "--", "sh", "-c", "readlink /proc/self/ns/net; readlink /proc/self/ns/mnt")
    assert p.stdout.split() == [lines[-1], os.readlink("/proc/self/ns/mnt")]  # the host's mounts
    assert _nsexec(ns, "--", "sh", "-c", "exit 7").returncode == 7
    assert _nsexec(ns, "--", "/nonexistent").returncode == 127
    assert _nsexec("pyc-no-such-ns", "--", "true").returncode == 1


def _wait_info(path: Path, proc: subprocess.Popen[bytes]) -> dict[str, str]:
    for _ in range(200):
        if path.exists():
            return dict(json.loads(path.read_text()))
        assert proc.poll() is None, "the API endpoint exited"
        time.sleep(0.05)
    raise AssertionError("no info file")


def _get(url: str, ns: str | None = None) -> dict[str, object]:
    if ns:
        with in_netns(ns), urllib.request.urlopen(url, timeout=5) as r:
            return dict(json.load(r))
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.load(r))


@pytest.mark.kernel
def test_apiproc_serves_in_a_namespace_and_on_host_loopback(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_netns(f"pyct{uuid.uuid4().hex[:6]}")
    info = tmp_path / "info.json"
    proc = subprocess.Popen([sys.executable, "-m", "pycilium.lab.cluster.apiproc", "serve", "--netns", ns,
                             "--listen", "127.0.0.1:6443", "--state", str(tmp_path / "state.json"),
                             "--info", str(info)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        got = _wait_info(info, proc)
        assert got["url"] == "http://127.0.0.1:6443"
        assert _get(got["url"] + "/api", ns)["kind"] == "APIVersions"  # inside the namespace
        assert _get(got["host_url"] + "/api")["kind"] == "APIVersions"  # the host's loopback
        kc = write_kubeconfig(tmp_path / "kc", got["host_url"])
        p = subprocess.run(["kubectl", "--kubeconfig", kc, "get", "namespaces", "-o", "name"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert "namespace/default" in p.stdout, p.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert (tmp_path / "state.json").exists()  # saved on SIGTERM


@pytest.mark.kernel
def test_apiproc_proxy_reaches_an_outside_server_from_a_namespace(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_netns(f"pyct{uuid.uuid4().hex[:6]}")
    srv = APIServerThread()
    url = srv.start()
    info = tmp_path / "info.json"
    target = url.removeprefix("http://")
    proc = subprocess.Popen([sys.executable, "-m", "pycilium.lab.cluster.apiproc", "proxy", "--netns", ns,
                             "--listen", "127.0.0.1:6443", "--target", target, "--info", str(info)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_info(info, proc)
        assert _get("http://127.0.0.1:6443/api/v1/namespaces/default", ns)["kind"] == "Namespace"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        srv.stop()
