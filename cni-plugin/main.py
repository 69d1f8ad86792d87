"""`pycilium-cni`: the CNI plugin binary (CNI spec 1.1; accepts 0.3.x/0.4.0/1.0.0 configurations).

The runtime executes it once per operation with ``CNI_*`` environment variables and the network
configuration on stdin. It validates the invocation, forwards it to the agent over the agent's unix
socket (see pycilium.cni.protocol for the wire format) and prints the agent's Result or error.
STDLIB ONLY, so it starts in a few milliseconds; logs go to the configuration's ``log-file``, never
to stdout (stdout carries the Result or the error object).

Operations:
  ADD      create the pod's veth, address, routes (agent) and print the Result.
  DEL      remove them; succeeds for unknown containers and vanished namespaces. When the agent is
           down the request is queued under ``delete-queue-dir`` and replayed when it starts.
  CHECK    verify the endpoint is as ADD left it.
  STATUS   0 when the agent can serve ADD, else error 50.
  GC       remove every attachment not listed in ``cni.dev/valid-attachments``.
  VERSION  print the supported versions (no agent needed).
"""

from __future__ import annotations

import os
import sys
import time

from pycilium.cni import protocol as p

TYPE_CHECKING = False  # not `typing`: importing it costs the plugin ~3 ms
if TYPE_CHECKING:
    from typing import Any

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
DEFAULT_SOCKET = "/var/run/pycilium/cni.sock"
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
KNOWN_ARGS = frozenset(
    {"IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"}
)


def valid_name(name: str) -> bool:
    """CNI container IDs and network names: ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (no `re`: it costs ~3 ms)."""
    return bool(name) and name[0].isascii() and name[0].isalnum() and all(c in _NAME_CHARS for c in name)


def valid_ifname(name: str) -> bool:
    return (
        0 < len(name) <= 15
        and name not in (".", "..")
        and not any(c in name for c in "/:")
        and not any(c.isspace() for c in name)
    )


def parse_cni_args(raw: str) -> dict[str, str]:
    """``K=V;K2=V2`` -> dict; raises ValueError on a malformed pair."""
    out: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise ValueError(f"malformed pair {part!r} (want KEY=VALUE)")
        out[k] = v
    return out


class Invocation:
    """One run of the plugin: environment + stdin in, (exit code, stdout text) out."""

    def __init__(self, env: dict[str, str] | os._Environ[str], stdin: bytes):
        self.env = env
        self.stdin = stdin
        self.command = env.get("CNI_COMMAND", "")
        self.config: dict[str, Any] = {}
        self.version = p.LATEST_VERSION
        self.log_file: str | None = None
        self.started = time.monotonic()

    # -- logging (to the config's log-file; never stdout) ---------------------------------------
    def log(self, level: str, msg: str, **fields: Any) -> None:
        if not self.log_file:
            return
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        parts = [f"time={ts}Z", f"level={level}", "subsys=cni", f"msg={p.dumps(msg)}",
                 f"cmd={self.command or '?'}"]  # fmt: skip
        cid = self.env.get("CNI_CONTAINERID")
        if cid:
            parts.append(f"containerID={cid}")
        for k, v in fields.items():
            s = str(v)
            parts.append(f"{k}={p.dumps(s) if (not s or ' ' in s or '=' in s) else s}")
        parts.append(f"duration={(time.monotonic() - self.started) * 1000:.1f}ms")
        try:
            fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (" ".join(parts) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass

    # -- entry -------------------------------------------------------------------------------------
    def run(self) -> tuple[int, str]:
        try:
            out = self._run()
        except p.CNIError as e:
            self.log("error", e.msg, code=e.code, details=e.details)
            return 1, p.dumps(e.to_dict(self.version))
        except Exception as e:  # never a traceback instead of an error object
            err = p.CNIError(p.ERR_INTERNAL, f"pycilium-cni: unexpected error: {e}", type(e).__name__)
            self.log("error", err.msg)
            return 1, p.dumps(err.to_dict(self.version))
        return 0, out

    def _run(self) -> str:
        if self.command not in COMMANDS:
            what = "missing" if not self.command else f"unknown command {self.command!r}"
            raise p.CNIError(p.ERR_INVALID_ENV, f"invalid environment variable CNI_COMMAND: {what}",
                             f"CNI_COMMAND must be one of {', '.join(COMMANDS)}")  # fmt: skip
        if self.command == "VERSION":
            return self._version()
        self._parse_config()
        request = self._request()
        return self._dispatch(request)

    def _version(self) -> str:
        requested = p.LATEST_VERSION
        try:
            obj = p.loads(self.stdin) if self.stdin.strip() else {}
            v = obj.get("cniVersion") if isinstance(obj, dict) else None
            if isinstance(v, str) and v in p.SUPPORTED_VERSIONS:
                requested = v
        except ValueError:
            pass
        return p.dumps({"cniVersion": requested, "supportedVersions": list(p.SUPPORTED_VERSIONS)})

    # -- stdin -------------------------------------------------------------------------------------
    def _parse_config(self) -> None:
        try:
            obj = p.loads(self.stdin)
        except ValueError as e:
            raise p.CNIError(
                p.ERR_DECODE, "failed to decode the network configuration on stdin", str(e)
            ) from None
        if not isinstance(obj, dict):
            raise p.CNIError(p.ERR_DECODE, "the network configuration on stdin is not a JSON object")
        self.config = obj
        lf = obj.get("log-file")
        if isinstance(lf, str) and lf:
            self.log_file = lf
        v = obj.get("cniVersion")
        if not isinstance(v, str) or not v:
            raise p.CNIError(p.ERR_INVALID_CONFIG, "invalid network configuration: cniVersion is required")
        if v not in p.SUPPORTED_VERSIONS:
            raise p.CNIError(p.ERR_INCOMPATIBLE_VERSION, f"incompatible CNI version {v!r}",
                             f"supported versions: {', '.join(p.SUPPORTED_VERSIONS)}")  # fmt: skip
        self.version = v
        need = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(self.command)
        if need and p.version_tuple(v) < p.version_tuple(need):
            raise p.CNIError(p.ERR_INCOMPATIBLE_VERSION,
                             f"{self.command} needs cniVersion {need} or later, the configuration has {v}")  # fmt: skip
        problems = []
        name = obj.get("name")
        if not isinstance(name, str) or not valid_name(name):
            problems.append("name: must be a non-empty string of [A-Za-z0-9_.-]")
        if not isinstance(obj.get("type"), str) or not obj.get("type"):
            problems.append("type: must be a non-empty string")
        mtu = obj.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535):
            problems.append(f"mtu: must be an integer in 576..65535, got {mtu!r}")
        for key in ("log-file", "agent-socket", "delete-queue-dir"):
            val = obj.get(key)
            if val is not None and (not isinstance(val, str) or not val.startswith("/")):
                problems.append(f"{key}: must be an absolute path, got {val!r}")
        for key in ("runtimeConfig", "args", "prevResult", "dns"):
            if key in obj and not isinstance(obj[key], dict):
                problems.append(f"{key}: must be an object")
        if self.command == "GC":
            va = obj.get("cni.dev/valid-attachments", [])
            if not isinstance(va, list) or not all(
                isinstance(a, dict)
                and isinstance(a.get("containerID"), str)
                and isinstance(a.get("ifname"), str)
                for a in va
            ):
                problems.append("cni.dev/valid-attachments: must be a list of {containerID, ifname}")
        if problems:
            raise p.CNIError(p.ERR_INVALID_CONFIG, "invalid network configuration: " + "; ".join(problems))
        if "ipam" in obj:
            raise p.CNIError(p.ERR_UNSUPPORTED_FIELD, "unsupported field: ipam",
                             "pycilium allocates pod addresses itself from the node's PodCIDR; "
                             "remove the ipam section")  # fmt: skip
        if self.command == "ADD" and "prevResult" in obj:
            raise p.CNIError(p.ERR_UNSUPPORTED_FIELD, "unsupported field: prevResult",
                             "pycilium-cni must be the first plugin of the chain on ADD")  # fmt: skip

    # -- environment -------------------------------------------------------------------------------
    def _request(self) -> dict[str, Any]:
        env = self.env
        bad: list[str] = []
        cmd = self.command
        req: dict[str, Any] = {"command": cmd, "config": self.config}
        if cmd in ("ADD", "DEL", "CHECK"):
            cid = env.get("CNI_CONTAINERID", "")
            if not cid:
                bad.append("CNI_CONTAINERID (missing)")
            elif not valid_name(cid):
                bad.append(f"CNI_CONTAINERID ({cid!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]*)")
            ifname = env.get("CNI_IFNAME", "")
            if not ifname:
                bad.append("CNI_IFNAME (missing)")
            elif not valid_ifname(ifname):
                bad.append(f"CNI_IFNAME ({ifname!r}: not a valid interface name)")
            netns = env.get("CNI_NETNS", "")
            if cmd != "DEL" and not netns:
                bad.append("CNI_NETNS (missing)")
            elif netns and not netns.startswith("/"):
                bad.append(f"CNI_NETNS ({netns!r}: must be an absolute path)")
            elif cmd == "ADD" and not os.path.exists(netns):
                bad.append(f"CNI_NETNS ({netns}: does not exist)")
            req.update(containerID=cid, ifname=ifname, netns=netns)
        cni_path = env.get("CNI_PATH", "")
        if cmd == "GC" and not cni_path:
            bad.append("CNI_PATH (missing)")
        req["path"] = [d for d in cni_path.split(":") if d]
        try:
            args = parse_cni_args(env.get("CNI_ARGS", ""))
        except ValueError as e:
            bad.append(f"CNI_ARGS ({e})")
            args = {}
        else:
            unknown = sorted(set(args) - KNOWN_ARGS)
            if unknown and args.get("IgnoreUnknown", "").lower() not in ("1", "true"):
                bad.append(f"CNI_ARGS (unknown keys {', '.join(unknown)}; set IgnoreUnknown=1 to ignore)")
        req["args"] = {k: v for k, v in args.items() if k in KNOWN_ARGS and k != "IgnoreUnknown"}
        if bad:
            raise p.CNIError(p.ERR_INVALID_ENV, "invalid environment variables: " + "; ".join(bad))
        return req

    # -- agent ---------------------------------------------------------------------------------------
    def _socket(self) -> str:
        s = self.config.get("agent-socket")
        return s if isinstance(s, str) and s else DEFAULT_SOCKET

    def _call_agent(self, sock: str, req: dict[str, Any]) -> tuple[int, Any]:
        """The transport: one request over the agent's socket. (The agent overrides this when it runs
        an invocation forwarded by the native launcher, see cni-plugin/shim/.)"""
        return p.call_agent(sock, "POST", f"/v1/cni/{p.VERBS[self.command]}", req)

    def _dispatch(self, req: dict[str, Any]) -> str:
        cmd = self.command
        sock = self._socket()
        fields = {k: req[k] for k in ("ifname", "netns") if req.get(k)}
        pod = req["args"].get("K8S_POD_NAMESPACE", ""), req["args"].get("K8S_POD_NAME", "")
        if pod[1]:
            fields["pod"] = f"{pod[0]}/{pod[1]}"
        try:
            status, body = self._call_agent(sock, req)
        except p.AgentUnreachable as e:
            if cmd == "DEL":
                path = self._queue_delete(req)
                self.log(
                    "warning", "agent unreachable: DEL queued for replay", queued=path, reason=e, **fields
                )
                return ""
            if cmd == "STATUS":
                raise p.CNIError(p.ERR_UNAVAILABLE, f"pycilium agent is not reachable: {e}") from None
            raise p.CNIError(p.ERR_TRY_AGAIN_LATER,
                             f"pycilium agent is not reachable, try again later: {e}") from None  # fmt: skip
        except TimeoutError as e:
            code = p.ERR_UNAVAILABLE if cmd == "STATUS" else p.ERR_TRY_AGAIN_LATER
            raise p.CNIError(code, str(e)) from None
        except OSError as e:
            raise p.CNIError(p.ERR_IO, f"talking to the pycilium agent on {sock} failed: {e}") from None
        if not 200 <= status < 300:
            if (
                isinstance(body, dict)
                and isinstance(body.get("code"), int)
                and isinstance(body.get("msg"), str)
            ):
                raise p.CNIError(body["code"], body["msg"], str(body.get("details") or ""))
            raise p.CNIError(p.ERR_AGENT_PROTOCOL, f"the agent answered HTTP {status}", p.dumps(body)[:500])
        if cmd != "ADD":
            self.log("info", f"{cmd} done", **fields)
            return ""
        if not isinstance(body, dict) or "cniVersion" not in body:
            raise p.CNIError(
                p.ERR_AGENT_PROTOCOL, "the agent's ADD answer is not a CNI result", p.dumps(body)[:500]
            )
        ips = ",".join(str(i.get("address")) for i in body.get("ips", []) if isinstance(i, dict))
        self.log("info", "ADD done", ip=ips, **fields)
        return p.dumps(body)

    def _queue_delete(self, req: dict[str, Any]) -> str:
        qdir = self.config.get("delete-queue-dir")
        if not isinstance(qdir, str) or not qdir:
            qdir = p.default_queue_dir(self._socket())
        try:
            os.makedirs(qdir, mode=0o700, exist_ok=True)
            path = os.path.join(qdir, p.attachment_filename(req["containerID"], req["ifname"]))
            req = dict(req, queuedAt=time.time())
            p.atomic_write_json(path, req)
        except OSError as e:
            raise p.CNIError(p.ERR_TRY_AGAIN_LATER,
                             f"pycilium agent is not reachable and the DEL could not be queued in {qdir}: {e}") from None  # fmt: skip
        return path


def main() -> int:
    try:
        stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
    except OSError:
        stdin = b""
    code, out = Invocation(os.environ, stdin).run()
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
