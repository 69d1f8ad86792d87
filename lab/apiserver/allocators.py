"""ClusterIP and NodePort allocation for Services, as kube-apiserver's service registry does it.

Addresses and ports are handed out sequentially (wrapping around) rather than randomly so the lab is
predictable. The first host address of the service CIDR is kept for the `kubernetes` Service: it is
only handed out when asked for explicitly.
"""

from __future__ import annotations

import ipaddress


class AllocationError(Exception):
    """The requested value is out of range or taken, or the range is full."""


class ClusterIPAllocator:
    def __init__(self, cidr: str = "10.96.0.0/12") -> None:
        self.network = ipaddress.ip_network(cidr, strict=False)
        self.used: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._first = int(self.network.network_address) + 1  # reserved for `kubernetes`
        self._last = int(self.network.broadcast_address) - 1
        self._next = self._first + 1

    @property
    def size(self) -> int:
        return self._last - self._first + 1

    def allocate(self, ip: str | None = None) -> str:
        if ip is not None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError as e:
                raise AllocationError(
                    f"must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff): {e}"
                ) from e
            if not (self._first <= int(addr) <= self._last) or addr.version != self.network.version:
                raise AllocationError(
                    f"failed to allocate IP {ip}: provided IP is not in the valid range. "
                    f"The range of valid IPs is {self.network}"
                )
            if addr in self.used:
                raise AllocationError(f"failed to allocate IP {ip}: provided IP is already allocated")
            self.used.add(addr)
            return str(addr)
        span = self._last - self._first  # the reserved first address is skipped when picking freely
        for i in range(span):
            n = self._first + 1 + (self._next - self._first - 1 + i) % span
            cand = ipaddress.ip_address(n)
            if cand not in self.used:
                self.used.add(cand)
                self._next = n + 1
                return str(cand)
        raise AllocationError(f"failed to allocate a serviceIP: range is full ({self.network})")

    def release(self, ip: str | None) -> None:
        if not ip or ip == "None":
            return
        try:
            self.used.discard(ipaddress.ip_address(ip))
        except ValueError:
            pass

    def contains(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in self.used
        except ValueError:
            return False


class NodePortAllocator:
    def __init__(self, low: int = 30000, high: int = 32767) -> None:
        self.low, self.high = low, high
        self.used: set[int] = set()
        self._next = low

    def allocate(self, port: int | None = None) -> int:
        if port is not None:
            if not (self.low <= port <= self.high):
                raise AllocationError(
                    f"provided port is not in the valid range. The range of valid ports is {self.low}-{self.high}"
                )
            if port in self.used:
                raise AllocationError("provided port is already allocated")
            self.used.add(port)
            return port
        span = self.high - self.low + 1
        for i in range(span):
            cand = self.low + (self._next - self.low + i) % span
            if cand not in self.used:
                self.used.add(cand)
                self._next = cand + 1
                return cand
        raise AllocationError(f"range is full ({self.low}-{self.high})")

    def release(self, port: int | None) -> None:
        if port:
            self.used.discard(port)
