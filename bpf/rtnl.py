"""A blocking rtnetlink socket (`Rtnl`) without pyroute2's per-call event loop.

Used where netlink requests are frequent: the loader's tc attach/detach (bpf/loader.py) and the
endpoint manager's veth, address, route and neighbour setup (agent/endpoint/netlink.py). A raw
``AF_NETLINK`` socket costs a few microseconds per request where pyroute2's synchronous API runs an
asyncio loop per call (~0.5 ms of CPU each). Requests that do not depend on each other's answers go
out together in one ``send`` and are answered by one acknowledgement (`Rtnl.batch`): the kernel
handles them in order and reports an error for any that fails. `Rtnl.inside` opens the socket in
another network namespace: the calling thread enters it with setns(2) only to create the socket. A
netns path that does not exist is never created. Errors are pyroute2's ``NetlinkError`` (code =
errno), as elsewhere in the project.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid

_ATTR = struct.Struct("=HH")
I32 = struct.Struct("=i")
U32 = struct.Struct("=I")
_RECV_SIZE = 1 << 16  # dump datagrams are at most 32 KiB


class NetnsError(OSError):
    """A network namespace is missing or is not a network namespace."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """An fd of the netns at `path`; NetnsError when it does not exist (never creates it)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NetnsError(e.errno, f"network namespace {path}: {e.strerror}") from None


# ---- message encoding ----------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def parse_attrs(data: bytes | memoryview, off: int = 0) -> dict[int, memoryview]:
    """The attributes of one level (first occurrence of each type; NLA_F_* bits masked)."""
    mv = memoryview(data)
    out: dict[int, memoryview] = {}
    end = len(mv)
    while off + 4 <= end:
        n, kind = _ATTR.unpack_from(mv, off)
        if n < 4:
            break
        out.setdefault(kind & 0x3FFF, mv[off + 4 : off + n])
        off += (n + 3) & ~3
    return out


def str_attr(v: memoryview) -> str:
    return bytes(v).split(b"\0", 1)[0].decode()


@dataclass
class Request:
    """One rtnetlink request: message type, NLM_F_* flags beyond REQUEST/ACK, body."""

    type: int
    flags: int
    body: bytes
    get: bool = False  # answered by a message (RTM_GET*), not by an acknowledgement


@dataclass
class Reply:
    """What the kernel answered to one request of a batch."""

    error: int = 0  # errno, 0 for success
    messages: list[tuple[int, bytes]] = field(default_factory=list)  # (type, body) of the answers


class Rtnl:
    """A blocking NETLINK_ROUTE socket, in the network namespace it was opened in."""

    def __init__(self, sock: socket.socket | None = None):
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)

    @classmethod
    def inside(cls, netns_fd: int, path: str) -> Rtnl:
        """A socket inside the netns of `netns_fd`: this thread enters it only to create the socket."""
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(netns_fd)
            except OSError as e:
                raise NetnsError(e.errno, f"{path} is not a usable network namespace: {e.strerror}") from None
            sock: socket.socket | None = None
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            finally:
                try:
                    _setns(here)  # back before anything else runs in this thread
                except OSError as e:  # (the kernel refuses only on ENOMEM)
                    if sock is not None:
                        sock.close()
                    raise RuntimeError(f"cannot return to the agent's network namespace after entering "
                                       f"{path}: {e.strerror}") from None  # fmt: skip
        finally:
            os.close(here)
        return cls(sock)

    @classmethod
    def at(cls, path: str) -> Rtnl:
        """`inside` the netns at `path` (NetnsError when it is missing or not a netns)."""
        fd = open_netns(path)
        try:
            return cls.inside(fd, path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- transport -----------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _recv(self) -> Iterator[tuple[int, int, int, memoryview]]:
        """The messages of one datagram: (type, flags, seq, body)."""
        n = self.sock.recv_into(self._buf)
        mv = memoryview(self._buf)[:n]
        off = 0
        while off + 16 <= n:
            ln, kind, flags, seq, _pid = _HDR.unpack_from(mv, off)
            if ln < 16 or off + ln > n:
                break
            yield kind, flags, seq, mv[off + 16 : off + ln]
            off += (ln + 3) & ~3

    def batch(self, requests: list[Request]) -> list[Reply]:
        """Send `requests` in one datagram; returns one Reply per request, in order.

        The kernel handles them one after the other whatever happens to the previous ones. Only the
        last is acknowledged: the others only answer when they fail (or with their message, for a
        get), so one answer normally closes the batch.
        """
        seqs: list[int] = []
        out = bytearray()
        for i, r in enumerate(requests):
            seq = self._next_seq()
            seqs.append(seq)
            flags = NLM_F_REQUEST | r.flags
            if i == len(requests) - 1 and not r.get:
                flags |= NLM_F_ACK
            out += _HDR.pack(16 + len(r.body), r.type, flags, seq, 0) + r.body
            out += b"\0" * (-len(out) % 4)
        self.sock.sendto(bytes(out), (0, 0))
        replies = {s: Reply() for s in seqs}
        last = seqs[-1]
        done = False
        while not done:
            for kind, _flags, seq, body in self._recv():
                rep = replies.get(seq)
                if rep is None:
                    continue  # an answer to an earlier, abandoned request
                if kind == NLMSG_ERROR:
                    rep.error = -I32.unpack_from(body)[0]
                else:
                    rep.messages.append((kind, bytes(body)))
                if seq == last:
                    done = True
        return [replies[s] for s in seqs]

    def call(self, request: Request) -> Reply:
        return self.batch([request])[0]

    def dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        """A full dump (NLM_F_DUMP): every message's (type, body); redone when it was interrupted."""
        for _ in range(5):
            seq = self._next_seq()
            self.sock.sendto(
                _HDR.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body, (0, 0)
            )
            msgs: list[tuple[int, bytes]] = []
            interrupted = done = False
            while not done:
                for k, flags, s, b in self._recv():
                    if s != seq:
                        continue
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if k == NLMSG_DONE:
                        done = True
                    elif k == NLMSG_ERROR:
                        err = -I32.unpack_from(b)[0]
                        if err:
                            raise netlink_error(err)
                        done = True
                    else:
                        msgs.append((k, bytes(b)))
            if not interrupted:
                return msgs
        raise netlink_error(errno.EINTR, "netlink dump kept being interrupted")


def netlink_error(code: int, message: str | None = None) -> Exception:
    """pyroute2's NetlinkError for `code` (imported only when needed: pyroute2 costs ~0.2 s to import)."""
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError(code, message) if message else NetlinkError(code)


def check(reply: Reply) -> Reply:
    """The reply, or NetlinkError(errno) when the request failed."""
    if reply.error:
        raise netlink_error(reply.error)
    return reply


# ---- requests ------------------------------------------------------------------------------------
