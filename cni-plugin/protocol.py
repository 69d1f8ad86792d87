"""What the CNI plugin and the agent share: error codes, versions, the wire protocol, on-disk formats.

STDLIB ONLY: this module is imported by the plugin, which runs once per pod operation and must start
in a few milliseconds (no grpc, pydantic, pyroute2 or kubernetes; not even http.client, which pulls
in the email package). It even avoids the `json` and `socket` modules (with `re` and `enum` they
pull in, ~12 ms of a ~25 ms start) by using their C accelerators `_json` and `_socket` directly;
where those are missing (not CPython) it falls back to the modules.

Wire protocol (plugin -> agent), over the agent's unix socket (``AgentConfig.cni_socket_path``,
default ``/var/run/pycilium/cni.sock``, mode 0600 in a 0700 directory): one HTTP/1.1 request per
connection, ``Connection: close``, JSON bodies, so it can be driven by hand with
``curl --unix-socket /var/run/pycilium/cni.sock http://pycilium/v1/cni/endpoints``::

    POST /v1/cni/add|del|check|status|gc HTTP/1.1
    Content-Type: application/json
    Content-Length: N

    {"command": "ADD", "containerID": "...", "netns": "/var/run/netns/x", "ifname": "eth0",
     "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0", "K8S_POD_UID": "..."},
     "path": ["/opt/cni/bin"], "config": {<the network configuration from stdin, verbatim>}}

The answer's body is what the plugin prints: on success (2xx) the CNI Result (ADD) or ``{}``
(nothing is printed for DEL/CHECK/STATUS/GC); on failure (4xx/5xx) a CNI error object
``{"cniVersion", "code", "msg", "details"}``. ``GET /v1/cni/endpoints`` and ``GET /v1/cni/ipam``
return the agent's endpoints and IPAM status for debugging.

Delete queue: when the agent is unreachable during DEL, the plugin writes the request it would have
sent to ``<delete-queue-dir>/<containerID>@<ifname>.json`` (atomically) and succeeds; the agent
replays the queue when it starts.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not `typing`: importing it costs the plugin ~3 ms
if TYPE_CHECKING:
    from typing import Any

try:
    import _socket as _sock
except ImportError:  # pragma: no cover - not CPython
    import socket as _sock  # type: ignore[no-redef]

# ---- JSON without the json module --------------------------------------------------------------
try:
    import _json as _cjson
except ImportError:  # pragma: no cover - not CPython
    _cjson = None  # type: ignore[assignment]


class _ScanContext:
    """What _json.make_scanner reads from a JSONDecoder: plain loads() semantics."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    array_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


def _not_serializable(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


if _cjson is not None:
    _scan = _cjson.make_scanner(_ScanContext())  # type: ignore[arg-type]
    _encode = _cjson.make_encoder(None, _not_serializable, _cjson.encode_basestring_ascii, None, ": ", ", ",
                                  False, False, True)  # fmt: skip
_WS = " \t\n\r"


def loads(data: bytes | str) -> Any:
    """json.loads for one document; ValueError (json.JSONDecodeError) on anything malformed."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    if _cjson is not None:
        start = len(text) - len(text.lstrip(_WS))
        try:
            obj, end = _scan(text, start)
        except (StopIteration, ValueError, SystemError):
            pass  # malformed: the json module produces the proper error (the C scanner needs it for that)
        else:
            if not text[end:].strip(_WS):
                return obj
    import json

    return json.loads(text)


def dumps(obj: Any) -> str:
    """json.dumps (ASCII, no NaN checks beyond the stdlib's defaults)."""
    if _cjson is None:  # pragma: no cover
        import json

        return json.dumps(obj)
    return "".join(_encode(obj, 0))


# ---- versions ------------------------------------------------------------------------------------
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
PLUGIN_TYPE = "pycilium-cni"


def version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


# ---- error codes (CNI spec; 100+ are ours) -------------------------------------------------------
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_UNAVAILABLE = 50
ERR_UNAVAILABLE_DEGRADED = 51
# plugin specific
ERR_IPAM_EXHAUSTED = 100  # the node's PodCIDR has no free address
ERR_INTERFACE_EXISTS = 101  # CNI_IFNAME already exists in the pod's netns
ERR_NETNS = 102  # CNI_NETNS cannot be entered (not a network namespace, vanished)
ERR_CHECK_FAILED = 103  # CHECK found the endpoint's state differs from what ADD created
ERR_DATAPATH = 104  # netlink or BPF map / program attach failure
ERR_AGENT_PROTOCOL = 105  # the agent answered something the plugin cannot understand
ERR_INTERNAL = 110  # unexpected agent-side failure (see details and the agent log)


class CNIError(Exception):
    """A CNI error: printed as ``{"cniVersion","code","msg","details"}`` with a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str = LATEST_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def http_status_for(code: int) -> int:
    if code == ERR_UNKNOWN_CONTAINER:
        return 404
    if code in (ERR_TRY_AGAIN_LATER, ERR_UNAVAILABLE, ERR_UNAVAILABLE_DEGRADED):
        return 503
    if code in (ERR_IPAM_EXHAUSTED, ERR_INTERFACE_EXISTS, ERR_CHECK_FAILED):
        return 409
    if code < 100 or code == ERR_NETNS:
        return 400
    return 500


# ---- wire protocol: client side ------------------------------------------------------------------
VERBS = {"ADD": "add", "DEL": "del", "CHECK": "check", "STATUS": "status", "GC": "gc"}
DEFAULT_TIMEOUT = 60.0


class AgentUnreachable(OSError):
    """The agent's socket does not exist or nobody accepts on it."""


def call_agent(
    socket_path: str, method: str, path: str, payload: dict[str, Any] | None, timeout: float = DEFAULT_TIMEOUT
) -> tuple[int, Any]:
    """One HTTP/1.1 request over the unix socket; returns (status, decoded JSON body).

    Raises AgentUnreachable when the socket is missing or refuses, TimeoutError when the agent does not
    answer in time, CNIError(ERR_AGENT_PROTOCOL) when the answer is not HTTP + JSON.
    """
    body = b"" if payload is None else dumps(payload).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: pycilium\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    s = _sock.socket(_sock.AF_UNIX, _sock.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError) as e:
            raise AgentUnreachable(e.errno, f"agent socket {socket_path}: {e.strerror}") from None
        s.sendall(head + body)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except TimeoutError:
        raise TimeoutError(f"the agent did not answer within {timeout:.0f}s on {socket_path}") from None
    except ConnectionError as e:  # the agent went away in the middle of the request
        raise AgentUnreachable(e.errno, f"agent socket {socket_path}: {e.strerror}") from None
    finally:
        s.close()
    if not chunks:
        raise AgentUnreachable(0, f"agent socket {socket_path}: closed without an answer")
    return parse_response(b"".join(chunks))


def parse_response(raw: bytes) -> tuple[int, Any]:
    sep = raw.find(b"\r\n\r\n")
    if sep < 0:
        raise CNIError(ERR_AGENT_PROTOCOL, "incomplete answer from the agent", repr(raw[:200]))
    head, body = raw[:sep].decode("latin-1"), raw[sep + 4 :]
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise CNIError(ERR_AGENT_PROTOCOL, "malformed status line from the agent", lines[0][:200])
    status = int(parts[1])
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length" and v.strip().isdigit():
            body = body[: int(v.strip())]
    try:
        return status, loads(body) if body else {}
    except ValueError:
        raise CNIError(ERR_AGENT_PROTOCOL, "the agent answered non-JSON", repr(body[:200])) from None


# ---- on-disk formats -----------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    # not tempfile: it costs the plugin ~5 ms of imports
    tmp = os.path.join(d, f".tmp-{os.path.basename(path)}-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, mode: int = 0o600, pretty: bool = False
) -> None:
    if pretty:  # agent side: readable state files (imports json)
        import json

        text = json.dumps(obj, indent=1, sort_keys=True)
    else:
        text = dumps(obj)
    atomic_write(path, (text + "\n").encode(), mode)


def attachment_filename(container_id: str, ifname: str) -> str:
    """File name for one (container, interface): ``<cid>.json`` for eth0, else ``<cid>@<ifname>.json``.

    Container IDs cannot contain '@', so names never collide.
    """
    safe_if = ifname.replace("/", "_")
    return f"{container_id}.json" if ifname == "eth0" else f"{container_id}@{safe_if}.json"


def default_queue_dir(socket_path: str) -> str:
    return os.path.join(os.path.dirname(socket_path) or ".", "delete-queue")
