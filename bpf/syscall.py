"""Thin ctypes wrapper over the bpf(2) system call.

bcc compiles and loads programs; everything that only touches maps (the CLI reading pinned maps,
the agent writing services in batches, tests) goes through this module, so it needs neither a
compiler nor a loaded program. Keys and values are bytes; the typed views live in bpf/maps/.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NR_BPF = 321  # x86_64

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_F_NO_PREALLOC = 1
BPF_NOEXIST = 1
BPF_EXIST = 2

MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERF_EVENT_ARRAY = 4
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_LPM_TRIE = 11
PERCPU_TYPES = {MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH}
_BATCH_OK_TYPES = {MAP_TYPE_HASH, MAP_TYPE_PERCPU_HASH, MAP_TYPE_LRU_HASH, MAP_TYPE_LRU_PERCPU_HASH,
                   MAP_TYPE_ARRAY, MAP_TYPE_PERCPU_ARRAY}  # fmt: skip


class BPFError(OSError):
    """A bpf(2) command failed; errno and the command are kept."""


def _ptr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 64)]  # fmt: skip


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]  # fmt: skip


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]  # fmt: skip


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("path_fd", ctypes.c_int32), ("pad", ctypes.c_uint32)]  # fmt: skip


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 64)]  # fmt: skip


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]  # fmt: skip


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        total = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            total += (int(hi) if hi else int(lo)) - int(lo) + 1
        return total


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "",
               flags: int = 0) -> int:  # fmt: skip
    """Create a map; returns its fd."""
    attr = _CreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                       map_flags=flags, map_name=name.encode()[:15])  # fmt: skip
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name}")


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(p))
    return _bpf(BPF_OBJ_GET, attr, f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin object at {path}")


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags,
                   info.name.decode(errors="replace"))  # fmt: skip


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _ElemAttr(map_fd=fd, key=_ptr(k), value=_ptr(v))
    ret = _libc.syscall(_NR_BPF, BPF_MAP_LOOKUP_ELEM, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise BPFError(err, f"map lookup: {os.strerror(err)}")
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _ElemAttr(map_fd=fd, key=_ptr(k), value=_ptr(v), flags=flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one key; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = _ElemAttr(map_fd=fd, key=_ptr(k))
    ret = _libc.syscall(_NR_BPF, BPF_MAP_DELETE_ELEM, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        raise BPFError(err, f"map delete: {os.strerror(err)}")
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, key_size) if key is not None else None
    nk = ctypes.create_string_buffer(key_size)
    attr = _ElemAttr(map_fd=fd, key=_ptr(k), value=_ptr(nk))
    ret = _libc.syscall(_NR_BPF, BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise BPFError(err, f"map get_next_key: {os.strerror(err)}")
    return nk.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Iterate keys one syscall each; for map types without batch support (LPM tries)."""
    key = map_next_key(fd, None, key_size)
    while key is not None:
        yield key
        key = map_next_key(fd, key, key_size)


def map_items(fd: int, info: MapInfo, batch: int = 4096) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a map; batched where the kernel supports it for the map type."""
    vsize = info.value_size
    if info.type in PERCPU_TYPES:
        vsize = ((vsize + 7) & ~7) * possible_cpus()
    if info.type not in _BATCH_OK_TYPES:
        for key in list(map_keys(fd, info.key_size)):
            value = map_lookup(fd, key, vsize)
            if value is not None:
                yield key, value
        return
    ks, n = info.key_size, min(batch, max(info.max_entries, 1))
    keys = ctypes.create_string_buffer(ks * n)
    values = ctypes.create_string_buffer(vsize * n)
    in_b = ctypes.create_string_buffer(max(ks, 8))
    out_b = ctypes.create_string_buffer(max(ks, 8))
    first = True
    while True:
        attr = _BatchAttr(in_batch=0 if first else _ptr(in_b), out_batch=_ptr(out_b), keys=_ptr(keys),
                          values=_ptr(values), count=n, map_fd=fd)  # fmt: skip
        ret = _libc.syscall(_NR_BPF, BPF_MAP_LOOKUP_BATCH, ctypes.byref(attr), ctypes.sizeof(attr))
        err = ctypes.get_errno() if ret < 0 else 0
        if ret < 0 and err != errno.ENOENT:
            raise BPFError(err, f"map lookup batch: {os.strerror(err)}")
        got = attr.count
        kraw, vraw = keys.raw, values.raw
        for i in range(got):
            yield kraw[i * ks : (i + 1) * ks], vraw[i * vsize : (i + 1) * vsize]
        if err == errno.ENOENT:
            return
        ctypes.memmove(in_b, out_b, len(out_b))
        first = False


def map_update_batch(fd: int, keys: Sequence[bytes], values: Sequence[bytes], flags: int = BPF_ANY) -> None:
    if not keys:
        return
    kb = ctypes.create_string_buffer(b"".join(keys))
    vb = ctypes.create_string_buffer(b"".join(values))
    attr = _BatchAttr(keys=_ptr(kb), values=_ptr(vb), count=len(keys), map_fd=fd, elem_flags=flags)
    _bpf(BPF_MAP_UPDATE_BATCH, attr, f"map update batch ({len(keys)} entries)")


def map_delete_batch(fd: int, keys: Sequence[bytes]) -> int:
    """Delete keys; missing keys are skipped. Returns how many were deleted."""
    if not keys:
        return 0
    kb = ctypes.create_string_buffer(b"".join(keys))
    attr = _BatchAttr(keys=_ptr(kb), count=len(keys), map_fd=fd)
    ret = _libc.syscall(_NR_BPF, BPF_MAP_DELETE_BATCH, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err != errno.ENOENT:
            raise BPFError(err, f"map delete batch: {os.strerror(err)}")
        # stopped at a missing key: finish one by one
        done = int(attr.count)
        return done + sum(1 for k in keys[done + 1 :] if map_delete(fd, k))
    return int(attr.count)


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    ctx: bytes


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  ctx_out_size: int = 0, data_out_size: int | None = None) -> TestRunResult:  # fmt: skip
    """Run a loaded program on `data` with BPF_PROG_TEST_RUN."""
    din = ctypes.create_string_buffer(data, len(data))
    out_size = data_out_size if data_out_size is not None else len(data) + 256
    dout = ctypes.create_string_buffer(out_size)
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    cout = ctypes.create_string_buffer(ctx_out_size) if ctx_out_size else None
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_size_out=out_size, data_in=_ptr(din),
                        data_out=_ptr(dout), repeat=repeat, ctx_size_in=len(ctx) if ctx else 0,
                        ctx_size_out=ctx_out_size, ctx_in=_ptr(cin), ctx_out=_ptr(cout))  # fmt: skip
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return TestRunResult(attr.retval, dout.raw[: attr.data_size_out], attr.duration,
                         cout.raw[: attr.ctx_size_out] if cout is not None else b"")  # fmt: skip
