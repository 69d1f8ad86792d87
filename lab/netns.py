"""Network namespaces, veths and bridges for the lab and the tests, via iproute2.

Everything created here is recorded so it can be removed again, also when a test fails halfway.
Names are short and prefixed so nothing outside what we created is ever touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    pass


def run(cmd: Sequence[str], *, netns: str | None = None, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a command, in `netns` if given; raises NetnsError with stderr on failure."""
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(full)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], netns=netns, check=check)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")


def ifindex(dev: str, netns: str | None = None) -> int:
    out = run(["cat", f"/sys/class/net/{dev}/ifindex"], netns=netns).stdout
    return int(out.strip())


def mac(dev: str, netns: str | None = None) -> str:
    return run(["cat", f"/sys/class/net/{dev}/address"], netns=netns).stdout.strip()


def unique(prefix: str, n: int = 6) -> str:
    return f"{prefix}{uuid.uuid4().hex[:n]}"


@dataclass
class Topology:
    """Owns the namespaces and host links it creates; `close()` removes them all."""

    namespaces: list[str] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)

    def add_netns(self, name: str) -> str:
        if netns_exists(name):
            raise NetnsError(f"network namespace {name} already exists")
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    def add_veth(self, a: str, b: str, a_ns: str | None = None, b_ns: str | None = None,
                 mtu: int | None = None) -> None:  # fmt: skip
        """Create veth a<->b, moving each end to its namespace (None: the current one)."""
        # created directly inside the namespaces: names like eth0 never clash with the host's
        cmd = ["link", "add", a]
        if a_ns:
            cmd += ["netns", a_ns]
        cmd += ["type", "veth", "peer", "name", b]
        if b_ns:
            cmd += ["netns", b_ns]
        ip(*cmd)
        if a_ns is None:
            self.host_links.append(a)
        elif b_ns is None:
            self.host_links.append(b)
        for dev, ns in ((a, a_ns), (b, b_ns)):
            if mtu:
                ip("link", "set", dev, "mtu", str(mtu), netns=ns)
            ip("link", "set", dev, "up", netns=ns)

    def close(self) -> None:
        for link in self.host_links:
            ip("link", "del", link, check=False)
        for ns in reversed(self.namespaces):
            # processes left in a namespace keep it alive: end them first
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            ip("netns", "del", ns, check=False)
        self.host_links.clear()
        self.namespaces.clear()


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    t = Topology()
    try:
        yield t
    finally:
        t.close()


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch this thread into a named netns for the duration (restored afterwards)."""
    cur = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(cur)
        os.close(cur)
        os.close(target)
