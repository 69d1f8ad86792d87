"""`pycilium-cni` on its own: argument and configuration errors, VERSION, agent down, start-up cost.

No agent and no kernel features are needed: the plugin answers these itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycilium.agent.cniapi import conflist, install_cni_binary
from pycilium.agent.cniapi.install import _BOOT
from pycilium.agent.config import AgentConfig
from pycilium.cni import protocol as p
from pycilium.cni.main import parse_cni_args, valid_ifname, valid_name

FORBIDDEN = ("grpc", "pydantic", "pyroute2", "kubernetes", "pycilium.agent", "pycilium.bpf", "http.client",
             "email", "typing", "logging", "tempfile", "json", "socket", "re", "enum")  # fmt: skip


class Plugin:
    def __init__(self, tmp: Path, native: bool):
        self.tmp = tmp
        self.native = native
        self.config = AgentConfig(state_dir=str(tmp / "state"), cni_socket_path=str(tmp / "run" / "cni.sock"),
                                  cni_bin_dir=str(tmp / "bin"), cni_log_file=str(tmp / "cni.log"))  # fmt: skip
        self.binary = str(install_cni_binary(self.config, native=native))
        net = conflist(self.config)
        self.netconf: dict[str, Any] = dict(net["plugins"][0], cniVersion=net["cniVersion"], name=net["name"])
        self.netns = tmp / "netns"
        self.netns.write_text("")  # exists; the agent is never reached in these tests anyway

    def run(self, env: dict[str, str], conf: Any = None, stdin: bytes | None = None) -> tuple[int, Any, str]:
        data = stdin if stdin is not None else json.dumps(self.netconf if conf is None else conf).encode()
        proc = subprocess.run([self.binary], env=env, input=data, capture_output=True, timeout=30)
        out = proc.stdout.decode()
        return proc.returncode, (json.loads(out) if out.strip() else None), proc.stderr.decode()

    def env(self, command: str = "ADD", **kw: str) -> dict[str, str]:
        e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": str(self.netns),
             "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
             "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"}  # fmt: skip
        for k, v in kw.items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        return e


@pytest.fixture(params=[True, False], ids=["native-launcher", "python-plugin"])
def plugin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Plugin]:
    """Every test runs against the native launcher (agent runs the plugin logic, Python fallback) and
    against the Python plugin alone: both must behave identically for the runtime."""
    yield Plugin(tmp_path, native=request.param)


def _err(rc: int, out: Any, code: int) -> dict[str, Any]:
    assert rc != 0, out
    assert isinstance(out, dict) and out["code"] == code, out
    assert isinstance(out["msg"], str) and out["cniVersion"]
    return out


def test_version_needs_nothing(plugin: Plugin) -> None:
    rc, out, err = plugin.run({"CNI_COMMAND": "VERSION"}, stdin=b"")
    assert rc == 0 and out == {"cniVersion": "1.1.0", "supportedVersions": list(p.SUPPORTED_VERSIONS)}
    assert err == ""
    rc, out, _ = plugin.run({"CNI_COMMAND": "VERSION"}, stdin=b'{"cniVersion":"0.3.1"}')
    assert out["cniVersion"] == "0.3.1"


def test_bad_environment_names_the_variables(plugin: Plugin) -> None:
    out = _err(*plugin.run({})[:2], code=p.ERR_INVALID_ENV)
    assert "CNI_COMMAND" in out["msg"]
    out = _err(*plugin.run(plugin.env("FROB"))[:2], code=p.ERR_INVALID_ENV)
    assert "CNI_COMMAND" in out["msg"]
    out = _err(
        *plugin.run(plugin.env(CNI_CONTAINERID="-bad id", CNI_IFNAME=None))[:2], code=p.ERR_INVALID_ENV
    )  # type: ignore[arg-type]
    assert "CNI_CONTAINERID" in out["msg"] and "CNI_IFNAME" in out["msg"]
    out = _err(*plugin.run(plugin.env(CNI_NETNS=None))[:2], code=p.ERR_INVALID_ENV)  # type: ignore[arg-type]
    assert "CNI_NETNS" in out["msg"]
    out = _err(*plugin.run(plugin.env(CNI_IFNAME="x" * 16))[:2], code=p.ERR_INVALID_ENV)
    assert "CNI_IFNAME" in out["msg"]
    out = _err(*plugin.run(plugin.env(CNI_ARGS="K8S_POD_NAME"))[:2], code=p.ERR_INVALID_ENV)
    assert "CNI_ARGS" in out["msg"]
    out = _err(*plugin.run(plugin.env(CNI_ARGS="FOO=bar"))[:2], code=p.ERR_INVALID_ENV)
    assert "CNI_ARGS" in out["msg"] and "FOO" in out["msg"]
    gc = dict(plugin.netconf, **{"cni.dev/valid-attachments": []})
    out = _err(*plugin.run(plugin.env("GC", CNI_PATH=None), gc)[:2], code=p.ERR_INVALID_ENV)  # type: ignore[arg-type]
    assert "CNI_PATH" in out["msg"]


def test_bad_json_is_a_decode_error(plugin: Plugin) -> None:
    _err(*plugin.run(plugin.env(), stdin=b"{not json")[:2], code=p.ERR_DECODE)
    _err(*plugin.run(plugin.env(), stdin=b"[1, 2]")[:2], code=p.ERR_DECODE)
    _err(*plugin.run(plugin.env(), stdin=b"")[:2], code=p.ERR_DECODE)


def test_bad_config_is_invalid_network_config(plugin: Plugin) -> None:
    for bad in ({"name": None}, {"name": "has space"}, {"type": ""}, {"mtu": "1500"}, {"mtu": 10},
                {"agent-socket": "relative.sock"}, {"runtimeConfig": []}, {"cniVersion": ""}):  # fmt: skip
        conf = {k: v for k, v in {**plugin.netconf, **bad}.items() if v is not None}
        out = _err(*plugin.run(plugin.env(), conf)[:2], code=p.ERR_INVALID_CONFIG)
        assert "invalid network configuration" in out["msg"], bad
    conf = dict(plugin.netconf, **{"cni.dev/valid-attachments": "all"})
    _err(*plugin.run(plugin.env("GC"), conf)[:2], code=p.ERR_INVALID_CONFIG)


def test_unsupported_version_and_fields(plugin: Plugin) -> None:
    out = _err(*plugin.run(plugin.env(), dict(plugin.netconf, cniVersion="0.2.0"))[:2],
               code=p.ERR_INCOMPATIBLE_VERSION)  # fmt: skip
    assert "0.2.0" in out["msg"]
    _err(*plugin.run(plugin.env("STATUS"), dict(plugin.netconf, cniVersion="1.0.0"))[:2],
         code=p.ERR_INCOMPATIBLE_VERSION)  # fmt: skip
    _err(*plugin.run(plugin.env("CHECK"), dict(plugin.netconf, cniVersion="0.3.1"))[:2],
         code=p.ERR_INCOMPATIBLE_VERSION)  # fmt: skip
    out = _err(*plugin.run(plugin.env(), dict(plugin.netconf, ipam={"type": "host-local"}))[:2],
               code=p.ERR_UNSUPPORTED_FIELD)  # fmt: skip
    assert "ipam" in out["msg"]


def test_agent_down(plugin: Plugin) -> None:
    out = _err(*plugin.run(plugin.env("ADD"))[:2], code=p.ERR_TRY_AGAIN_LATER)
    assert plugin.config.cni_socket_path in out["msg"]
    _err(*plugin.run(plugin.env("CHECK"))[:2], code=p.ERR_TRY_AGAIN_LATER)
    _err(*plugin.run(plugin.env("STATUS"))[:2], code=p.ERR_UNAVAILABLE)
    # DEL succeeds and is queued for the agent to replay
    rc, out, err = plugin.run(plugin.env("DEL", CNI_NETNS=""))
    assert rc == 0 and out is None and err == ""
    queued = json.loads((Path(plugin.config.state_dir) / "delete-queue" / "c0ffee.json").read_text())
    assert queued["command"] == "DEL" and queued["containerID"] == "c0ffee" and queued["ifname"] == "eth0"
    assert queued["args"] == {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0"}
    rc, _, _ = plugin.run(plugin.env("DEL", CNI_IFNAME="net1"))
    assert rc == 0 and (Path(plugin.config.state_dir) / "delete-queue" / "c0ffee@net1.json").exists()
    log = Path(plugin.config.cni_log_file).read_text()
    assert "level=error" in log and "level=warning" in log and "DEL queued" in log


def test_agent_dying_mid_request_is_unreachable_not_an_io_error(plugin: Plugin) -> None:
    path = plugin.config.cni_socket_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def serve() -> None:
        # ADD and DEL; with the native launcher, DEL is retried once by the Python plugin
        srv.settimeout(10)
        for _ in range(3 if plugin.native else 2):
            conn, _ = srv.accept()
            conn.recv(65536)
            conn.close()  # no answer

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        _err(*plugin.run(plugin.env("ADD"))[:2], code=p.ERR_TRY_AGAIN_LATER)
        rc, out, _ = plugin.run(plugin.env("DEL"))
        assert rc == 0 and out is None
        assert (Path(plugin.config.state_dir) / "delete-queue" / "c0ffee.json").exists()
    finally:
        t.join(timeout=5)
        srv.close()


def test_runs_with_an_empty_environment_and_without_the_venv(plugin: Plugin) -> None:
    rc, out, _ = plugin.run({"CNI_COMMAND": "VERSION"})
    assert rc == 0 and out["supportedVersions"]
    py_plugin = Path(plugin.binary).with_name("pycilium-cni-py")
    head = py_plugin.read_bytes()[:2000].decode(errors="replace")
    assert head.startswith("#!/bin/sh\n") and os.access(py_plugin, os.X_OK)
    assert Path(plugin.binary).read_bytes()[:4] == (b"\x7fELF" if plugin.native else b"#!/b")


def test_plugin_import_path_is_stdlib_only(plugin: Plugin) -> None:
    """What the installed binary imports (python -X importtime), and the console-script module."""
    interp = os.path.realpath(sys.executable)
    for cmd in ([interp, "-IS", "-X", "importtime", "-c", _BOOT, plugin.binary],
                [sys.executable, "-X", "importtime", "-c", "import sys; from pycilium.cni.main import main"]):  # fmt: skip
        proc = subprocess.run(cmd, env={"CNI_COMMAND": "VERSION", **({"PATH": os.environ.get("PATH", "")})},
                              input=b"", capture_output=True, timeout=30)  # fmt: skip
        mods = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if "|" in line}
        assert "pycilium.cni.main" in mods
        if cmd[1] == "-IS":
            bad = [m for m in mods if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
        else:  # site may import things for .pth files; only check what the plugin itself pulls in
            bad = [m for m in mods if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[:6])]
        assert not bad, (cmd, bad)


@pytest.mark.parametrize("doc", ['{"a": [1, 2.5, -3e2, null, true, false, "x\\u00e9\\n"], "b": {}}', " [] ", '"s"',
                                 '{"nested": {"k": [{"x": 1}]}, "u": "\u00fc\u4e2d"}', "0"])  # fmt: skip
def test_fast_json_matches_the_json_module(doc: str) -> None:
    assert p.loads(doc) == json.loads(doc) == p.loads(doc.encode())
    assert json.loads(p.dumps(json.loads(doc))) == json.loads(doc)


@pytest.mark.parametrize("bad", ["", "   ", "{", '{"a": }', "[1,]", '{"a": 1} x', '"unterminated', "nul"])
def test_fast_json_rejects_what_json_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        p.loads(bad)


def test_helpers() -> None:
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a;;X=") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "a",
        "X": "",
    }
    with pytest.raises(ValueError):
        parse_cni_args("=x")
    assert valid_ifname("eth0") and valid_ifname("x" * 15)
    assert valid_name("a") and valid_name("0ab_c.d-e") and valid_name("f" * 64)
    assert not any(valid_name(n) for n in ("", "-a", ".a", "a b", "a/b", "é", "a@b"))
    assert not any(valid_ifname(n) for n in ("", ".", "..", "a/b", "a:b", "a b", "x" * 16))
    assert p.attachment_filename("abc", "eth0") == "abc.json"
    assert p.attachment_filename("abc", "net1") == "abc@net1.json"
    status, body = p.parse_response(
        b'HTTP/1.1 409 Conflict\r\nContent-Length: 12\r\n\r\n{"code":100}trailing'
    )
    assert status == 409 and body == {"code": 100}
    with pytest.raises(p.CNIError):
        p.parse_response(b"garbage")
