"""The agent's side of the CNI plugin's unix socket (wire protocol: pycilium.cni.protocol).

A threaded HTTP/1.1 server on an AF_UNIX socket (mode 0600, directory 0700): every request runs in
its own thread, so ADDs of different pods proceed concurrently and the endpoint manager's
synchronous netlink calls never run inside an asyncio loop. Threads inherit the network namespace
of the thread that called `start()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pycilium.agent.endpoint.manager import AddRequest, EndpointManager
from pycilium.agent.endpoint.model import GATEWAY_IP, Endpoint
from pycilium.cni import protocol as p

log = logging.getLogger("pycilium.cniapi")

Readiness = Callable[[], "str | None"]  # None when ready, else the reason why not


def delete_queue_dir(config: Any) -> str:
    """Where the plugin queues DELs while the agent is down (also written into the conflist)."""
    return os.path.join(config.state_dir, "delete-queue")


def format_result(version: str, ep: Endpoint, dns: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CNI Result of an ADD, in the shape of the configuration's cniVersion."""
    v = p.version_tuple(version)
    host: dict[str, Any] = {"name": ep.host_ifname, "mac": ep.host_mac}
    pod: dict[str, Any] = {"name": ep.ifname, "mac": ep.pod_mac, "sandbox": ep.netns}
    if v >= (1, 1, 0):
        host["mtu"] = pod["mtu"] = ep.mtu
    ip: dict[str, Any] = {"address": f"{ep.ipv4}/32", "gateway": GATEWAY_IP, "interface": 1}
    if v < (1, 0, 0):
        ip["version"] = "4"
    out: dict[str, Any] = {"cniVersion": version, "interfaces": [host, pod], "ips": [ip],
                           "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY_IP}]}  # fmt: skip
    if dns:
        out["dns"] = {k: dns[k] for k in ("nameservers", "domain", "search", "options") if dns.get(k)}
    return out


def _str(req: dict[str, Any], key: str, env: str, required: bool = True) -> str:
    v = req.get(key, "")
    if not isinstance(v, str) or (required and not v):
        raise p.CNIError(p.ERR_INVALID_ENV, f"invalid environment variables: {env} (missing)")
    return v


class CNIServer:
    """Serves CNI requests from `pycilium-cni` and dispatches them to the EndpointManager."""

    def __init__(
        self,
        socket_path: str,
        manager: EndpointManager,
        *,
        queue_dir: str | None = None,
        readiness: Readiness | None = None,
    ):
        self.socket_path = socket_path
        self.manager = manager
        self.ipam = manager.ipam
        self.queue_dir = queue_dir or p.default_queue_dir(socket_path)
        self.readiness = readiness
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, config: Any, manager: EndpointManager, readiness: Readiness | None = None
    ) -> CNIServer:
        return cls(config.cni_socket_path, manager, queue_dir=delete_queue_dir(config), readiness=readiness)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, *, replay_queue: bool = True) -> None:
        """Replay queued DELs, bind the socket (0600 in a 0700 dir) and serve in a thread."""
        if self._server is not None:
            return
        if replay_queue:
            self.replay_delete_queue()
        sock_dir = Path(self.socket_path).parent
        if not sock_dir.exists():
            sock_dir.mkdir(parents=True, mode=0o700)
        _remove_stale_socket(self.socket_path)
        srv = _UnixHTTPServer(self.socket_path, _Handler, bind_and_activate=False)
        srv.cni = self
        try:
            srv.server_bind()
            os.chmod(self.socket_path, 0o600)
            srv.server_activate()
        except BaseException:
            srv.server_close()
            raise
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="pycilium-cni-api", daemon=True)  # fmt: skip
        self._thread.start()
        log.info("CNI API listening", extra={"socket": self.socket_path})

    def stop(self) -> None:
        """Stop accepting, wait for requests in flight, remove the socket."""
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> CNIServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- delete queue --------------------------------------------------------------------------
    def replay_delete_queue(self) -> int:
        """Run every DEL the plugin queued while the agent was down; returns how many succeeded."""
        qdir = Path(self.queue_dir)
        if not qdir.is_dir():
            return 0
        done = 0
        for path in sorted(qdir.glob("*.json")):
            try:
                req = json.loads(path.read_text())
                self.manager.delete(req["containerID"], req.get("ifname") or "eth0")
            except Exception as e:
                log.error("replaying a queued DEL failed: kept for the next start",
                          extra={"file": str(path), "error": str(e)})  # fmt: skip
                continue
            path.unlink(missing_ok=True)
            done += 1
            log.info("replayed queued DEL", extra={"container": req.get("containerID")})
        return done

    # ---- dispatch ------------------------------------------------------------------------------
    def handle(self, verb: str, req: dict[str, Any]) -> tuple[int, Any]:
        """Transport-independent: (HTTP status, JSON body) for one plugin request."""
        cfg = req.get("config")
        version = cfg.get("cniVersion") if isinstance(cfg, dict) else None
        version = (
            version if isinstance(version, str) and version in p.SUPPORTED_VERSIONS else p.LATEST_VERSION
        )
        try:
            if not isinstance(cfg, dict):
                raise p.CNIError(p.ERR_INVALID_CONFIG, "invalid network configuration: missing")
            fn = getattr(self, f"_do_{verb}", None)
            if fn is None:
                raise p.CNIError(p.ERR_INVALID_ENV, f"invalid environment variable CNI_COMMAND: {verb!r}")
            return 200, fn(req, cfg, version)
        except p.CNIError as e:
            return p.http_status_for(e.code), e.to_dict(version)
        except Exception as e:
            code = getattr(e, "cni_code", p.ERR_INTERNAL)
            msg = getattr(e, "msg", None) or str(e) or type(e).__name__
            details = getattr(e, "details", "")
            if code == p.ERR_INTERNAL:
                log.exception("CNI request failed", extra={"verb": verb})
            err = p.CNIError(code, msg, details)
            return p.http_status_for(code), err.to_dict(version)

    def _do_add(self, req: dict[str, Any], cfg: dict[str, Any], version: str) -> dict[str, Any]:
        args = req.get("args") if isinstance(req.get("args"), dict) else {}
        assert isinstance(args, dict)
        mtu = cfg.get("mtu")
        ar = AddRequest(
            container_id=_str(req, "containerID", "CNI_CONTAINERID"),
            ifname=_str(req, "ifname", "CNI_IFNAME"),
            netns=_str(req, "netns", "CNI_NETNS"),
            pod_namespace=str(args.get("K8S_POD_NAMESPACE", "")),
            pod_name=str(args.get("K8S_POD_NAME", "")),
            pod_uid=str(args.get("K8S_POD_UID", "")),
            mtu=mtu if isinstance(mtu, int) and not isinstance(mtu, bool) else None,
        )
        ep = self.manager.add(ar)
        dns = cfg.get("dns")
        rc = cfg.get("runtimeConfig")
        if isinstance(rc, dict) and isinstance(rc.get("dns"), dict):
            dns = rc["dns"]
        return format_result(version, ep, dns if isinstance(dns, dict) else None)

    def _do_del(self, req: dict[str, Any], cfg: dict[str, Any], version: str) -> dict[str, Any]:
        self.manager.delete(_str(req, "containerID", "CNI_CONTAINERID"), _str(req, "ifname", "CNI_IFNAME"))
        return {}

    def _do_check(self, req: dict[str, Any], cfg: dict[str, Any], version: str) -> dict[str, Any]:
        prev = cfg.get("prevResult")
        self.manager.check(_str(req, "containerID", "CNI_CONTAINERID"), _str(req, "ifname", "CNI_IFNAME"),
                           prev if isinstance(prev, dict) else None)  # fmt: skip
        return {}

    def _do_status(self, req: dict[str, Any], cfg: dict[str, Any], version: str) -> dict[str, Any]:
        reason = self.readiness() if self.readiness is not None else None
        if reason:
            raise p.CNIError(p.ERR_UNAVAILABLE, f"pycilium agent is not ready: {reason}")
        st = self.ipam.status()
        if st.cidr is None:
            raise p.CNIError(p.ERR_UNAVAILABLE, "IPAM: no PodCIDR assigned to this node yet")
        if st.free == 0:
            raise p.CNIError(
                p.ERR_UNAVAILABLE, f"IPAM: range {st.cidr} is full ({st.allocated}/{st.total} allocated)"
            )
        return {}

    def _do_gc(self, req: dict[str, Any], cfg: dict[str, Any], version: str) -> dict[str, Any]:
        raw = cfg.get("cni.dev/valid-attachments", [])
        if not isinstance(raw, list):
            raise p.CNIError(p.ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
        valid = [
            (str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in raw if isinstance(a, dict)
        ]
        report = self.manager.gc(valid)
        if report.errors:
            raise p.CNIError(p.ERR_DATAPATH, f"GC: {len(report.errors)} attachment(s) could not be removed",
                             "; ".join(report.errors))  # fmt: skip
        return {"removed": [e.owner for e in report.removed_endpoints], "released": report.released_ips}

    def exec_invocation(self, env: dict[str, str], stdin: bytes) -> tuple[int, str]:
        """Run a whole plugin invocation forwarded raw by the native launcher (cni-plugin/shim/):
        the plugin's own validation and error mapping (pycilium.cni.main.Invocation), with the
        request handled here instead of over the socket. Returns (exit code, stdout text)."""
        from pycilium.cni.main import Invocation

        server = self

        class InAgent(Invocation):
            def _call_agent(self, sock: str, req: dict[str, Any]) -> tuple[int, Any]:
                return server.handle(p.VERBS[self.command], req)

        return InAgent({k: v for k, v in env.items() if k.startswith("CNI_")}, stdin).run()

    def debug_get(self, path: str) -> tuple[int, Any]:
        if path == "/v1/cni/endpoints":
            return 200, [e.to_dict() for e in self.manager.list_endpoints()]
        if path == "/v1/cni/ipam":
            st = self.ipam.status()
            return 200, {**st.to_dict(), "summary": str(st),
                         "allocations": [{"ip": a.ip, **a.to_dict()} for a in self.ipam.allocations()]}  # fmt: skip
        if path == "/v1/cni/healthz":
            return 200, {"status": "ok"}
        return 404, {"error": f"no such path {path}"}


# ---- transport -----------------------------------------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False
    block_on_close = True  # stop() waits for requests in flight
    request_queue_size = 256
    cni: CNIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixHTTPServer
    _VERBS = set(p.VERBS.values())

    def address_string(self) -> str:  # unix peers have no address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("cni api: " + format, *args)

    def _send(
        self, status: int, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> None:
        if raw is None:
            raw = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(raw)
        self.close_connection = True

    def do_GET(self) -> None:
        self._send(*self.server.cni.debug_get(self.path))

    def _exec(self) -> None:
        """/v1/cni/exec: exit code in X-CNI-Exit, the plugin's stdout as the body."""
        try:
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n)) if n else {}
            env, stdin = req["env"], req["stdin"]
            if not isinstance(env, dict) or not isinstance(stdin, str):
                raise ValueError("env must be an object and stdin a string")
        except (ValueError, KeyError, TypeError) as e:
            self._send(400, {"error": f"cannot decode the request: {e}"})
            return
        code, out = self.server.cni.exec_invocation({str(k): str(v) for k, v in env.items()}, stdin.encode())
        self._send(200, None, raw=(out + "\n").encode() if out else b"", headers={"X-CNI-Exit": str(code)})

    def do_POST(self) -> None:
        if self.path == "/v1/cni/exec":
            self._exec()
            return
        prefix = "/v1/cni/"
        verb = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
        if verb not in self._VERBS:
            self._send(404, {"error": f"no such path {self.path}"})
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n)) if n else {}
            if not isinstance(req, dict):
                raise ValueError("request is not a JSON object")
        except ValueError as e:
            err = p.CNIError(p.ERR_DECODE, f"agent: cannot decode the request: {e}")
            self._send(400, err.to_dict())
            return
        self._send(*self.server.cni.handle(verb, req))


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to steal the socket of a running agent."""
    if not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise RuntimeError(f"another agent is serving the CNI socket {path}")
