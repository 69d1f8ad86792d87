"""Per-CPU perf ring buffers behind a BPF_MAP_TYPE_PERF_EVENT_ARRAY, without bcc.

For every possible CPU: perf_event_open(PERF_COUNT_SW_BPF_OUTPUT, cpu), mmap a ring of 2^n data
pages, and store the event's fd in map[cpu]; programs then write with bpf_perf_event_output(
BPF_F_CURRENT_CPU). poll() reads PERF_RECORD_SAMPLE (raw bytes) and PERF_RECORD_LOST records.

The map slots belong to the reader: the kernel drops the slots set through a map fd when that fd is
closed, and close() deletes them explicitly too, so after the reader exits the datapath's
bpf_perf_event_output finds no reader (and costs nothing) exactly as before it started. A perf
event array slot cannot be read back from user space, so whatever reader held a slot before is
replaced, not saved: run one reader per node at a time (`pycilium monitor` holds a lock for it).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pycilium.bpf import syscall as sc

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_NR_PERF_EVENT_OPEN = 298  # x86_64

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5

_HEAD_OFF = 1024  # struct perf_event_mmap_page: data_head
_TAIL_OFF = 1032  # data_tail
_U64 = struct.Struct("<Q")
_HDR = struct.Struct("<IHH")  # struct perf_event_header: type, misc, size


class PerfError(OSError):
    pass


def _attr() -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(PERF_ATTR_SIZE)
    struct.pack_into("<IIQQQ", buf, 0, PERF_TYPE_SOFTWARE, PERF_ATTR_SIZE, PERF_COUNT_SW_BPF_OUTPUT, 1,
                     PERF_SAMPLE_RAW)  # fmt: skip
    struct.pack_into("<I", buf, 48, 1)  # wakeup_events: wake the reader on every sample
    return buf


def perf_event_open(cpu: int) -> int:
    attr = _attr()
    c = ctypes.c_long
    fd = _libc.syscall(c(_NR_PERF_EVENT_OPEN), attr, c(-1), c(cpu), c(-1), c(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise PerfError(err, f"perf_event_open(cpu {cpu}): {os.strerror(err)}")
    return int(fd)


@dataclass
class Ring:
    cpu: int
    fd: int
    mem: mmap.mmap
    data_size: int
    page: int

    def records(self) -> Iterator[tuple[int, bytes]]:
        """Every complete record from tail to head: (type, body after the header)."""
        mem, size, base = self.mem, self.data_size, self.page
        head = _U64.unpack_from(mem, _HEAD_OFF)[0]
        tail = _U64.unpack_from(mem, _TAIL_OFF)[0]
        while tail < head:
            off = tail % size
            if off + _HDR.size <= size:
                rtype, _, rsize = _HDR.unpack_from(mem, base + off)
            else:
                rtype, _, rsize = _HDR.unpack(self._read(off, _HDR.size))
            if rsize < _HDR.size:  # corrupt ring: drop everything
                tail = head
                break
            yield rtype, self._read((off + _HDR.size) % size, rsize - _HDR.size)
            tail += rsize
        _U64.pack_into(mem, _TAIL_OFF, tail)

    def _read(self, off: int, n: int) -> bytes:
        base, size = self.page, self.data_size
        if off + n <= size:
            return self.mem[base + off : base + off + n]
        first = size - off
        return self.mem[base + off : base + size] + self.mem[base : base + n - first]


class PerfReader:
    """Perf rings on every possible CPU, registered in a pinned PERF_EVENT_ARRAY map."""

    def __init__(self, map_fd: int, pages: int = 64):
        if pages & (pages - 1):
            raise ValueError("pages must be a power of two")
        self.map_fd = map_fd
        self.pages = pages
        self.page = mmap.PAGESIZE
        self.rings: dict[int, Ring] = {}
        self._epoll = select.epoll()
        self._registered: list[int] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        for cpu in range(sc.possible_cpus()):
            try:
                fd = perf_event_open(cpu)
            except PerfError as e:
                if e.errno == errno.ENODEV:  # possible but offline CPU
                    continue
                raise
            try:
                mem = mmap.mmap(fd, self.page * (1 + self.pages), mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            except BaseException:
                os.close(fd)
                raise
            self.rings[fd] = Ring(cpu, fd, mem, self.page * self.pages, self.page)
            _libc.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
            self._epoll.register(fd, select.EPOLLIN)
            sc.map_update(self.map_fd, struct.pack("<I", cpu), struct.pack("<I", fd))
            self._registered.append(cpu)
        if not self.rings:
            raise PerfError(errno.ENODEV, "no CPU could open a perf event")

    def poll(self, on_sample: Callable[[int, bytes], None], on_lost: Callable[[int, int], None],
             timeout: float) -> None:  # fmt: skip
        """Wait up to `timeout` seconds, then drain every ready ring."""
        try:
            ready = self._epoll.poll(timeout)
        except InterruptedError:
            return
        for fd, _ in ready:
            ring = self.rings.get(fd)
            if ring is None:
                continue
            for rtype, body in ring.records():
                if rtype == PERF_RECORD_SAMPLE:
                    (n,) = struct.unpack_from("<I", body, 0)
                    on_sample(ring.cpu, body[4 : 4 + n])
                elif rtype == PERF_RECORD_LOST:
                    _, lost = struct.unpack_from("<QQ", body, 0)
                    on_lost(ring.cpu, lost)

    def close(self) -> None:
        """Remove our map slots, then release the rings."""
        for cpu in self._registered:
            try:
                sc.map_delete(self.map_fd, struct.pack("<I", cpu))
            except OSError:
                pass
        self._registered = []
        for ring in self.rings.values():
            try:
                _libc.ioctl(ring.fd, PERF_EVENT_IOC_DISABLE, 0)
                ring.mem.close()
            finally:
                os.close(ring.fd)
        self.rings = {}
        self._epoll.close()
