"""Make sure the host's bpffs is visible at /sys/fs/bpf.

`ip netns exec NS cmd` runs `cmd` in a fresh mount namespace with /sys remounted for NS, which hides
the bpffs mounted at /sys/fs/bpf: an agent or `pycilium bpf ...` started that way would see no
pinned maps (or pin a private copy nobody else sees). Network namespaces do not need a private
/sys for anything we do (netlink and /proc/sys/net follow the network namespace), so when bpffs is
missing we rejoin the initial mount namespace, which has it. This must run before any thread starts
(the kernel refuses setns(CLONE_NEWNS) for multi-threaded processes).
"""

from __future__ import annotations

import ctypes
import os
import threading

BPF_MOUNT = "/sys/fs/bpf"
_CLONE_NEWNS = 0x00020000


def bpffs_mounted(path: str = BPF_MOUNT) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1:3] == [path, "bpf"] for line in f)
    except OSError:
        return False


def _ancestors() -> list[int]:
    pids: list[int] = []
    pid = os.getppid()
    while pid > 1 and len(pids) < 32:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return [*pids, 1]


def _has_bpffs(pid: int, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/mounts") as f:
            return any(line.split()[1:3] == [path, "bpf"] for line in f)
    except OSError:
        return False


def ensure_host_bpffs(path: str = BPF_MOUNT) -> bool:
    """True if bpffs is (now) visible at `path`; otherwise joins the mount namespace of the nearest
    ancestor process that sees it (the one that ran `ip netns exec`)."""
    if bpffs_mounted(path):
        return True
    if threading.active_count() != 1:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    cwd = os.getcwd()
    for pid in _ancestors():
        if not _has_bpffs(pid, path):
            continue
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        except OSError:
            continue
        try:
            if libc.setns(fd, _CLONE_NEWNS) != 0:
                continue
        finally:
            os.close(fd)
        os.chdir(cwd if os.path.isdir(cwd) else "/")
        return bpffs_mounted(path)
    return False
