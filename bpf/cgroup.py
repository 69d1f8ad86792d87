"""Attach programs to a cgroup v2 hook, replace them in place on restart, detach them.

Several programs may share a hook (BPF_F_ALLOW_MULTI): each lab node, or an agent and other
software. Ours are recognised by the maps they use: a program that references any of the node's
pinned maps belongs to that node's agent. A restarted agent therefore replaces exactly its
own program (BPF_F_REPLACE, no window without one), and removing a node's pinned maps can detach
the programs that would otherwise keep serving from them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from pycilium.bpf import syscall as sc

BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4

CGROUP_INET4_CONNECT = 10
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP4_RECVMSG = 19


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("replace_bpf_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 3)]  # fmt: skip


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32), ("query_flags", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("pad", ctypes.c_uint32 * 7)]  # fmt: skip


class _GetFdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 160)]  # fmt: skip


def _prog_info(fd: int) -> tuple[str, list[int]]:
    info = _ProgInfo()
    attr = sc._InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    sc._bpf(sc.BPF_OBJ_GET_INFO_BY_FD, attr, "prog info")
    n = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(n, 1))()
    info2 = _ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
    attr = sc._InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info2), info=ctypes.addressof(info2))
    sc._bpf(sc.BPF_OBJ_GET_INFO_BY_FD, attr, "prog info")
    return info.name.decode(errors="replace"), list(ids[:n])


def attached_programs(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup hook."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(
        target_fd=cgroup_fd, attach_type=attach_type, prog_ids=ctypes.addressof(ids), prog_cnt=64
    )
    sc._bpf(BPF_PROG_QUERY, attr, "query cgroup programs")
    return list(ids[: attr.prog_cnt])


def _prog_fd_by_id(prog_id: int) -> int | None:
    try:
        return sc._bpf(BPF_PROG_GET_FD_BY_ID, _GetFdAttr(id=prog_id), "prog by id")
    except sc.BPFError:
        return None


def _owned(cgroup_fd: int, attach_type: int, owner_map_ids: set[int]) -> list[int]:
    """fds of the attached programs that use any of `owner_map_ids` (caller closes them)."""
    out = []
    for pid in attached_programs(cgroup_fd, attach_type):
        fd = _prog_fd_by_id(pid)
        if fd is None:
            continue
        try:
            _name, maps = _prog_info(fd)
        except sc.BPFError:
            os.close(fd)
            continue
        if owner_map_ids.intersection(maps):
            out.append(fd)
        else:
            os.close(fd)
    return out


def node_map_ids(pin_root: str) -> set[int]:
    """Kernel ids of every map pinned under a node's bpf root."""
    out = set()
    for p in Path(pin_root).iterdir():
        try:
            fd = sc.obj_get(str(p))
        except sc.BPFError:
            continue
        try:
            out.add(sc.map_info(fd).id)
        except sc.BPFError:
            pass
        finally:
            os.close(fd)
    return out


def attach(cgroup: str, prog_fd: int, attach_type: int, owner_map_ids: set[int]) -> None:
    """Attach `prog_fd`, replacing in place a program of ours (using the node's maps) already there."""
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        old = _owned(cg, attach_type, owner_map_ids)
        try:
            attr = _AttachAttr(target_fd=cg, attach_bpf_fd=prog_fd, attach_type=attach_type,
                               attach_flags=BPF_F_ALLOW_MULTI)  # fmt: skip
            if old:
                attr.attach_flags |= BPF_F_REPLACE
                attr.replace_bpf_fd = old[0]
            sc._bpf(BPF_PROG_ATTACH, attr, f"attach to cgroup {cgroup}")
            for extra in old[1:]:  # duplicates from an older version: remove
                sc._bpf(BPF_PROG_DETACH, _AttachAttr(target_fd=cg, attach_bpf_fd=extra, attach_type=attach_type),
                        "detach")  # fmt: skip
        finally:
            for fd in old:
                os.close(fd)
    finally:
        os.close(cg)


def detach_owned(cgroup: str, attach_type: int, owner_map_ids: set[int]) -> int:
    """Detach every program of ours (using the node's maps) from the hook; returns how many."""
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    n = 0
    try:
        for fd in _owned(cg, attach_type, owner_map_ids):
            with contextlib.suppress(sc.BPFError):
                sc._bpf(BPF_PROG_DETACH, _AttachAttr(target_fd=cg, attach_bpf_fd=fd, attach_type=attach_type),
                        "detach")  # fmt: skip
                n += 1
            os.close(fd)
    finally:
        os.close(cg)
    return n


def cgroup2_root() -> str | None:
    """The cgroup v2 mount (the unified hierarchy), if any."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


SOCK_HOOKS = (("sock4_connect", CGROUP_INET4_CONNECT), ("sock4_sendmsg", CGROUP_UDP4_SENDMSG),
              ("sock4_recvmsg", CGROUP_UDP4_RECVMSG))  # fmt: skip


def detach_node_sock_programs(pin_root: str, cgroup: str | None = None) -> int:
    """Detach the socket LB programs that serve from this node's maps (used when removing a node)."""
    root = cgroup or cgroup2_root()
    if root is None or not Path(pin_root).is_dir():
        return 0
    owner = node_map_ids(pin_root)
    return sum(detach_owned(root, at, owner) for _fn, at in SOCK_HOOKS) if owner else 0
